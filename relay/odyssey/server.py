"""The local twin of the hosted world-model API, mounted at ``{public_url}/odyssey``.

With its API URL pointed here (``window.__ODYSSEY_API_URL__ = "<public_url>/odyssey"``, no trailing
slash: the SDK appends paths by concatenation), the official SDK (`@odysseyml/odyssey` 1.3.1) runs
unchanged against the relay's world model. This is one thin adapter: every rule is the core's.

    POST /auth/token {api_key}          -> {access_token, expires_in}        (an HS256 token bound to the key)
    GET  /regions                       -> {regions: []}                     (nothing to ping)
    POST /sessions/request              -> {session_id, signalling_url, capabilities}
                                           a relay Connection (reserves a streamer); 503 while none is
                                           free (the SDK polls for 30 s); 429 usage error at concurrent_streams
    POST /sessions/token {session_id}   -> {session_token (JWT, session_id claim), expires_in}
    GET  /signalling/config             -> {iceServers}                      (no TURN: it would force relay-only ICE)
    WS   /signalling/client/{session_id}?token=   the relay as the streamer (see SignallingSession)
    /simulation-jobs (POST, GET, GET {id}, DELETE {id})  -> relay.simulations
    GET  /recordings/{stream_id}, GET /stream-recordings -> relay.recordings (signed URLs, no header needed)

Errors are the hosted API's shape (``detail``; 429 usage errors as the SDK parses them), see
relay/worldmodel/hosted_protocol.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
from typing import Any

from aiohttp import WSMsgType, web

from ..auth import is_api_key
from ..clock import iso
from ..errors import RelayError, not_found, unauthorized, unprocessable
from ..host import HostCommands
from ..inputs import parse_json
from ..recordings import RecordingStore, owner_id
from ..sessions import Connection, SessionManager
from ..simulations.views import recordings_of, statuses_of
from ..web import (API_KEYS, GOING_AWAY, RECORDINGS, SESSIONS, SETTINGS, SIMULATIONS, close_within, json_response,
                   page_of, public_url, read_json, send_within, token_of)
from ..worldmodel import hosted_protocol as protocol
from .streamer import OwnerPeer

log = logging.getLogger(__name__)

PREFIX = "/odyssey"
CONNECT_TIMEOUT_SECONDS = 30.0  # offer sent -> peer connected; the SDK itself never gives up
COMMANDS_MAX = 32  # start/update/end waiting for their turn, per session
RECORDING_FIELDS = ("stream_id", "video_url", "events_url", "thumbnail_url", "preview_url", "frame_count",
                    "duration_seconds")


class Twin:
    """The twin's own state: its token secret, the API keys by owner hash, the live signalling sessions."""

    def __init__(self, api_keys: tuple[str, ...], store: RecordingStore) -> None:
        self._store = store
        self._secret: bytes | None = None
        self.keys = {owner_id(key): key for key in api_keys}
        self.live: dict[str, SignallingSession] = {}  # session_id -> its current signalling socket
        self.closing: set[asyncio.Task] = set()  # sessions' teardowns under way (awaited at shutdown)

    def use_secret(self, secret: bytes) -> None:
        """Clustered: the key every node shares (relay/cluster), in place of this node's own."""
        self._secret = secret

    @property
    def secret(self) -> bytes:
        """The tokens' HS256 key: derived from the server's persistent signing secret (data_dir), so an
        SDK's access token (which it keeps for an hour and never retries on 401) survives a restart."""
        if self._secret is None:
            self._secret = hmac.new(self._store.secret, b"relay/odyssey tokens", hashlib.sha256).digest()
        return self._secret


TWIN = web.AppKey("odyssey_twin", Twin)


# -- errors in the hosted shape ------------------------------------------------------------------

@web.middleware
async def hosted_errors(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except RelayError as err:
        return web.json_response(protocol.error_body(err), status=err.status, headers=err.headers())


def _api_key(request: web.Request) -> str:
    """The API key behind the request's access token (Authorization: Bearer, from /auth/token)."""
    twin = request.app[TWIN]
    claims = protocol.jwt_decode(token_of(request), twin.secret, now=request.app[SESSIONS].clock.time(),
                                 typ="access")
    key = twin.keys.get(claims["sub"]) if claims else None
    if key is None:
        raise unauthorized("A valid access token is required (POST /odyssey/auth/token with your API key).")
    return key


routes = web.RouteTableDef()


# -- auth, regions, sessions ---------------------------------------------------------------------

@routes.post("/auth/token")
async def auth_token(request: web.Request) -> web.Response:
    body = await read_json(request)
    api_key = body.get("api_key")
    if not isinstance(api_key, str) or not api_key:
        raise unprocessable("'api_key' must be a non-empty string.", field="api_key")
    if not is_api_key(api_key, request.app[API_KEYS]):
        raise unauthorized("Invalid API key")
    now = request.app[SESSIONS].clock.time()
    token = protocol.jwt_encode({"typ": "access", "sub": owner_id(api_key), "iat": int(now),
                                 "exp": int(now) + protocol.ACCESS_TOKEN_SECONDS}, request.app[TWIN].secret)
    return json_response({"access_token": token, "token_type": "bearer",
                          "expires_in": protocol.ACCESS_TOKEN_SECONDS})


@routes.get("/regions")
async def regions(request: web.Request) -> web.Response:
    _api_key(request)
    return json_response({"regions": []})  # one relay, one place: the SDK then skips its pings


def signalling_url(request: web.Request) -> str:
    # http(s), absolute, no trailing slash: the SDK derives {…}/config and ws(s)://…/client/{id} from it.
    return f"{public_url(request)}{PREFIX}/signalling"


@routes.post("/sessions/request")
async def request_session(request: web.Request) -> web.Response:
    key = _api_key(request)
    await read_json(request)  # {} or {region_latencies}: one relay, nothing to choose
    sessions = request.app[SESSIONS]
    # The hosted API refuses a session here when the key is at its stream limit: it is the only
    # place the SDK turns a 429 into its ConcurrentLimitReachedError. The rule is the core's.
    sessions.check_stream_quota(key)
    conn = await sessions.open_connection(key)  # 503 STREAMER_NOT_AVAILABLE: the SDK polls every second
    return json_response({
        "session_id": conn.connection_id,
        "signalling_url": signalling_url(request),
        # The relay's own API takes an image with the prompt; the SDK checks this before sending one.
        "capabilities": {"image_to_video": True},
    })


def _owned_connection(request: web.Request, key: str, session_id: Any) -> Connection:
    conn = request.app[SESSIONS].connections.get(session_id) if isinstance(session_id, str) else None
    if conn is None or conn.closed or conn.api_key != key:
        raise RelayError("NOT_FOUND", 404, "Session not found or not authorized", action="Request a new session.",
                         details={"session_id": session_id if isinstance(session_id, str) else None})
    return conn


@routes.post("/sessions/token")
async def session_token(request: web.Request) -> web.Response:
    key = _api_key(request)
    body = await read_json(request)
    conn = _owned_connection(request, key, body.get("session_id"))
    sessions = request.app[SESSIONS]
    ttl = request.app[SETTINGS].limits.client_token_seconds
    now = sessions.clock.time()
    token = protocol.jwt_encode({"typ": "session", "session_id": conn.connection_id, "sub": owner_id(key),
                                 "iat": int(now), "exp": int(now + ttl)}, request.app[TWIN].secret)
    return json_response({"session_token": token, "expires_in": int(ttl)})


@routes.get("/signalling/config")
async def signalling_config(request: web.Request) -> web.Response:
    # A "turn:" URL switches the SDK to relay-only ICE (L1685); the relay's own peer uses no TURN either.
    servers = [s for s in request.app[SETTINGS].webrtc.ice_servers
               if not any(u.startswith("turn") for u in s["urls"])]
    return json_response({"iceServers": servers})


# -- the signalling socket -----------------------------------------------------------------------

class SignallingSession:
    """One SDK signalling socket: the relay offers, the SDK answers; commands reach the core in order.

    The open socket keeps the connection alive, as the relay's control socket does. The SDK's
    ``client_disconnecting`` closes the connection at once (the streamer is free); a socket that
    closes without it, or a peer that fails, only ends this socket: the core's idle timeout then
    reaps the connection. Core events (stream started and ended, prompts acknowledged, the
    connection closing) reach the SDK from the connection's event outbox, whoever caused them.
    """

    def __init__(self, request: web.Request, conn: Connection, ws: web.WebSocketResponse) -> None:
        self.request = request
        self.sessions: SessionManager = request.app[SESSIONS]
        self.conn = conn
        self.host = HostCommands(self.sessions, conn, public_url(request))
        self.ws = ws
        self._max_depth = request.app[SETTINGS].server.max_json_depth
        self.peer = OwnerPeer(conn.broadcast, on_message=self._from_channel, on_state=self._peer_state,
                              max_json_depth=self._max_depth)
        self._commands: asyncio.Queue[dict[str, Any]] = asyncio.Queue(COMMANDS_MAX)
        self._outbox: asyncio.Queue | None = None
        self._tasks: set[asyncio.Task] = set()
        self.client_left = False
        self._connected = False
        self.closed = False
        self._twin: Twin = request.app[TWIN]
        self._closing: asyncio.Task | None = None

    def _spawn(self, coro, name: str) -> None:
        task = asyncio.create_task(coro, name=f"odyssey-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def run(self) -> None:
        self._outbox = self.conn.listen()
        self._spawn(self._pump(self._outbox), "events")
        self._spawn(self._work(), "commands")
        offer = await self.peer.create_offer()
        # Every send has the socket's deadline: an SDK that stops reading is cut off (1008), never waited on.
        seconds = self.request.app[SETTINGS].server.send_timeout_seconds
        if not await send_within(self.request, self.ws, json.dumps({"type": protocol.OFFER, "sdp": offer}), seconds):
            return
        self._spawn(self._connect_deadline(), "connect-deadline")
        async for msg in self.ws:
            if msg.type != WSMsgType.TEXT or self.conn.closed:
                continue
            self.sessions.touch(self.conn)
            try:
                message = parse_json(msg.data, self._max_depth)
            except RelayError as err:
                # Not `error`: the SDK takes that as the session's end. Any other type it ignores.
                if not await send_within(self.request, self.ws, json.dumps(protocol.invalid_message(err)), seconds):
                    break
                continue
            if isinstance(message, dict):
                await self._signal(message)
            if self.client_left or self.conn.closed:
                break

    async def _signal(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == protocol.ANSWER:
            sdp = message.get("sdp")
            try:
                if not isinstance(sdp, str):
                    raise ValueError("'sdp' must be a string")
                await self.peer.accept_answer(sdp)
            except Exception as exc:
                log.info("odyssey: answer refused: %s", exc, extra={"connection_id": self.conn.connection_id})
                await self.end("invalid_answer")
        elif kind == protocol.ICE_CANDIDATE:
            try:
                await self.peer.add_candidate(message)
            except Exception as exc:  # one bad candidate is not worth the session
                log.info("odyssey: candidate ignored: %s", exc)
        elif kind == protocol.CLIENT_DISCONNECTING:
            self.client_left = True
            await self.sessions.close_connection(self.conn, "disconnected")  # frees the streamer now
        elif kind in (protocol.STREAM_START, protocol.UPDATE, protocol.STREAM_END):
            self._enqueue(message)
        # keepalive (already counted as a sign of life) and unknown types: nothing to do

    def _from_channel(self, message: dict[str, Any]) -> None:
        if self.closed or self.conn.closed:
            return
        self.sessions.touch(self.conn)
        if message.get("type") in (protocol.STREAM_START, protocol.UPDATE, protocol.STREAM_END):
            self._enqueue(message)

    def _enqueue(self, message: dict[str, Any]) -> None:
        try:
            self._commands.put_nowait(message)
        except asyncio.QueueFull:
            self.peer.send(protocol.stream_error("rate_limited", "Too many commands at once; slow down."))

    async def _work(self) -> None:
        """Start, update, end: one at a time and in order, so every update is acknowledged in turn."""
        while True:
            message = await self._commands.get()
            try:
                await self._command(message)
            except RelayError as err:
                self.peer.send(protocol.stream_error_from(err))
            except Exception:
                log.exception("odyssey: command failed", extra={"connection_id": self.conn.connection_id})
                self.peer.send(protocol.stream_error("internal", "Internal error."))

    async def _command(self, message: dict[str, Any]) -> None:
        if self.conn.closed:
            return
        kind = message["type"]
        if kind == protocol.STREAM_START:
            prompt, image, portrait, broadcast = protocol.parse_stream_start(message)
            # broadcast_ready only when the SDK asked for a broadcast; it reaches the SDK from the outbox
            await self.host.start(prompt, image=image, portrait=portrait, announce=broadcast)
        elif kind == protocol.UPDATE:
            await self.host.interact(message.get("prompt"))
        else:
            try:
                await self.host.end()
            except RelayError as err:  # an end with nothing live: already ended (the SDK waits for stream_ended)
                if err.code != "NO_ACTIVE_STREAM":
                    raise
                self.peer.send({"type": protocol.STREAM_ENDED})

    async def _pump(self, outbox: asyncio.Queue) -> None:
        """The connection's events, in the SDK's words."""
        peer = self.peer
        while True:
            event = await outbox.get()
            kind = event.get("type")
            if kind == "stream_started":
                peer.send({"type": protocol.STREAM_STARTED, "stream_id": event["stream_id"],
                           "applied_prompt": event.get("prompt")})
            elif kind == "broadcast_ready":
                b = event["broadcast"]
                peer.send({"type": protocol.BROADCAST_READY, "webrtc_url": b["webrtc_url"],
                           "spectator_token": b["spectator_token"], "broadcast_url": b.get("hls_url")})
            elif kind == "interact_acknowledged":
                peer.send({"type": protocol.UPDATE_ACKNOWLEDGED, "prompt": event["prompt"]})
            elif kind == "stream_ended":
                reason = event.get("reason")
                if reason in protocol.STREAM_END_ERRORS:
                    code, text = protocol.STREAM_END_ERRORS[reason]
                    if reason == "duration_limit":
                        limit = self.request.app[SETTINGS].limits.stream_max_seconds
                        text = f"The stream reached its maximum duration of {limit:g} s."
                    peer.send(protocol.stream_error(code, text))
                peer.send({"type": protocol.STREAM_ENDED, "stream_id": event.get("stream_id"), "reason": reason})
            elif kind == "disconnected":
                if not self.client_left:
                    reason = event.get("reason", "")
                    await self.end(protocol.CONNECTION_CLOSE_REASONS.get(reason, reason or "unknown"))
                return

    def _peer_state(self, state: str) -> None:
        if state == "connected":
            self._connected = True
        elif state == "failed" and not self.closed:
            self._spawn(self.end("peer_connection_failed"), "peer-failed")

    async def _connect_deadline(self) -> None:
        await asyncio.sleep(CONNECT_TIMEOUT_SECONDS)
        if not self._connected and not self.closed:
            await self.end("connection_timeout")

    async def end(self, reason: str) -> None:
        """Tell the SDK (its only server-side end: `error`, then the close) and close the socket:
        1001 "shutdown" when the relay is stopping. Each bounded by send_timeout_seconds, so an SDK
        that stopped reading cannot hold the socket (it is cut off with 1008 "too slow")."""
        if self.ws.closed:
            return
        seconds = self.request.app[SETTINGS].server.send_timeout_seconds
        try:
            if not await send_within(self.request, self.ws, json.dumps({"type": protocol.ERROR, "reason": reason}),
                                     seconds):
                return
        except (ConnectionError, RuntimeError):
            pass
        if self.sessions.closed:
            await close_within(self.request, self.ws, GOING_AWAY, b"shutdown", seconds)
        else:
            await close_within(self.request, self.ws, 1000, b"", seconds)

    async def close(self) -> None:
        """Everything this session holds; safe to call twice and from any task.

        The work runs in its own task, shielded: aiohttp cancels the socket's handler once the peer
        is gone, and a peer connection closed halfway would keep its sockets open.
        """
        if self._closing is None:
            self.closed = True
            self._closing = asyncio.create_task(self._close(), name="odyssey-close")
            self._twin.closing.add(self._closing)
            self._closing.add_done_callback(self._twin.closing.discard)
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        if self._outbox is not None:
            self.conn.unlisten(self._outbox)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.peer.close()
        if not self.ws.closed:
            await self.ws.close()


@routes.get("/signalling/client/{session_id}")
async def signalling_client(request: web.Request) -> web.WebSocketResponse:
    twin, sessions = request.app[TWIN], request.app[SESSIONS]
    session_id = request.match_info["session_id"]
    claims = protocol.jwt_decode(request.query.get("token"), twin.secret, now=sessions.clock.time(), typ="session")
    if claims is None or claims.get("session_id") != session_id:
        raise unauthorized("A valid session token for this session is required (POST /odyssey/sessions/token).")
    settings = request.app[SETTINGS]
    ws = web.WebSocketResponse(heartbeat=20, max_msg_size=max(settings.server.max_body_bytes, 64 * 1024))
    await ws.prepare(request)
    conn = sessions.connections.get(session_id)
    if conn is None or conn.closed or owner_id(conn.api_key) != claims.get("sub"):
        await ws.send_json({"type": protocol.ERROR, "reason": "session_not_found"})
        await ws.close()
        return ws
    session = SignallingSession(request, conn, ws)
    previous, twin.live[session_id] = twin.live.get(session_id), session
    if previous is not None:  # the SDK reconnected: one peer per session, the newest wins
        await previous.close()
    sessions.control_opened(conn)
    try:
        await session.run()
    except (ConnectionError, asyncio.CancelledError):
        raise
    except Exception:
        log.exception("odyssey: signalling session failed", extra={"connection_id": conn.connection_id})
    finally:
        # Bookkeeping before any await: aiohttp may cancel this handler once the peer is gone.
        sessions.control_closed(conn)
        if twin.live.get(session_id) is session:
            del twin.live[session_id]
        await session.close()
    return ws


# -- simulations ----------------------------------------------------------------------------------

def _job_summary(job) -> dict[str, Any]:
    return {"job_id": job.job_id, "status": job.status, "priority": "normal", "created_at": iso(job.created_at),
            "completed_at": iso(job.completed_at), "error_message": job.error_message}


async def _job_detail(request: web.Request, job) -> dict[str, Any]:
    store: RecordingStore = request.app[RECORDINGS]
    metas = await asyncio.to_thread(recordings_of, store, job)
    streams = []
    for meta in metas:
        body = store.body(meta, public_url(request))
        entry = {name: body.get(name) for name in RECORDING_FIELDS}
        entry["script_index"] = job.stream_ids.index(meta["stream_id"]) if meta["stream_id"] in job.stream_ids else 0
        streams.append(entry)
    return {**_job_summary(job), "dispatched_at": iso(job.dispatched_at), "started_at": iso(job.started_at),
            "assigned_region": None, "retry_count": job.retry_count, "streams": streams}


@routes.post("/simulation-jobs")
async def submit_simulation(request: web.Request) -> web.Response:
    key = _api_key(request)
    body = await read_json(request)
    if "script_url" in body:
        raise unprocessable("'script_url' is not supported by the relay: send 'script' or 'scripts'.",
                            field="script_url")
    # The SDK always sends output_video (and bypass_vlm_expansion when asked): the relay always
    # records video and expands no prompts, so neither changes anything here.
    core = {name: body[name] for name in ("script", "scripts", "portrait") if name in body}
    accepted = await request.app[SIMULATIONS].submit(key, core)  # 429 SIMULATION_QUEUE_FULL at the quota
    wait = accepted.get("estimated_wait_seconds")
    return json_response({
        "job_id": accepted["job_id"],
        "status": accepted["status"],
        "priority": "normal",
        "created_at": accepted["created_at"],
        "estimated_wait_minutes": None if wait is None else math.ceil(wait / 6) / 10,
    })


@routes.get("/simulation-jobs")
async def list_simulations(request: web.Request) -> web.Response:
    key = _api_key(request)
    statuses = statuses_of(request.query.get("status"), request.query.get("active"))
    limit, offset = page_of(request)
    jobs, total = await request.app[SIMULATIONS].list(key, statuses, limit, offset)
    return json_response({"jobs": [_job_summary(j) for j in jobs], "total": total, "limit": limit,
                          "offset": offset})


@routes.get("/simulation-jobs/{job_id}")
async def get_simulation(request: web.Request) -> web.Response:
    key = _api_key(request)
    job = await request.app[SIMULATIONS].get(key, request.match_info["job_id"])
    return json_response(await _job_detail(request, job))


@routes.delete("/simulation-jobs/{job_id}")
async def cancel_simulation(request: web.Request) -> web.Response:
    key = _api_key(request)
    try:
        job = await request.app[SIMULATIONS].cancel(key, request.match_info["job_id"])
    except RelayError as err:
        if err.code == "NOT_CANCELLABLE":  # the hosted API says 400 with a string detail; the SDK shows it
            raise RelayError(err.code, 400, err.message, action=err.action, details=err.details) from None
        raise
    return json_response({"job_id": job.job_id, "status": job.status})


# -- recordings -----------------------------------------------------------------------------------

@routes.get("/recordings/{stream_id}")
async def get_recording(request: web.Request) -> web.Response:
    key = _api_key(request)
    store: RecordingStore = request.app[RECORDINGS]
    stream_id = request.match_info["stream_id"]
    meta = await asyncio.to_thread(store.get, stream_id)
    if meta is None or meta.get("owner") != owner_id(key):
        raise not_found("recording", stream_id)
    body = store.body(meta, public_url(request))  # signed URLs: playable without a header, for an hour
    return json_response({name: body.get(name) for name in RECORDING_FIELDS})


@routes.get("/stream-recordings")
async def list_stream_recordings(request: web.Request) -> web.Response:
    key = _api_key(request)
    limit, offset = page_of(request)
    page, total = await asyncio.to_thread(request.app[RECORDINGS].list, owner_id(key), limit, offset)
    return json_response({"recordings": [RecordingStore.summary(m) for m in page], "total": total,
                          "limit": limit, "offset": offset})


# -- the sub-application --------------------------------------------------------------------------

async def _shutdown(app: web.Application) -> None:
    """Before the server stops: tell every SDK (`error`, then close) and release every peer."""
    twin = app[TWIN]
    sessions = list(twin.live.values())
    await asyncio.gather(*(s.end("streamer_disconnected") for s in sessions), return_exceptions=True)
    await asyncio.gather(*(s.close() for s in sessions), *list(twin.closing), return_exceptions=True)


def create_odyssey_app(parent: web.Application) -> web.Application:
    """The twin as a sub-application of the relay's app (mount it at PREFIX); shares the parent's core."""
    app = web.Application(middlewares=[hosted_errors])
    for key in (SETTINGS, API_KEYS, SESSIONS, RECORDINGS, SIMULATIONS):
        app[key] = parent[key]  # relay/web.py's helpers read them from request.app
    # On the parent too: ops and tests find it there.
    app[TWIN] = parent[TWIN] = Twin(parent[API_KEYS], parent[RECORDINGS])
    app.router.add_routes(routes)
    app.on_shutdown.append(_shutdown)
    return app


__all__ = ["PREFIX", "TWIN", "Twin", "SignallingSession", "create_odyssey_app"]
