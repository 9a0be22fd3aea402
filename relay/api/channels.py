"""Channels: POST/GET/PATCH/DELETE /v1/channels, a host's lasting watch links (relay/channels.py)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from ..auth import require_api_key
from ..channels import Channel
from ..errors import RelayError
from ..host import broadcast_links
from ..recordings import owner_id
from ..web import API_KEYS, CLUSTER, SESSIONS, json_response, public_url, read_json, token_of

routes = web.RouteTableDef()


def channel_owner(request: web.Request) -> str:
    return owner_id(require_api_key(token_of(request), request.app[API_KEYS]))


def channels_of(request: web.Request):
    store = request.app[SESSIONS].channels
    if store is None:
        raise RelayError("NOT_FOUND", 404, "This relay keeps no channels.", action="Open a connection without one.")
    return store


def channel_body(request: web.Request, channel: Channel) -> dict[str, Any]:
    broadcast = request.app[SESSIONS].channel_broadcast(channel)
    return {**channel.to_dict(), "connection_id": broadcast.connection_id, "live": broadcast.live,
            "broadcast": broadcast_links(broadcast, public_url(request))}


@routes.post("/v1/channels")
async def create_channel(request: web.Request) -> web.Response:
    owner = channel_owner(request)
    store = channels_of(request)
    body = await read_json(request)
    clock = request.app[SESSIONS].clock
    if (cluster := request.app[CLUSTER]) is not None:  # unique per key across the cluster
        async with cluster.slug_claim(owner, body.get("slug")):
            channel = await asyncio.to_thread(store.create, owner, body, clock.time())
    else:
        channel = await asyncio.to_thread(store.create, owner, body, clock.time())
    if cluster is not None:  # in the directory before its 201: any node answers for it
        await cluster.channel_created(channel)
    return json_response(channel_body(request, channel), status=201)


@routes.get("/v1/channels")
async def list_channels(request: web.Request) -> web.Response:
    owner = channel_owner(request)
    channels = [channel_body(request, c) for c in channels_of(request).list(owner)]
    return json_response({"channels": channels, "total": len(channels)})


@routes.get("/v1/channels/{channel_id}")
async def get_channel(request: web.Request) -> web.Response:
    owner = channel_owner(request)
    return json_response(channel_body(request, channels_of(request).get(owner, request.match_info["channel_id"])))


@routes.patch("/v1/channels/{channel_id}")
async def update_channel(request: web.Request) -> web.Response:
    owner = channel_owner(request)
    store = channels_of(request)
    channel = store.get(owner, request.match_info["channel_id"])
    body = await read_json(request)
    old_slug = channel.slug
    if (cluster := request.app[CLUSTER]) is not None and body.get("slug") != old_slug:
        async with cluster.slug_claim(owner, body.get("slug")):
            channel = await asyncio.to_thread(store.update, channel, body)
    else:
        channel = await asyncio.to_thread(store.update, channel, body)
    request.app[SESSIONS].channel_changed(channel)
    if cluster is not None:  # its new slug found at any node at once
        await cluster.channel_updated(old_slug, channel)
    return json_response(channel_body(request, channel))


@routes.delete("/v1/channels/{channel_id}")
async def delete_channel(request: web.Request) -> web.Response:
    owner = channel_owner(request)
    store = channels_of(request)
    channel = store.get(owner, request.match_info["channel_id"])
    await asyncio.to_thread(store.delete, channel)
    if (cluster := request.app[CLUSTER]) is not None:
        await cluster.channel_deleted(channel)
    await request.app[SESSIONS].drop_channel(channel)  # its connection and spectators: the link is gone
    return web.Response(status=204)
