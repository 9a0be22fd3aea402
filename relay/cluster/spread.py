"""What no one node holds: a key's recordings, jobs and channels listed across the cluster, and a recording
found on the node whose data_dir holds it (for /v1 and /odyssey alike).

A listing (`GET /v1/recordings`, `/v1/simulations`, `/odyssey/stream-recordings`, `/odyssey/simulation-jobs`)
at any node is answered here first (so the caller's credential and query are checked before any other node
is asked), for the first offset + limit items; then every other live node is asked for the same, in
parallel; the parts are merged newest first and the caller's page cut; totals add up. Each item comes as its
owner made it, so its URLs name its owner's public_url. A node that does not answer within
fanout_timeout_seconds (killed, stalled, refusing) is left out: the page says `partial: true` and names it in
`missing_nodes`, never a 500 or a wait.

A recording (`/v1/recordings/{id}`, its files, `/recordings/{id}/info` and its link's
`/recordings/{id}/events.jsonl`, `/odyssey/recordings/{id}`) is
asked for here first; only a 404 (the caller's credential or link held) sends a HEAD of the same call to
the other live nodes, and the call is carried to the one that has it. Recordings are not in the directory:
simulation workers make them in other processes, and they live as long as their files; asking is always
true.

Node-to-node calls present the node credential (X-Relay-Node); the caller's Authorization travels with
them and is checked again at the node that answers.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any, Callable

import aiohttp
from aiohttp import web

from ..errors import RelayError, invalid_request
from ..recordings import FILES
from ..web import CLUSTER, FROM_NODE, MERGE_WINDOW, SETTINGS, page_of
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
    "/odyssey/stream-recordings": ("recordings", _recording_order),
    "/odyssey/simulation-jobs": ("jobs", _job_order),
}
_FILE = "|".join(re.escape(name) for name in FILES)
_RECORDING = re.compile(rf"^(/v1/recordings/[^/]{{1,128}}(/({_FILE}))?|/recordings/[^/]{{1,128}}/(info|events\.jsonl)"
                        r"|/odyssey/recordings/[^/]{1,128})$")


@web.middleware
async def spread(request: web.Request, handler) -> web.StreamResponse:
    """After `forward`: a call another node sent is answered from this node alone."""
    if request.get(FROM_NODE) or request.method not in ("GET", "HEAD"):
        return await handler(request)
    if request.path in LISTINGS and request.method == "GET":
        return await _merged(request, handler, *LISTINGS[request.path])
    if request.path == "/v1/channels" and request.method == "GET":
        return await _channels(request, handler)
    if _RECORDING.match(request.path):
        return await _recording(request, handler)
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
    try:
        limit, offset = page_of(request)
    except RelayError:
        return await handler(request)  # its refusal, as on one node (a stranger's 401 before a bad limit's 400)
    # Each node's first offset + limit (its own filters as given): the caller's page is among them.
    query = {**request.query, "limit": str(min(offset + limit, MERGE_WINDOW)), "offset": "0"}
    own = request.clone(rel_url=request.rel_url.with_query(query))
    own[FROM_NODE] = request.app[CLUSTER].node_id
    answer = await handler(own)
    if answer.status != 200:  # a refusal (/odyssey renders its own; /v1's are raised): the caller's answer
        return answer
    parts: list[dict[str, Any] | None] = [json.loads(answer.body)]
    if offset + limit > MERGE_WINDOW:
        raise invalid_request(f"In a cluster, 'offset' + 'limit' must be at most {MERGE_WINDOW}.", field="offset",
                              limit=MERGE_WINDOW)
    others = await _others(request)
    parts += await asyncio.gather(*(_part(request, node, query, field) for node in others))
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


async def _channels(request: web.Request, handler) -> web.Response:
    """A key's channels at every node, oldest first as on one node; not paged (a key has few: [limits]
    channels_per_key at each node). A node that does not answer in time is left out (partial)."""
    own = request.clone()
    own[FROM_NODE] = request.app[CLUSTER].node_id
    answer = await handler(own)  # a stranger's 401 before any other node is asked
    if answer.status != 200:
        return answer
    channels = json.loads(answer.body)["channels"]
    others = await _others(request)
    parts = await asyncio.gather(*(_part(request, node, dict(request.query), "channels") for node in others))
    missing = [node.node_id for node, part in zip(others, parts) if part is None]
    for part in parts:
        channels += part["channels"] if part is not None else []
    channels.sort(key=lambda channel: channel.get("created_at") or "")
    return web.json_response({"channels": channels, "total": len(channels), "partial": bool(missing),
                              "missing_nodes": missing})


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


async def _recording(request: web.Request, handler) -> web.StreamResponse:
    try:  # here, or refused here (a stranger's key, a bad link): as on one node
        answer: web.StreamResponse | RelayError = await handler(request)
        if answer.status != 404:  # /odyssey renders its refusals (in its own shape), /v1 raises them
            return answer
    except RelayError as err:
        if err.status != 404:
            raise
        answer = err
    others = await _others(request)
    statuses = await asyncio.gather(*(_probe(request, node) for node in others))
    statuses = [None if status is not None and status >= 500 else status for status in statuses]  # as silent
    for node, status in zip(others, statuses):
        if status is not None and status != 404:  # it has it (200, 206, a 416 for a bad Range on it)
            return await carry(request, node)
    silent = [node for node, status in zip(others, statuses) if status is None]
    if silent:  # it may be there: not a 404 that would be untrue once the node answers again
        raise unreachable(silent[0], TimeoutError("no answer to a recording lookup"))
    if isinstance(answer, RelayError):
        raise answer
    return answer  # nowhere: this node's 404


async def _probe(request: web.Request, node: NodeInfo) -> int | None:
    """The node's status for the same call (HEAD: no body), or None when it does not answer in time (a 5xx
    is read as no answer by the caller: the recording may be there)."""
    session = request.app[CARRIER].session
    try:
        async with session.head(node.public_url + request.raw_path, headers=headers_out(request),
                                timeout=_timeout(request), allow_redirects=False) as answer:
            return answer.status
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return None
