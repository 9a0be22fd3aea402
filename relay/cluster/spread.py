"""What no one node holds: a key's recordings and jobs listed across the cluster, and a recording found
on the node whose data_dir holds it.

A listing (`GET /v1/recordings`, `GET /v1/simulations`) at any node asks every live node for the first
offset + limit items of the key's (this node answers its own part in process), merges them newest first
and cuts the caller's page; totals add up. Each item comes as its owner made it, so its URLs name its
owner's public_url. A node that does not answer within fanout_timeout_seconds (killed, stalled, refusing)
is left out: the page says `partial: true` and names it in `missing_nodes`, never a 500 or a wait.

A recording (`/v1/recordings/{id}`, its files, `/recordings/{id}/info`) this node does not hold is looked
for at the other live nodes (a HEAD of the same call), then carried to the node that has it. Recordings are
not in the directory: simulation workers make them in other processes, and they live as long as their
files; asking the nodes is always true.

Node-to-node calls present the node credential (X-Relay-Node); the caller's Authorization travels with
them and is checked again at the node that answers. The caller's credential is checked here first, so a
stranger costs no other node a call.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any, Callable

import aiohttp
from aiohttp import web

from ..auth import require_api_key
from ..errors import RelayError, invalid_request
from ..web import API_KEYS, CLUSTER, FROM_NODE, MERGE_WINDOW, RECORDINGS, SETTINGS, page_of, token_of
from .forward import CARRIER, carry, headers_out, unreachable
from .membership import NodeInfo


def _recording_order(item: dict[str, Any]) -> tuple[str, str]:
    return item.get("started_at") or "", item.get("stream_id") or ""  # RFC 3339 UTC sorts as time does


def _job_order(item: dict[str, Any]) -> str:
    return item.get("created_at") or ""


# path -> (the listing's field, its newest-first order)
LISTINGS: dict[str, tuple[str, Callable[[dict[str, Any]], Any]]] = {
    "/v1/recordings": ("recordings", _recording_order),
    "/v1/simulations": ("jobs", _job_order),
}
_RECORDING_PATHS = (
    re.compile(r"^/v1/recordings/([^/]{1,128})(/[^/]{1,64})?$"),
    re.compile(r"^/recordings/([^/]{1,128})/info$"),
)


@web.middleware
async def spread(request: web.Request, handler) -> web.StreamResponse:
    """After `forward`: a call another node sent is answered from this node alone."""
    if request.get(FROM_NODE) or request.method != "GET":
        return await handler(request)
    if request.path in LISTINGS:
        return await _merged(request, handler, *LISTINGS[request.path])
    for pattern in _RECORDING_PATHS:
        if m := pattern.match(request.path):
            return await _recording(request, handler, m.group(1))
    return await handler(request)


async def _others(request: web.Request) -> list[NodeInfo]:
    cluster = request.app[CLUSTER]
    try:
        nodes = await cluster.nodes()
    except RelayError:  # Redis away: the last heartbeat's view (the nodes answer for what they hold)
        nodes = cluster.nodes_seen
    return [n for n in nodes if n.node_id != cluster.node_id]


def _timeout(request: web.Request) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=request.app[SETTINGS].cluster.fanout_timeout_seconds)


# -- listings ------------------------------------------------------------------------------------


async def _merged(request: web.Request, handler, field: str, order) -> web.Response:
    require_api_key(token_of(request), request.app[API_KEYS])
    limit, offset = page_of(request)
    if offset + limit > MERGE_WINDOW:
        raise invalid_request(f"In a cluster, 'offset' + 'limit' must be at most {MERGE_WINDOW}.", field="offset",
                              limit=MERGE_WINDOW)
    # Each node's first offset + limit (its own filters as given): the caller's page is among them.
    query = {**request.query, "limit": str(offset + limit), "offset": "0"}
    own = request.clone(rel_url=request.rel_url.with_query(query))
    own[FROM_NODE] = request.app[CLUSTER].node_id
    others = await _others(request)
    parts = await asyncio.gather(_own_part(own, handler),
                                 *(_part(request, node, query, field) for node in others))
    items, total, missing = [], 0, []
    for node_id, part in zip([request.app[CLUSTER].node_id] + [n.node_id for n in others], parts):
        if part is None:
            missing.append(node_id)
            continue
        items += part[field]
        total += part["total"]
    items.sort(key=order, reverse=True)  # stable: one node's own order holds within equal times
    return web.json_response({field: items[offset:offset + limit], "total": total, "limit": limit, "offset": offset,
                              "partial": bool(missing), "missing_nodes": missing})


async def _own_part(request: web.Request, handler) -> dict[str, Any]:
    """This node's part, from its own handler (its refusals, a 400 or a 507, are the caller's answer)."""
    response = await handler(request)
    return json.loads(response.body)


async def _part(request: web.Request, node: NodeInfo, query: dict[str, str], field: str) -> dict[str, Any] | None:
    """A node's part, or None when it does not answer well within fanout_timeout_seconds."""
    session = request.app[CARRIER].session
    try:
        async with session.get(node.public_url + request.path, params=query, headers=headers_out(request),
                               timeout=_timeout(request), allow_redirects=False) as answer:
            if answer.status != 200:
                return None
            part = await answer.json()
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        return None
    if not isinstance(part, dict) or not isinstance(part.get(field), list) or not isinstance(part.get("total"), int):
        return None
    return part


# -- one recording -------------------------------------------------------------------------------


async def _recording(request: web.Request, handler, stream_id: str) -> web.StreamResponse:
    store = request.app[RECORDINGS]
    if await asyncio.to_thread(store.get, stream_id) is not None:
        return await handler(request)  # here (the handler tells the owner from a stranger)
    if not _credentials_hold(request, stream_id):
        return await handler(request)  # its 401 or 403, as on one node
    others = await _others(request)
    statuses = await asyncio.gather(*(_probe(request, node) for node in others))
    for node, status in zip(others, statuses):
        if status is not None and status != 404:
            return await carry(request, node)
    silent = [node for node, status in zip(others, statuses) if status is None]
    if silent:  # it may be there: not a 404 that would be untrue once the node answers again
        raise unreachable(silent[0], TimeoutError("no answer to a recording lookup"))
    return await handler(request)  # nowhere: 404


def _credentials_hold(request: web.Request, stream_id: str) -> bool:
    """The caller's API key, or the link's signature (the cluster's key signs at every node)."""
    if request.path.startswith("/v1/recordings/") and request.path.count("/") == 3:
        try:
            require_api_key(token_of(request), request.app[API_KEYS])
        except RelayError:
            return False
        return True
    signed = f"/recordings/{stream_id}" if request.path.startswith("/recordings/") else request.path
    return request.app[RECORDINGS].verify(signed, request.query.get("expires"), request.query.get("signature"))


async def _probe(request: web.Request, node: NodeInfo) -> int | None:
    """The node's status for the same call (HEAD: no body), or None when it does not answer in time."""
    session = request.app[CARRIER].session
    try:
        async with session.head(node.public_url + request.raw_path, headers=headers_out(request),
                                timeout=_timeout(request), allow_redirects=False) as answer:
            return answer.status
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return None
