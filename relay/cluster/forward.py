"""Any node answers any call: a call naming a connection, stream, broadcast or simulation job that another
live node owns is carried out by that node. This middleware forwards it (method, path, query, headers with the caller's
Authorization, body) and answers with the owner's status, headers and body, unchanged: not a redirect,
which clients follow without the Authorization header. WebSockets are proxied frame by frame, close codes
passed through. POST /v1/connections naming a channel (by id or slug) that another node keeps goes to that node (a
channel lives on its node's disk); otherwise, at a node with no free streamer, to a node that has one.
A channel whose node is down answers 503 CHANNEL_NODE_UNAVAILABLE at every node (Cluster.channel_node).

A forwarded call carries `X-Relay-Node` (the sending node's signed header) and `X-Relay-Client` (the
caller's address, which the per-address caps count): the owner believes the latter only with the former,
and never forwards a forwarded call again (no loops).

WHEP and HLS for a broadcast of another node are the edge's (request.app[EDGES]), and its events socket the
audience link's (relay/cluster/audience_link.py), served here; until they are installed they are forwarded
like any call.
"""

from __future__ import annotations

import asyncio
import logging
import re

import aiohttp
from aiohttp import WSMsgType, web

from .. import metrics
from ..auth import is_api_key, require_api_key
from ..errors import RelayError, not_found, unauthorized
from ..inputs import parse_json
from ..recordings import owner_id
from ..web import (API_KEYS, CLUSTER, EDGES, FORWARDED_CLIENT, FROM_NODE, SESSIONS, SETTINGS, SIMULATIONS,
                   client_address, token_of)
from .membership import NodeInfo

log = logging.getLogger(__name__)

NODE_HEADER = "X-Relay-Node"
CLIENT_HEADER = "X-Relay-Client"
# RFC 9110 7.6.1, plus what aiohttp sets itself for the new hop.
HOP_BY_HOP = frozenset(h.lower() for h in (
    "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailer", "Transfer-Encoding",
    "Upgrade", "Host", "Content-Length", NODE_HEADER, CLIENT_HEADER))
WS_HANDSHAKE = frozenset(h.lower() for h in (
    "Sec-WebSocket-Key", "Sec-WebSocket-Version", "Sec-WebSocket-Extensions", "Sec-WebSocket-Accept"))

# Paths that name a resource, and the kind of id each names. /odyssey's signalling session is the connection.
_ROUTES = (
    (re.compile(r"^/v1/connections/([^/]{1,128})(/.*)?$"), "connection"),
    (re.compile(r"^/v1/streams/([^/]{1,128})(/.*)?$"), "stream"),
    (re.compile(r"^/v1/broadcasts/([^/]{1,128})(/.*)?$"), "broadcast"),
    (re.compile(r"^/odyssey/signalling/client/([^/]{1,128})$"), "connection"),
    (re.compile(r"^/v1/simulations/([^/]{1,128})(/.*)?$"), "job"),
    (re.compile(r"^/odyssey/simulation-jobs/([^/]{1,128})$"), "job"),
    (re.compile(r"^/v1/channels/([^/]{1,128})$"), "channel"),  # by channel_id or the caller's slug
)
# Served by the node asked, whoever the origin: WHEP and HLS (as the broadcast's edge), the events socket
# (its origin's audience answers over Redis) and where to watch.
_EDGE_PATH = re.compile(r"^/v1/broadcasts/[^/]+/(whep(/[^/]+)?|hls/.*|events|nodes)$")


def _named(path: str) -> tuple[str, str] | None:
    for pattern, kind in _ROUTES:
        if m := pattern.match(path):
            return kind, m.group(1)
    return None


async def _local(request: web.Request, kind: str, ident: str) -> bool:
    if kind == "job":  # in this node's job store (a durable file: read off the event loop)
        store = request.app[SIMULATIONS].store
        return store is not None and await asyncio.to_thread(store.get, ident) is not None
    sessions = request.app[SESSIONS]
    if kind == "channel":
        return _channel_here(request, ident)
    if kind == "connection":
        return ident in sessions.connections
    if kind == "broadcast":
        return sessions.has_broadcast(ident)  # a channel's too, before anyone made it
    return sessions.knows_stream(ident)


@web.middleware
async def forward(request: web.Request, handler) -> web.StreamResponse:
    cluster = request.app[CLUSTER]
    if NODE_HEADER in request.headers:
        if (node_id := cluster.verify_node(request.headers[NODE_HEADER])) is not None:  # a node carried it here: ours
            request[FORWARDED_CLIENT] = request.headers.get(CLIENT_HEADER, "")[:64] or None
            request[FROM_NODE] = node_id
            return await handler(request)
    if request.method == "OPTIONS":
        return await handler(request)
    if request.path == "/v1/connections" and request.method == "POST":
        return await _place(request, handler)
    named = _named(request.path)
    if named is None or await _local(request, *named):
        return await handler(request)
    kind, ident = named
    if EDGES in request.app and kind == "broadcast" and _EDGE_PATH.match(request.path):
        return await handler(request)  # WHEP, HLS, events of another node's broadcast, /nodes: served here
    if kind == "channel":
        owner = await cluster.channel_node(owner_id(require_api_key(token_of(request), request.app[API_KEYS])),
                                           ident)
    else:
        owner = await cluster.owner(kind, ident)
    if owner is None or owner.node_id == cluster.node_id:
        return await handler(request)  # unknown, gone with its node, or closing here: 401/404 as ever
    return await carry(request, owner)


async def _place(request: web.Request, handler) -> web.StreamResponse:
    """A connection on a channel opens at the channel's node; any other, at a node with no free streamer,
    on the live node with the most (503 when none has)."""
    sessions, cluster = request.app[SESSIONS], request.app[CLUSTER]
    if sessions.closed or not is_api_key(token_of(request), request.app[API_KEYS]):
        return await handler(request)  # a stranger costs no other node a call: 401 here
    body = await request.read()
    parsed = _parsed(request, body)
    channel = parsed.get("channel_id") if isinstance(parsed, dict) else None
    if isinstance(channel, str) and 0 < len(channel) <= 128:
        if _channel_here(request, channel):
            return await handler(request)  # this node's own answer: 201, 409, 503 STREAMER_NOT_AVAILABLE
        node = await cluster.channel_node(owner_id(token_of(request) or ""), channel)
        if node is None or node.node_id == cluster.node_id:
            return await handler(request)  # no such channel: 404 here
        return await carry(request, node, body=body)
    if sessions.streamers_free > 0 or not isinstance(parsed, dict) or "channel_id" in parsed:
        return await handler(request)  # a bad body or channel_id is the handler's to answer (400/404)
    others = sorted((n for n in await cluster.nodes() if n.node_id != cluster.node_id and n.streamers_free > 0),
                    key=lambda n: -n.streamers_free)
    for node in others:
        response = await carry(request, node, body=body, placing=True)
        if response is not None:
            return response
    return await handler(request)  # nobody had one: this node's own 503 STREAMER_NOT_AVAILABLE


def _parsed(request: web.Request, body: bytes) -> object:
    """The body as JSON, or None when it is not (the handler answers 400)."""
    try:
        return parse_json(body, request.app[SETTINGS].server.max_json_depth) if body.strip() else {}
    except RelayError:
        return None


def _channel_here(request: web.Request, ref: str) -> bool:
    """Whether this node keeps channel `ref`: by id (anyone's: the handler checks the key), or by the caller's slug."""
    store = request.app[SESSIONS].channels
    if store is None:
        return False
    if store.has(ref):
        return True
    token = token_of(request)
    if not is_api_key(token, request.app[API_KEYS]):
        return False
    try:
        store.get(owner_id(token or ""), ref)
    except RelayError:
        return False
    return True


def headers_out(request: web.Request) -> dict[str, str]:
    cluster = request.app[CLUSTER]
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
    headers[NODE_HEADER] = cluster.node_authorization()
    headers[CLIENT_HEADER] = client_address(request)
    return headers


async def carry(request: web.Request, node: NodeInfo, *, body: bytes | None = None,
                placing: bool = False) -> web.StreamResponse | None:
    """The owner's answer to this request. A placement that the node refuses for want of a streamer
    (it filled meanwhile) answers None: try the next."""
    if request.headers.get("Upgrade", "").lower() == "websocket":
        return await _carry_socket(request, node)
    session = request.app[CARRIER].session
    if body is None:
        body = await request.read() if request.body_exists else None
    metrics.CLUSTER_FORWARDED.inc()
    try:
        async with session.request(request.method, node.public_url + request.raw_path, headers=headers_out(request),
                                   data=body, allow_redirects=False) as upstream:
            if placing and upstream.status == 503:
                return None
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers={
                k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP or k.lower() == "content-length"})
            await response.prepare(request)
            async for chunk in upstream.content.iter_chunked(64 * 1024):
                await response.write(chunk)
            await response.write_eof()
            return response
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        if placing:
            return None
        raise unreachable(node, exc) from None


def unreachable(node: NodeInfo, exc: BaseException) -> RelayError:
    """Its node still heart-beats (or did within node_timeout) but does not answer: retry shortly; once it
    has left the cluster, its ids answer 404."""
    log.warning("cluster: node %s did not answer: %s", node.node_id, exc)
    return RelayError("NODE_UNAVAILABLE", 503, "The node that serves this resource does not answer.",
                      action="Retry shortly.", details={"node_id": node.node_id}, retry_after=2)


async def _carry_socket(request: web.Request, node: NodeInfo) -> web.StreamResponse:
    settings = request.app[SETTINGS].server
    session = request.app[CARRIER].session
    headers = {k: v for k, v in headers_out(request).items() if k.lower() not in WS_HANDSHAKE}
    url = node.public_url.replace("http", "ws", 1) + request.raw_path
    limit = max(settings.max_body_bytes, 64 * 1024)
    metrics.CLUSTER_FORWARDED.inc()
    try:
        upstream = await session.ws_connect(url, headers=headers, max_msg_size=limit, autoclose=False,
                                            timeout=aiohttp.ClientWSTimeout(ws_close=settings.send_timeout_seconds))
    except aiohttp.WSServerHandshakeError as exc:  # the owner refused the socket: its status, in our shape
        kind, ident = _named(request.path) or ("resource", "")
        raise (unauthorized() if exc.status == 401 else not_found(kind, ident) if exc.status == 404 else
               RelayError("INVALID_REQUEST", exc.status, exc.message or "Refused.")) from None
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise unreachable(node, exc) from None
    ws = web.WebSocketResponse(max_msg_size=limit, autoclose=False)
    try:
        await ws.prepare(request)
        await _pump(ws, upstream, settings.send_timeout_seconds)
    finally:
        await upstream.close()
    return ws


async def _pump(ws: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse, seconds: float) -> None:
    """Frames both ways until either side closes; the other side is closed with the same code and reason."""
    async def copy(source, sink) -> tuple[int, bytes]:
        while True:
            msg = await source.receive()
            if msg.type == WSMsgType.TEXT:
                await asyncio.wait_for(sink.send_str(msg.data), seconds)
            elif msg.type == WSMsgType.BINARY:
                await asyncio.wait_for(sink.send_bytes(msg.data), seconds)
            elif msg.type == WSMsgType.CLOSE:
                return msg.data or 1000, (msg.extra or "").encode()
            elif msg.type in (WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                return source.close_code or 1006, b""

    down = asyncio.create_task(copy(upstream, ws), name="relay-forward-down")
    up = asyncio.create_task(copy(ws, upstream), name="relay-forward-up")
    try:
        done, _ = await asyncio.wait((down, up), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (down, up):
            task.cancel()
        await asyncio.gather(down, up, return_exceptions=True)
    first = done.pop()
    code, reason = (1011, b"") if first.cancelled() or first.exception() else first.result()
    code = code if 1000 <= code < 5000 and code not in (1005, 1006, 1015) else 1011
    await asyncio.wait_for(asyncio.gather(ws.close(code=code, message=reason), upstream.close(code=code, message=reason),
                                          return_exceptions=True), seconds)


class Carrier:
    """The middleware's HTTP client to the other nodes: opened with the app, closed with it."""

    def __init__(self, connect_seconds: float) -> None:
        self._connect_seconds = connect_seconds
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        # Connecting to a node is quick or it is away; an answer may take as long as the owner's own work.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self._connect_seconds,
                                        sock_read=max(60.0, self._connect_seconds))
        # No pool limit: each outbound call stands for one inbound, which the owner bounds (per address,
        # per broadcast) as if it came straight; a pool cap would stall proxied sockets instead.
        self.session = aiohttp.ClientSession(timeout=timeout, auto_decompress=False,
                                             connector=aiohttp.TCPConnector(limit=0))

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


CARRIER = web.AppKey("cluster_carrier", Carrier)
