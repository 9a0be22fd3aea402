"""The WHEP edge cascade: this node serves broadcasts whose origin is another node.

A spectator's WHEP offer for a broadcast that is not local makes this node an *edge* for it: one
:class:`EdgeFeed` pulls the broadcast from its origin (one uncounted node peer there, however many
spectators here), publishes the origin's H.264 access units into a local :class:`MediaGraph` as its
source (no decode, no encode), and the local spectators are ordinary WHEP sessions of that graph
(relay/spectators.py: pending vs connected, caps, timeouts; NACKs served from this node's fan-out
history; their keyframe requests coalesced into one PLI upstream). The feed is dropped
``[cluster] edge_linger_seconds`` after the last local spectator leaves, and at once if the origin
goes away (its spectators here are closed with it). An origin killed -9 says nothing, and the feed's
ICE would take ~30 s to give up, so the manager also asks the directory every heartbeat: once the
origin's entry lapsed (node_timeout_seconds after its last beat) the feed is dropped.

The API adapter calls join/trickle/leave; who the origin is comes from the cluster's directory
(``origin_of``) and how one node proves itself to another from ``node_authorization``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace

import aiohttp

from .. import metrics
from ..auth import check_spectator
from ..clock import SYSTEM_CLOCK, Clock
from ..config import Settings
from ..errors import RelayError, not_found
from ..media.edge_feed import EdgeFeed
from ..media.graph import MediaGraph
from ..media.hls import HlsPublisher
from ..spectators import Seats, Spectators
from .directory import NodeAuthorization, Origin, OriginOf

SeatsOf = Callable[[str], Seats]  # a broadcast's seats, counted across the cluster (relay/cluster/seats.py)

log = logging.getLogger(__name__)

TICK_SECONDS = 0.1  # spectators' timeouts and the linger are checked this often


class EdgeBroadcast:
    """One broadcast served here from another node: its feed, its graph, its local spectators."""

    def __init__(self, broadcast_id: str, origin: Origin, settings: Settings, clock: Clock,
                 http: aiohttp.ClientSession, authorization: str, seats: Seats | None = None) -> None:
        self.broadcast_id = broadcast_id
        self.origin = origin
        # No encoder here, so no lower layer; no recorder (the origin records). HLS is cut here from
        # the same packets (nothing per viewer), so HLS players need no trip to the origin either.
        media = replace(settings.media, low_layer=False)
        self.media = MediaGraph(replace(settings, media=media), clock)
        self.spectators = Spectators(broadcast_id, settings.limits, clock, feed=self.media.feed,
                                     on_viewers=lambda _count: None)
        self.spectators.seats = seats  # the cap and the count are the cluster's, this node's viewers a part
        url = f"{origin.url.rstrip('/')}/v1/broadcasts/{broadcast_id}/whep"
        self.feed = EdgeFeed(url, authorization, http, publish=self._publish, on_lost=self._lost,
                             timeout=settings.limits.whep_connect_seconds, on_latency=metrics.EDGE_LATENCY.observe)
        self._publish_hub = self.media.attach_packets(self.feed.request_keyframe, settings.world_model.fps)
        self.ready: asyncio.Future = asyncio.get_running_loop().create_future()
        self.last_used = clock.monotonic()  # a spectator held or joined, or an HLS request: the linger runs from it
        self.joining = 0  # joins under way: not spectators yet, but the feed must not linger out under them
        self.lost = False
        self.closed = False

    def _publish(self, packet, keyframe: bool) -> None:
        self._publish_hub(packet, keyframe)

    def _lost(self) -> None:
        self.lost = True  # the manager's tick closes it (and its spectators) off this callback

    async def open(self) -> None:
        try:
            await self.feed.open()
        except asyncio.CancelledError:
            self.ready.cancel()
            raise
        except BaseException as exc:
            self.ready.set_exception(exc)
            self.ready.exception()  # retrieved: the joiners waiting on it re-raise it themselves
            raise
        self.ready.set_result(None)

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.spectators.refuse_joins()
        await self.spectators.close()
        await self.feed.close()
        await self.media.detach_source("edge closed")
        await self.media.close()


class EdgeManager:
    def __init__(self, settings: Settings, origin_of: OriginOf, node_authorization: NodeAuthorization,
                 clock: Clock = SYSTEM_CLOCK, *, seats: SeatsOf | None = None) -> None:
        self._settings = settings
        self._seats = seats
        self._origin_of = origin_of
        self._node_authorization = node_authorization
        self._clock = clock
        self._edges: dict[str, EdgeBroadcast] = {}
        self._http: aiohttp.ClientSession | None = None
        self._ticker: asyncio.Task | None = None
        self._origins_checked = clock.monotonic()
        self.closed = False

    @property
    def edges(self) -> dict[str, EdgeBroadcast]:
        return dict(self._edges)

    def _start(self) -> aiohttp.ClientSession:
        """The feeds' HTTP client, and the housekeeping task, which runs only while this node holds feeds."""
        if self._http is None:
            self._http = aiohttp.ClientSession()
        if self._ticker is None:
            self._ticker = asyncio.get_running_loop().create_task(self._tick_forever(), name="relay-edges")
        return self._http

    async def _opened(self, broadcast_id: str, token: str | None) -> EdgeBroadcast:
        """The broadcast's edge here, its feed open (opened now if need be), after the spectator token
        is checked against the origin's. Returns with ``joining`` held: the caller releases it."""
        if self.closed:
            raise not_found("broadcast", broadcast_id)
        origin = await self._origin_of(broadcast_id)
        if origin is None:
            raise not_found("broadcast", broadcast_id)
        check_spectator(token, origin.spectator_token)
        edge = self._edges.get(broadcast_id)
        if edge is not None and edge.lost:  # its origin went away: a new feed, not that one
            del self._edges[broadcast_id]
            await edge.close()
            edge = self._edges.get(broadcast_id)  # another joiner may have opened one meanwhile
        if edge is None:
            edge = EdgeBroadcast(broadcast_id, origin, self._settings, self._clock, self._start(),
                                 self._node_authorization(), self._seats(broadcast_id) if self._seats else None)
            self._edges[broadcast_id] = edge  # before any await: concurrent joiners share this feed
            edge.joining += 1
            try:
                await edge.open()
            except BaseException:
                edge.joining -= 1
                if self._edges.get(broadcast_id) is edge:
                    del self._edges[broadcast_id]
                await edge.close()
                raise
        else:
            edge.joining += 1
            try:
                await asyncio.shield(edge.ready)
            except BaseException:
                edge.joining -= 1
                raise
        edge.last_used = self._clock.monotonic()
        return edge

    async def join(self, broadcast_id: str, offer_sdp: str, token: str | None,
                   address: str | None = None) -> tuple[str, str]:
        """A spectator's WHEP offer here for another node's broadcast: (Location, answer SDP)."""
        edge = await self._opened(broadcast_id, token)
        try:
            spectator, answer = await edge.spectators.join(offer_sdp, address=address)
        finally:
            edge.joining -= 1
        return f"/v1/broadcasts/{broadcast_id}/whep/{spectator.spectator_id}", answer

    @asynccontextmanager
    async def hls(self, broadcast_id: str, token: str | None) -> AsyncIterator[HlsPublisher | None]:
        """The edge's live HLS of another node's broadcast (None if this relay offers no HLS), for the
        length of one request. An HLS player holds no session: its requests keep the feed from
        lingering out, and one waiting for the first segments holds it open meanwhile."""
        edge = await self._opened(broadcast_id, token)
        try:
            yield edge.media.hls
        finally:
            edge.joining -= 1
            edge.last_used = self._clock.monotonic()

    def authorize(self, broadcast_id: str, token: str | None) -> EdgeBroadcast:
        """The edge for a session call (PATCH, DELETE): 404 if it serves no such broadcast; as at the origin,
        the session URL is the capability, and a token that comes with it must be the broadcast's (401)."""
        edge = self._edges.get(broadcast_id)
        if edge is None:
            raise not_found("broadcast", broadcast_id)
        if token is not None:
            check_spectator(token, edge.origin.spectator_token)
        return edge

    async def trickle(self, broadcast_id: str, session_id: str, fragment: str, token: str | None) -> None:
        await self.authorize(broadcast_id, token).spectators.add_candidates(session_id, fragment)

    async def leave(self, broadcast_id: str, session_id: str, token: str | None) -> None:
        spectators = self.authorize(broadcast_id, token).spectators
        spectators.spectator(session_id)  # 404 for an unknown session
        await spectators.remove(session_id)

    def describe(self) -> dict[str, int]:
        """For /readyz, which anyone may read: counts only (the feeds held, the viewers through them), no
        broadcast id (the spectator token guards who learns a broadcast exists)."""
        return {"edge_feeds": len(self._edges),
                "edge_spectators": sum(edge.spectators.viewers for edge in self._edges.values())}

    async def tick(self) -> None:
        """Spectators' timeouts; drop feeds lost by their origin, or idle past the linger."""
        now = self._clock.monotonic()
        linger = self._settings.cluster.edge_linger_seconds
        if now - self._origins_checked >= self._settings.cluster.heartbeat_seconds:
            self._origins_checked = now
            await self._check_origins()
        for broadcast_id, edge in list(self._edges.items()):
            if not edge.ready.done():
                continue  # still opening: its first joiner is on its way
            await edge.spectators.tick()
            if len(edge.spectators) or edge.joining:
                edge.last_used = now
            if edge.lost or now - edge.last_used >= linger:
                log.info("edge feed dropped", extra={"broadcast_id": broadcast_id, "lost": edge.lost})
                if self._edges.get(broadcast_id) is edge:
                    del self._edges[broadcast_id]
                await edge.close()
        metrics.CLUSTER_EDGE_FEEDS.set(len(self._edges))

    async def _check_origins(self) -> None:
        """Mark lost every feed whose origin left the directory (or whose broadcast moved to another node)."""
        for broadcast_id, edge in list(self._edges.items()):
            if not edge.ready.done() or edge.lost:
                continue
            try:
                origin = await self._origin_of(broadcast_id)
            except RelayError:
                return  # Redis away: live feeds go on; a later check decides
            if origin is None or origin.node_id != edge.origin.node_id:
                log.info("edge feed's origin left the cluster", extra={"broadcast_id": broadcast_id})
                edge.lost = True

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(TICK_SECONDS)
            try:
                await self.tick()
            except Exception:  # one edge's failure must not stop the others' housekeeping
                log.exception("edge tick failed")
            if not self._edges:  # nothing left to keep: the next feed starts another (no await between)
                self._ticker = None
                return

    async def close(self) -> None:
        """Every feed and local spectator closed; safe to call twice."""
        self.closed = True
        ticker, self._ticker = self._ticker, None
        if ticker is not None:
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)
        edges, self._edges = list(self._edges.values()), {}
        metrics.CLUSTER_EDGE_FEEDS.set(0)
        await asyncio.gather(*(edge.close() for edge in edges), return_exceptions=True)
        if self._http is not None:
            await self._http.close()
            self._http = None
