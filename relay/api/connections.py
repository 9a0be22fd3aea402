"""Host API: connections, their streams, and the control WebSocket."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
from typing import Any

from aiohttp import WSMsgType, web

from ..auth import check_owner, is_api_key, require_api_key
from ..recordings import owner_id
from ..clock import iso
from ..errors import RelayError, invalid_request, not_found, unauthorized
from ..host import HostCommands, broadcast_links
from ..inputs import parse_json
from ..connection import Connection, Stream
from ..sessions import SessionManager
from .channels import channels_of
from ..worldmodel.whip import WhipStreamer
from ..web import (API_KEYS, GOING_AWAY, SESSIONS, SETTINGS, STALLED, TOO_SLOW, close_within, json_response,
                   next_for, public_url, read_json, send_within, token_of)

log = logging.getLogger(__name__)

routes = web.RouteTableDef()


def authorize_connection(request: web.Request, connection_id: str) -> Connection:
    """401 before 404, so an anonymous caller learns nothing about which ids exist."""
    sessions = request.app[SESSIONS]
    keys = request.app[API_KEYS]
    token = token_of(request)
    conn = sessions.connections.get(connection_id)
    if conn is None:
        if is_api_key(token, keys) or (token and sessions.connection_for_client_token(token)):
            raise not_found("connection", connection_id)
        raise unauthorized()
    client_token = token if token and sessions.connection_for_client_token(token) is conn else None
    check_owner(token, conn.api_key, client_token, keys)
    sessions.touch(conn)
    return conn


def authorize_stream(request: web.Request, stream_id: str) -> Stream:
    sessions = request.app[SESSIONS]
    token = token_of(request)
    try:
        stream = sessions.stream(stream_id)
    except RelayError:
        if is_api_key(token, request.app[API_KEYS]) or (token and sessions.connection_for_client_token(token)):
            raise
        raise unauthorized() from None
    conn = stream.connection
    # The connection's client tokens while they are valid (the control socket keeps one fresh).
    client_token = token if token and sessions.connection_for_client_token(token) is conn else None
    check_owner(token, conn.api_key, client_token, request.app[API_KEYS])
    if not conn.closed:
        sessions.touch(conn)
    return stream


def broadcast_info(request: web.Request, conn: Connection) -> dict[str, Any]:
    return broadcast_links(conn.broadcast, public_url(request))


def host_commands(request: web.Request, conn: Connection) -> HostCommands:
    return HostCommands(request.app[SESSIONS], conn, public_url(request))


def client_token_message(conn: Connection, sessions: SessionManager) -> dict[str, Any]:
    """The answer to the control socket's refresh_token: the newest token and its life left."""
    remaining = max(0.0, conn.client_token_deadline - sessions.clock.monotonic())
    return {"type": "client_token", "client_token": conn.client_token, "client_token_expires_in": round(remaining)}


def publish_slot_body(request: web.Request, conn: Connection) -> dict[str, Any]:
    """A WHIP connection's publish slot: where its publisher POSTs, and the token only it takes."""
    if not isinstance(conn.streamer, WhipStreamer):
        return {}
    return {"whip_url": f"{public_url(request)}/v1/connections/{conn.connection_id}/whip",
            "publish_token": conn.streamer.publish_token}


def connection_body(request: web.Request, conn: Connection, sessions: SessionManager) -> dict[str, Any]:
    remaining = max(0.0, conn.client_token_deadline - sessions.clock.monotonic())
    base = conn.to_dict(sessions.clock.time(), sessions.clock.monotonic())
    return {
        **publish_slot_body(request, conn),
        **base,
        "idle_timeout_seconds": request.app[SETTINGS].limits.idle_timeout_seconds,
        "client_token": conn.client_token,
        "client_token_expires_in": round(remaining),
        "control_url": control_url(request, conn),
        "broadcast": broadcast_info(request, conn),
    }


def control_url(request: web.Request, conn: Connection) -> str:
    base = public_url(request).replace("http://", "ws://", 1).replace("https://", "wss://", 1)
    return f"{base}/v1/connections/{conn.connection_id}/control"


def share_replay_of(body: dict[str, Any]) -> bool | None:
    """The host's ``share_replay`` choice in a body, None when the body does not say."""
    share = body.get("share_replay")
    if share is not None and not isinstance(share, bool):
        raise invalid_request("'share_replay' must be true or false.", field="share_replay")
    return share


def parse_stream_request(body: dict[str, Any]) -> tuple[Any, bytes | None, bool]:
    portrait = body.get("portrait", False)
    if not isinstance(portrait, bool):
        raise invalid_request("'portrait' must be true or false.", field="portrait")
    image = body.get("image")
    if image is not None:
        if not isinstance(image, str):
            raise invalid_request("'image' must be a base64 string.", field="image")
        try:
            image = base64.b64decode(image.split(",", 1)[-1], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise invalid_request("'image' is not valid base64.", field="image") from exc
    return body.get("prompt"), image, portrait


def stream_started_body(request: web.Request, stream: Stream) -> dict[str, Any]:
    return {
        "stream_id": stream.stream_id,
        "started_at": iso(stream.started_at),
        "max_duration_seconds": stream.max_duration_seconds,
        "broadcast": broadcast_info(request, stream.connection),
    }


@routes.post("/v1/connections")
async def open_connection(request: web.Request) -> web.Response:
    key = require_api_key(token_of(request), request.app[API_KEYS])
    sessions = request.app[SESSIONS]
    channel = None
    body = await read_json(request) if request.body_exists else {}
    channel_id = body.get("channel_id")
    if channel_id is not None:  # streams into the channel's lasting broadcast (its watch URL stays)
        if not isinstance(channel_id, str):
            raise invalid_request("'channel_id' must be a string.", field="channel_id")
        channel = channels_of(request).get(owner_id(key), channel_id)
    share_replay = share_replay_of(body) is True  # a connection that does not say shares nothing
    conn = await sessions.open_connection(key, channel)
    conn.broadcast.share_replays(share_replay, public_url(request))
    return json_response(connection_body(request, conn, sessions), status=201)


@routes.get("/v1/connections/{connection_id}")
async def get_connection(request: web.Request) -> web.Response:
    conn = authorize_connection(request, request.match_info["connection_id"])
    sessions = request.app[SESSIONS]
    return json_response(conn.to_dict(sessions.clock.time(), sessions.clock.monotonic()))


@routes.post("/v1/connections/{connection_id}/keepalive")
async def keepalive(request: web.Request) -> web.Response:
    authorize_connection(request, request.match_info["connection_id"])  # touches the idle timer
    return web.Response(status=204)


@routes.delete("/v1/connections/{connection_id}")
async def close_connection(request: web.Request) -> web.Response:
    conn = authorize_connection(request, request.match_info["connection_id"])
    await request.app[SESSIONS].close_connection(conn, "disconnected")
    return web.Response(status=204)


@routes.post("/v1/connections/{connection_id}/streams")
async def start_stream(request: web.Request) -> web.Response:
    conn = authorize_connection(request, request.match_info["connection_id"])
    prompt, image, portrait = parse_stream_request(await read_json(request))
    stream = await host_commands(request, conn).start(prompt, image=image, portrait=portrait)
    return json_response(stream_started_body(request, stream), status=201)


@routes.get("/v1/streams/{stream_id}")
async def get_stream(request: web.Request) -> web.Response:
    return json_response(authorize_stream(request, request.match_info["stream_id"]).to_dict())


@routes.post("/v1/streams/{stream_id}/interact")
async def interact(request: web.Request) -> web.Response:
    stream = authorize_stream(request, request.match_info["stream_id"])
    body = await read_json(request)
    acknowledged = await host_commands(request, stream.connection).interact(body.get("prompt"), stream)
    return json_response({"acknowledged_prompt": acknowledged})


@routes.delete("/v1/streams/{stream_id}")
async def end_stream(request: web.Request) -> web.Response:
    stream = authorize_stream(request, request.match_info["stream_id"])
    await host_commands(request, stream.connection).end(stream)
    return json_response({"stream_id": stream.stream_id, "ended_at": iso(stream.ended_at), "end_reason": "ended"})


# -- the control socket ---------------------------------------------------------------------

# A host's orchestration fields, read alike from a control-socket message and a REST body (api/orchestration.py).
def participant_of(message: dict[str, Any]) -> str:
    pid = message.get("participant_id")
    if not isinstance(pid, str):
        raise invalid_request("'participant_id' is required.", field="participant_id")
    return pid


def chat_enabled_of(message: dict[str, Any]) -> bool:
    enabled = message.get("enabled")
    if not isinstance(enabled, bool):
        raise invalid_request("'enabled' must be true or false.", field="enabled")
    return enabled


def _message_id(message: dict[str, Any]) -> str:
    message_id = message.get("message_id")
    if not isinstance(message_id, str):
        raise invalid_request("'message_id' is required.", field="message_id")
    return message_id


# The host's orchestration actions, as control-socket messages (same rules as the REST calls); each
# pushes the new state to the audience and the host itself.
HOST_ORCHESTRATION = {
    "orchestration": lambda a, m: a.configure(m),
    "block": lambda a, m: a.block(participant_of(m)),
    "unblock": lambda a, m: a.unblock(participant_of(m)),
    "grant_turn": lambda a, m: a.grant_turn(participant_of(m)),
    "revoke_turn": lambda a, m: a.revoke_turn(),
    "set_chat": lambda a, m: a.set_chat(chat_enabled_of(m)),
    "clear_chat": lambda a, m: a.clear_chat(_message_id(m)),
}


@routes.get("/v1/connections/{connection_id}/control")
async def control(request: web.Request) -> web.WebSocketResponse:
    conn = authorize_connection(request, request.match_info["connection_id"])
    sessions = request.app[SESSIONS]
    ws = web.WebSocketResponse(heartbeat=15, max_msg_size=64 * 1024)
    await ws.prepare(request)
    outbox = conn.listen()
    sessions.control_opened(conn)
    sender = asyncio.create_task(_send_events(request, ws, outbox), name="relay-control-send")
    host = host_commands(request, conn)
    try:
        await ws.send_json({"type": "connected", "connection_id": conn.connection_id,
                            "broadcast": broadcast_info(request, conn),
                            "orchestration": conn.broadcast.orchestrator.state(host=True),
                            "chat": conn.broadcast.audience.chat.state()})
        if conn.stream is not None and conn.stream.live:
            # A console that reloaded joins a stream under way: how long it has left, too.
            left = max(0.0, conn.stream.deadline - sessions.clock.monotonic())
            await ws.send_json({"type": "stream_started", "stream_id": conn.stream.stream_id,
                                "prompt": conn.stream.prompt,
                                "max_duration_seconds": conn.stream.max_duration_seconds,
                                "seconds_left": round(left, 1)})
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            sessions.touch(conn)
            await _handle_control_message(request, host, msg.data, ws)
            if conn.closed:
                break
    finally:
        # Bookkeeping first, before any await: aiohttp may cancel this handler once the
        # peer is gone, and a socket that is not counted closed would keep the host alive.
        conn.unlisten(outbox)
        sessions.control_closed(conn)
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        await ws.close()
    return ws


async def _send_events(request: web.Request, ws: web.WebSocketResponse, outbox: asyncio.Queue) -> None:
    seconds = request.app[SETTINGS].server.send_timeout_seconds
    while True:
        event = await next_for(request, outbox, seconds)
        if event is STALLED:
            await close_within(request, ws, TOO_SLOW, b"too slow", seconds)
            return
        if not await send_within(request, ws, json.dumps(event), seconds):
            return
        if event.get("type") == "disconnected":
            if event.get("reason") == "shutdown":
                await close_within(request, ws, GOING_AWAY, b"shutdown", seconds)
            else:
                await close_within(request, ws, 1000, event.get("reason", "").encode(), seconds)
            return


async def _handle_control_message(request: web.Request, host: HostCommands, data: str, ws) -> None:
    sessions, conn = host.sessions, host.conn
    try:
        message = parse_json(data, request.app[SETTINGS].server.max_json_depth)
        if not isinstance(message, dict):
            raise invalid_request("Control messages are JSON objects.")
        kind = message.get("type")
        if not isinstance(kind, str):  # a list here would not even hash for the lookup below
            raise invalid_request("Control messages carry a string 'type'.", field="type")
        if kind == "keepalive":
            return
        if kind == "status":  # the console's control room asks every few seconds
            await ws.send_json(conn.broadcast.status())
            return
        if kind == "refresh_token":
            sessions.refresh_client_token(conn)
            await ws.send_json(client_token_message(conn, sessions))
            return
        if kind == "start_stream":
            prompt, image, portrait = parse_stream_request(message)
            await host.start(prompt, image=image, portrait=portrait)
        elif kind == "interact":
            await host.interact(message.get("prompt"))
        elif kind == "end_stream":
            await host.end()
        elif kind in HOST_ORCHESTRATION:
            HOST_ORCHESTRATION[kind](conn.broadcast.audience, message)
        else:
            raise invalid_request(f"Unknown control message type {kind!r}.", type=kind)
    except RelayError as err:
        await ws.send_json({"type": "error", "code": err.code, "message": err.message, "fatal": False,
                            "details": err.details})
