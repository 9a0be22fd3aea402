"""The aiohttp application: state, middlewares (errors, CORS), routes, lifecycle."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_protocol import RequestHandler

from ..channels import ChannelStore
from ..cluster import forward, spread
from ..cluster.audience_link import AudienceLink
from ..cluster.edge import EdgeManager
from ..cluster.node import Cluster
from ..config import Settings, hosted_api_key
from ..errors import RelayError, too_large
from ..media.webrtc import restrict_ice_host_addresses
from ..odyssey.server import PREFIX as ODYSSEY_PREFIX, TWIN, create_odyssey_app
from ..recordings import RecordingStore
from ..sessions import SessionManager
from ..simulations import Simulations
from ..web import API_KEYS, AUDIENCE_LINK, CLUSTER, EDGES, IS_NODE, RECORDINGS, SESSIONS, SETTINGS, SIMULATIONS
from ..worldmodel.base import WorldModel
from ..worldmodel.hosted import HostedWorldModel
from ..worldmodel.synthetic import SyntheticWorldModel
from ..worldmodel.whip import WhipWorldModel
from . import broadcasts, channels, connections, ops, orchestration, pages, recordings, simulations, whip

log = logging.getLogger(__name__)

WORLD_MODEL = web.AppKey("world_model", object)

CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, POST, PUT, PATCH, DELETE, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Content-Type, If-Match",
    "Access-Control-Expose-Headers": "Location, Retry-After, ETag, Link",
    "Access-Control-Max-Age": "600",
}

_STATUS_CODES = {400: "INVALID_REQUEST", 401: "UNAUTHORIZED", 403: "FORBIDDEN", 404: "NOT_FOUND",
                 405: "INVALID_REQUEST", 413: "INVALID_REQUEST", 415: "INVALID_REQUEST"}

# A refused request's unread body is read and dropped this long at most before the socket closes
# (so the client sees the answer, not a reset); aiohttp's 10 s would let a declared body hold it.
LINGER_SECONDS = 2.0


@web.middleware
async def cors(request: web.Request, handler) -> web.StreamResponse:
    # Players and host apps live on other origins; tokens travel in headers, never cookies,
    # so allowing any origin grants nothing a token does not.
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        return web.Response(status=204, headers=CORS_HEADERS)
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        exc.headers.update(CORS_HEADERS)
        raise
    if not response.prepared:
        response.headers.update(CORS_HEADERS)
    return response


@web.middleware
async def errors(request: web.Request, handler) -> web.StreamResponse:
    """Every failure leaves as the one JSON error shape."""
    try:
        return await handler(request)
    except RelayError as err:
        return _render(err)
    except web.HTTPRequestEntityTooLarge:
        return _render(too_large(request.app[SETTINGS].server.max_body_bytes))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _STATUS_CODES.get(exc.status, "INVALID_REQUEST" if exc.status < 500 else "INTERNAL")
        return _render(RelayError(code, exc.status, exc.reason or "Request failed."))
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unhandled error", extra={"path": request.path})
        return _render(RelayError("INTERNAL", 500, "Internal error.", action="Retry; report it if it persists."))


class _BodyTooSlow(Exception):
    """Set on a request's payload when its body_timeout_seconds pass before the body is whole."""


@web.middleware
async def body_deadline(request: web.Request, handler) -> web.StreamResponse:
    """A body is refused on its declared length before a byte of it is read, and must arrive whole
    within body_timeout_seconds of the headers: a peer that trickles it cannot hold a handler.

    The body is not read here: a handler reads it after its own checks (credentials first), so a
    stranger's unauthenticated body costs a 401, never max_body_bytes of memory held for the
    deadline. A timer fails the payload instead; a read that is waiting (or comes later) raises."""
    server = request.app[SETTINGS].server
    limit = server.max_body_bytes
    route_limit = getattr(request.match_info.route.handler, "body_limit", None)  # see web.body_limit
    if route_limit is not None:
        limit = min(limit, route_limit(request.app[SETTINGS]))
    if request.content_length is not None and request.content_length > limit:
        raise too_large(limit)
    if not request.body_exists:
        return await handler(request)

    def too_slow() -> None:
        if not request.content.is_eof():
            request.content.set_exception(_BodyTooSlow())

    timer = asyncio.get_running_loop().call_later(server.body_timeout_seconds, too_slow)
    try:
        return await handler(request)
    except _BodyTooSlow:
        raise RelayError("INVALID_REQUEST", 408, f"The request body did not arrive within "
                         f"{server.body_timeout_seconds:g} s.", action="Send the body at once.",
                         details={"limit_seconds": server.body_timeout_seconds}) from None
    finally:
        timer.cancel()


def _render(err: RelayError) -> web.Response:
    response = web.json_response(err.to_dict(), status=err.status, headers={**err.headers(), **CORS_HEADERS})
    if err.status in (408, 413):
        response.force_close()  # the rest of that body is not wanted on this socket
    return response


class _Protocol(RequestHandler):
    """aiohttp's connection handler, answering what its parser refuses (a header over 8 KB, too many
    headers, a malformed request) in the error shape too: that answer is made before any middleware."""

    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status >= 500:
            return super().handle_error(request, status, exc, message)  # logs the traceback, as it should
        if request.writer.output_size > 0:  # an answer is under way: nothing more can be said on it
            raise ConnectionError("Response is sent already")
        # A stranger's malformed request is not the relay's error: debug, not a logged traceback.
        log.debug("refused a malformed request from %s: %s", request.remote, exc)
        text = message or str(exc) or "bad request"  # aiohttp passes its parser's own message
        too_large = isinstance(exc, LineTooLong) or "Too many headers" in text
        response = _render(RelayError(
            "INVALID_REQUEST", 431 if too_large else 400,
            "Request headers too large (8 KB a line, 128 headers at most)." if too_large
            else f"Malformed HTTP request: {text}", action="Fix the request and retry."))
        response.force_close()
        return response


class _Server(web.Server):
    def __call__(self) -> RequestHandler:
        return _Protocol(self, loop=asyncio.get_running_loop(), **self._kwargs)


class Runner(web.AppRunner):
    """The app's runner for `relay serve`: aiohttp's, with the relay's connection handler (the tests'
    TestServer keeps aiohttp's own, so they check the parser's answers through `relay serve`)."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        return _Server(server.request_handler, request_factory=server.request_factory,
                       handler_cancellation=server.handler_cancellation, **server._kwargs)


def create_app(settings: Settings, world_model: WorldModel | None = None, *, reaper_interval: float = 0.1) -> web.Application:
    server = settings.server
    clustered = settings.cluster.enabled
    # Clustered, a call about another node's resource is forwarded last: after the errors' shape and the
    # body's bounds, before any handler reads state this node does not have.
    # Then listings and recordings, which no one node holds, are gathered from every node.
    middlewares = [cors, errors, body_deadline] + ([forward.forward, spread.spread] if clustered else [])
    app = web.Application(
        middlewares=middlewares, client_max_size=server.max_body_bytes,
        # aiohttp's keep-alive timer also runs from the connect until a request's headers are complete:
        # a silent connection, or one that trickles its headers, is closed at header_timeout_seconds.
        handler_args={"keepalive_timeout": server.header_timeout_seconds, "lingering_time": LINGER_SECONDS},
    )
    app[SETTINGS] = settings
    app[API_KEYS] = tuple(settings.auth.api_keys)
    if world_model is None:
        world_model = make_world_model(settings)
    app[WORLD_MODEL] = world_model
    app[RECORDINGS] = RecordingStore.from_settings(settings)
    app[SESSIONS] = SessionManager(settings, world_model, recordings=app[RECORDINGS],
                                   channels=ChannelStore(server.data_dir, settings.limits.channels_per_key))
    app[SIMULATIONS] = Simulations(settings, app[RECORDINGS])
    app[CLUSTER] = None
    app[IS_NODE] = _no_node  # a single node hears from no other
    if clustered:
        install_cluster(app)

    for module in (connections, channels, broadcasts, orchestration, recordings, simulations, ops, pages, whip):
        app.router.add_routes(module.routes)
    app.on_shutdown.append(_shut_down)
    # The hosted world-model API's own protocol (its SDK runs unchanged), over the same core.
    odyssey = create_odyssey_app(app)
    app.add_subapp(ODYSSEY_PREFIX, odyssey)
    pages.add_static(app)
    if clustered:  # joined before the core starts, left after it closed (its last entries removed)
        app.cleanup_ctx.append(_cluster_lifecycle(odyssey))
    app.cleanup_ctx.append(_lifecycle(reaper_interval))
    return app


def install_cluster(app: web.Application) -> None:
    """The cluster's seams into the core (relay/cluster/node.py); the node joins at start."""
    sessions, jobs = app[SESSIONS], app[SIMULATIONS]

    async def active_jobs() -> list[str]:
        return await asyncio.to_thread(jobs.store.active_ids) if jobs.store is not None else []

    async def all_jobs() -> list[str] | None:
        return await asyncio.to_thread(jobs.store.all_ids) if jobs.store is not None else None

    cluster = Cluster(app[SETTINGS], sessions, active_jobs=active_jobs, all_jobs=all_jobs)
    app[CLUSTER] = cluster
    app[forward.CARRIER] = forward.Carrier(app[SETTINGS].cluster.node_timeout_seconds)
    sessions.observer = cluster
    sessions.stream_quota = cluster
    sessions.spectator_seats = cluster.spectators.for_broadcast
    jobs.cluster_quota = cluster.simulations
    jobs.cluster_directory = cluster
    # Another node's edge feed presents the node credential: served, uncounted, uncapped.
    app[IS_NODE] = lambda request: cluster.verify_node(request.headers.get("Authorization")) is not None
    # Other nodes' broadcasts, served here over WHEP and HLS from one feed each.
    app[EDGES] = EdgeManager(app[SETTINGS], cluster.origin_of, cluster.node_authorization,
                             seats=cluster.spectators.for_broadcast)
    # Participants of other nodes' broadcasts, served here; their origin's audience answers over Redis.
    app[AUDIENCE_LINK] = AudienceLink(app[SETTINGS], cluster, sessions)


def _cluster_lifecycle(odyssey: web.Application):
    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        cluster, carrier = app[CLUSTER], app[forward.CARRIER]
        await cluster.start()
        app[AUDIENCE_LINK].start()

        def derive_keys() -> None:
            # /odyssey's JWTs and recording links signed with the cluster's secret: minted on one node, they
            # hold on every node (a recording link is checked at any node before it asks the others for the
            # file); derived again should the secret change: every node then signs with the one that won.
            odyssey[TWIN].use_secret(cluster.token_secret(b"relay/odyssey tokens"))
            app[RECORDINGS].use_secret(cluster.token_secret(b"relay/recording links"))
        derive_keys()
        cluster.on_secret = derive_keys
        await carrier.start()
        yield
        await carrier.close()
        await app[AUDIENCE_LINK].close()
        await cluster.close()

    return lifecycle


def _no_node(request: web.Request) -> bool:
    return False


def make_world_model(settings: Settings) -> WorldModel:
    wm = settings.world_model
    if wm.kind == "synthetic":
        return SyntheticWorldModel(width=wm.width, height=wm.height, fps=wm.fps)
    if wm.kind == "hosted":  # the relay as a client of the hosted API (its key from the environment)
        return HostedWorldModel(wm.url, hosted_api_key(settings), width=wm.width, height=wm.height, fps=wm.fps,
                                api_key_env=wm.api_key_env)
    if wm.kind == "whip":  # each connection a publish slot: a WHIP publisher sends the video
        return WhipWorldModel(silence_seconds=wm.publisher_silence_seconds,
                              max_candidates=settings.limits.whep_offer_max_candidates,
                              connect_seconds=settings.limits.whep_connect_seconds)
    raise ValueError(f"world_model.kind {wm.kind!r} is not available")


async def _sweep_recordings(store: RecordingStore, interval: float = 3600.0) -> None:
    """Retention: delete recordings older than retention_days, hourly, off the event loop."""
    while True:
        try:
            removed = await asyncio.to_thread(store.sweep)
            if removed:
                log.info("retention removed %d recordings", len(removed))
        except Exception:
            log.exception("recordings sweep failed")
        await asyncio.sleep(interval)


async def _shut_down(app: web.Application) -> None:
    """SIGTERM/SIGINT, after the listener stopped and before aiohttp waits on open handlers: close
    every connection as "shutdown" so nothing is left for it to wait out. Each stream ends and its
    recording is finalized, each control socket hears `disconnected {reason: "shutdown"}`, and every
    control, events and signalling socket closes 1001 "shutdown" (their send paths do that)."""
    seconds = app[SETTINGS].server.shutdown_seconds
    try:
        # Most of the budget: the rest goes to requests in flight and the lifecycle's own cleanup.
        await asyncio.wait_for(app[SESSIONS].close(), seconds * 0.7)
    except asyncio.TimeoutError:
        log.warning("shutdown: connections still closing after %.1f s", seconds * 0.7)
    if AUDIENCE_LINK in app:  # participants here of other nodes' broadcasts: closed "shutdown" too
        await app[AUDIENCE_LINK].close()


def _lifecycle(reaper_interval: float):
    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        settings = app[SETTINGS]
        addresses = settings.webrtc.ice_host_addresses
        if not addresses and settings.server.host in ("127.0.0.1", "localhost", "::1"):
            # A relay bound to loopback serves this machine only: offer loopback candidates.
            addresses = ("127.0.0.1",)
        restrict_ice_host_addresses(tuple(addresses))
        store = app[RECORDINGS]
        # Before any stream starts: finish what a crash left, and read the signing secret once.
        recovered = await asyncio.to_thread(store.recover)
        if recovered:
            log.info("recovered %d recordings left by a previous run", len(recovered))
        await asyncio.to_thread(lambda: store.secret)
        # Simulations after recordings' recovery (it finalizes what a killed worker left; the runner then
        # deletes those cut attempts and puts their jobs back to pending).
        jobs = app[SIMULATIONS]
        await jobs.start()
        sessions = app[SESSIONS]
        reaper = asyncio.create_task(sessions.run_reaper(reaper_interval), name="relay-reaper")
        sweeper = asyncio.create_task(_sweep_recordings(store), name="relay-recordings-sweeper")
        yield
        for task in (reaper, sweeper):
            task.cancel()
        await asyncio.gather(reaper, sweeper, return_exceptions=True)
        await jobs.close()  # workers stopped now; their jobs go back to pending
        if EDGES in app:  # this node's feeds from other nodes, and their spectators
            await app[EDGES].close()
        await sessions.close()
        await app[WORLD_MODEL].close()

    return lifecycle
