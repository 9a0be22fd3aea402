"""What both HTTP adapters (relay/api and relay/odyssey) share: the app's typed state, the caller's
token, JSON in and out, the public URL, and the sockets' send and close deadlines.

No rule of the relay lives here: only how an aiohttp request or socket is read and answered.
"""

from __future__ import annotations

import asyncio
import ipaddress
from functools import lru_cache
from typing import Any, Callable

from aiohttp import web

from .config import Settings
from .errors import invalid_request, too_large, unsupported_media_type
from .inputs import parse_json
from .recordings import RecordingStore
from .sessions import SessionManager
from .simulations import Simulations

SETTINGS = web.AppKey("settings", Settings)
SESSIONS = web.AppKey("sessions", SessionManager)
API_KEYS = web.AppKey("api_keys", tuple)
RECORDINGS = web.AppKey("recordings", RecordingStore)
SIMULATIONS = web.AppKey("simulations", Simulations)
# Clustered only ([cluster] redis_url): the relay.cluster.node.Cluster (None on one node); whether a request
# comes from another relay node (an edge's WHEP feed: uncounted, uncapped); and this node's edges (the
# relay.cluster.edge.EdgeManager serving other nodes' broadcasts here), set only when clustered.
CLUSTER = web.AppKey("cluster", object)
IS_NODE = web.AppKey("is_node", Callable[[web.Request], bool])
EDGES = web.AppKey("edges", object)
# Clustered only: the relay.cluster.audience_link.AudienceLink serving participants of other nodes' broadcasts here.
AUDIENCE_LINK = web.AppKey("audience_link", object)
FORWARDED_CLIENT = "relay.forwarded_client"  # request key: the caller's address, when another node forwarded it
FROM_NODE = "relay.from_node"  # request key: set when another node of the cluster (or this one's merge) asks

# A page of a listing: at most PAGE_LIMIT items. A node asked for its part of a cluster's merged page
# answers up to MERGE_WINDOW (offset + limit of the caller's page; relay/cluster/spread.py).
PAGE_LIMIT = 100
MERGE_WINDOW = 10_000

# WebSocket close codes the relay's sockets end with (beside 1000 and the events socket's 4001).
GOING_AWAY = 1001  # "shutdown": the relay is stopping
TOO_SLOW = 1008  # "too slow": the reader did not take its messages in time (a policy, as an overflowed outbox)


def body_limit(limit_of: Callable[[Settings], int]):
    """A handler's own bound on its body, below max_body_bytes (a WHEP offer's, say). The app's
    body_deadline middleware refuses a longer declared body with 413 before reading a byte of it."""
    def mark(handler):
        handler.body_limit = limit_of
        return handler
    return mark


def client_address(request: web.Request) -> str:
    """Whom the per-address caps count (pending WHEP sessions, events sockets, votes).

    The TCP peer; behind a reverse proxy listed in [server] trusted_proxies, the client it forwarded: the
    rightmost X-Forwarded-For entry that is not itself a trusted proxy (entries to its left are the
    client's own word). An IPv6 address counts by its /64, which one host commonly holds whole."""
    forwarded = request.get(FORWARDED_CLIENT)
    if forwarded:  # set only for a call another node of the cluster signed (relay/cluster/forward.py)
        return forwarded
    peer = request.remote or "unknown"
    trusted = _networks(request.app[SETTINGS].server.trusted_proxies)
    if trusted and _within(peer, trusted):
        for hop in reversed(request.headers.get("X-Forwarded-For", "").split(",")):
            hop = hop.strip()
            if hop and not _within(hop, trusted):
                peer = hop
                break
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return peer[:64]  # not an IP address (a unix socket, a proxy's junk): counted as it is, bounded
    if address.version == 6:
        if address.ipv4_mapped is not None:  # ::ffff:a.b.c.d is the IPv4 client a.b.c.d
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


@lru_cache(maxsize=8)
def _networks(cidrs: tuple[str, ...]) -> tuple:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


def _within(address: str, networks: tuple) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def bearer_of(request: web.Request) -> str | None:
    """The ``Authorization: Bearer`` header's token only."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def token_of(request: web.Request) -> str | None:
    """Bearer header first; ``?token=`` for browsers (WebSockets, WHEP players) that cannot set one."""
    return bearer_of(request) or request.query.get("token") or None


async def read_json(request: web.Request) -> dict[str, Any]:
    if request.content_type not in ("application/json", "") and not request.content_type.endswith("+json"):
        raise unsupported_media_type("application/json")
    raw = await request.read()  # bounded by the app's client_max_size (413 beyond)
    if not raw.strip():
        return {}
    body = parse_json(raw, request.app[SETTINGS].server.max_json_depth)
    if not isinstance(body, dict):
        raise invalid_request("The body must be a JSON object.")
    return body


async def read_sdp(request: web.Request, content_type: str = "application/sdp") -> str:
    """A WHEP or WHIP body (an offer, or a PATCH's trickled candidates): of ``content_type``, at most
    limits.whep_offer_max_bytes (the handler's body_limit refuses a longer declared one before it is read)."""
    if request.content_type != content_type:
        raise unsupported_media_type(content_type)
    body, limit = await request.read(), request.app[SETTINGS].limits.whep_offer_max_bytes
    if len(body) > limit:  # a chunked body: a declared one was refused before it was read
        raise too_large(limit)
    return body.decode("utf-8", errors="replace")


def query_int(request: web.Request, name: str, default: int, maximum: int) -> int:
    """An integer query parameter (limit, offset) within [0, maximum]; 400 otherwise."""
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise invalid_request(f"'{name}' must be an integer.", field=name) from None
    if not 0 <= value <= maximum:
        raise invalid_request(f"'{name}' must be between 0 and {maximum}.", field=name)
    return value


def page_of(request: web.Request) -> tuple[int, int]:
    """A listing's (limit, offset) from its query: limit 20 by default, at most PAGE_LIMIT (a node's part
    of a merged page: MERGE_WINDOW)."""
    limit = query_int(request, "limit", 20, MERGE_WINDOW if request.get(FROM_NODE) else PAGE_LIMIT)
    return limit, query_int(request, "offset", 0, 10**9)


def public_url(request: web.Request) -> str:
    configured = request.app[SETTINGS].server.public_url
    return configured or f"{request.scheme}://{request.host}"


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(data, status=status, headers=headers)


STALLED = object()  # next_for's answer for a socket whose reader stopped


async def next_for(request: web.Request, queue: asyncio.Queue, seconds: float) -> Any:
    """The next message for a socket's sender, or STALLED once the socket's reader has taken nothing
    for `seconds` while bytes wait for it: the handler's own replies (or aiohttp's pings) blocked on
    a peer that sends but never reads, with nothing for the sender to send meanwhile."""
    loop = asyncio.get_running_loop()
    waiting, since = 0, loop.time()
    while True:
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation that lands as
            # queue.get() completes, and the cancelled sender then waits on for ever (aiohttp's shutdown waited
            # out its 60 s for one such socket).
            async with asyncio.timeout(seconds / 2):
                return await queue.get()
        except TimeoutError:
            transport = request.transport
            now = transport.get_write_buffer_size() if transport is not None else 0
            if not now or now != waiting:  # drained, or moving: a reader is there
                waiting, since = now, loop.time()
            elif loop.time() - since >= seconds:  # not one byte taken (nor added) for a whole deadline
                return STALLED


async def send_within(request: web.Request, ws: web.WebSocketResponse, text: str, seconds: float) -> bool:
    """Send one message, or cut the socket off (1008 "too slow") when its reader has not taken it
    within `seconds`: a peer that stops reading must hold neither the sender nor a descriptor.
    False when the socket was cut off."""
    try:
        await asyncio.wait_for(ws.send_str(text), seconds)
        return True
    except asyncio.TimeoutError:
        await close_within(request, ws, TOO_SLOW, b"too slow", seconds)
        return False


async def close_within(request: web.Request, ws: web.WebSocketResponse, code: int, message: bytes,
                       seconds: float) -> None:
    """Close with a code, in `seconds` at most. The close frame queues behind whatever the peer has
    not read yet (a reader that catches up in time still learns why); the descriptor goes at
    `seconds` whether or not that backlog drained and the peer answered."""
    transport = request.transport
    if transport is not None:  # first, so it holds even if this is cancelled (the handler ended first);
        asyncio.get_running_loop().call_later(seconds, transport.abort)  # a no-op once closed by then
    try:
        await asyncio.wait_for(ws.close(code=code, message=message, drain=False), seconds)
    except asyncio.TimeoutError:
        pass
