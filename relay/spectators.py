"""A broadcast's spectators: its WHEP sessions, from the offer to the close.

A session is *pending* from its answer until ICE and DTLS complete, then *connected*. Only connected
ones are viewers (counted, capped, in the metrics); pending ones are bounded apart, per address and
in total, for whep_connect_seconds at most. Each client address holds at most spectators_per_address
sessions of either kind (in a cluster, at every node together: its Seats count them), so no one address
takes every seat. A join still answering its offer is already pending, and no join outlives the close. Each session takes its media as a reader of the broadcast's media
graph (a :class:`MediaFeed`); this module knows nothing of how the graph makes it.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Callable, Protocol

from aiortc import RTCPeerConnection

from . import metrics
from .clock import Clock
from .config import LimitsSettings
from .errors import RelayError, not_found
from .media.graph import MediaFeed
from .media.rtp_fanout import RtpOutput
from .media.webrtc import add_trickled_candidates, answer_spectator, count_candidates, too_many_candidates

log = logging.getLogger(__name__)

# How long close() waits for joins still answering their offer. They close their own peer
# connection when they see the spectators closed; the wait only makes close() return after them.
JOIN_CLOSE_WAIT = 5.0


def spectator_limit_reached(limit: int) -> RelayError:
    return RelayError("SPECTATOR_LIMIT_REACHED", 503, f"This broadcast already has its maximum of {limit} spectators.",
                      action="Retry later.", details={"limit": limit}, retry_after=10)


def too_many_from_address(limit: int) -> RelayError:
    return RelayError("RATE_LIMITED", 429, f"Too many spectators from your address (at most {limit} per broadcast).",
                      action="End another session from this address (DELETE), then retry.",
                      details={"limit": limit}, retry_after=10)


class Seats(Protocol):
    """Where a broadcast's seats are counted beyond this node (a cluster's, in Redis): one seat taken per
    counted joiner before its answer, given back when it leaves; told this node's viewer count as it changes."""

    # None once seated, else the limit that refused: "spectators_per_broadcast" (every seat is taken) or
    # "spectators_per_address" (the address holds its share of them, at every node together).
    async def take(self, spectator_id: str, limit: int, address: str | None, address_limit: int) -> str | None: ...

    def give_back(self, spectator_id: str) -> None: ...  # not awaited: a leaver never waits on the cluster

    def viewers(self, count: int) -> None: ...


@dataclass
class Spectator:
    spectator_id: str
    pc: RTCPeerConnection
    feed: MediaFeed
    joined_at: float
    last_heard: float
    counted: bool = True  # False for the host's own preview: the host is not its audience
    address: str | None = None  # where the offer came from: pending sessions are capped per address
    # ICE and DTLS completed. Until then the session is pending: not a viewer, not in the metrics or
    # the cap, and dropped if it has not connected within whep_connect_seconds.
    connected: bool = False
    candidates: int = 0  # remote ICE candidates signalled so far (offer and PATCHes), bounded
    closed: bool = False

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.feed.close()
        await self.pc.close()

    @property
    def output(self) -> RtpOutput | None:
        return self.feed.output


class Spectators(Mapping[str, Spectator]):
    """The broadcast's sessions by spectator_id (read-only as a mapping; join and remove change it)."""

    def __init__(
        self,
        broadcast_id: str,
        limits: LimitsSettings,
        clock: Clock,
        *,
        feed: Callable[[], MediaFeed],
        on_viewers: Callable[[int], None],
    ) -> None:
        self._broadcast_id = broadcast_id
        self._limits = limits
        self._clock = clock
        self._feed = feed  # a new reader of the broadcast's media
        self._on_viewers = on_viewers  # a viewer joined or left: the new count
        self._sessions: dict[str, Spectator] = {}
        # Joins still answering their offer: (counted, address). Counted ones are pending sessions
        # already, and close() waits for all of them.
        self._joins: dict[asyncio.Future, tuple[bool, str | None]] = {}
        # A cluster's seam (None on a single node): the cap counts every node's spectators.
        self.seats: Seats | None = None
        self.peak = 0
        self.closed = False

    def __getitem__(self, spectator_id: str) -> Spectator:
        return self._sessions[spectator_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._sessions)

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def viewers(self) -> int:
        """Spectators who count: everyone connected and watching but the host's own preview."""
        return sum(1 for s in self._sessions.values() if s.counted and s.connected)

    @property
    def idle(self) -> bool:
        """No session (pending or connected, the host's preview included) and no join answering its offer."""
        return not self._sessions and not self._joins

    def spectator(self, spectator_id: str) -> Spectator:
        spectator = self._sessions.get(spectator_id)
        if spectator is None:
            raise not_found("spectator", spectator_id)
        return spectator

    def _pending(self) -> list[str | None]:
        """Addresses of the counted sessions not yet connected, joins still answering included."""
        joining = [address for counted, address in self._joins.values() if counted]
        return joining + [s.address for s in self._sessions.values() if s.counted and not s.connected]

    def _held_by(self, address: str | None) -> int:
        """Counted sessions from this address, connected or not, joins still answering included."""
        joining = sum(1 for counted, a in self._joins.values() if counted and a == address)
        return joining + sum(1 for s in self._sessions.values() if s.counted and s.address == address)

    def _admit(self, address: str | None) -> None:
        """Raise unless one more counted spectator may start joining from this address."""
        limits = self._limits
        limit = limits.spectators_per_broadcast
        pending = self._pending()
        if self._held_by(address) >= limits.spectators_per_address:
            # Seats are first come first served: without this one address could hold all of them.
            raise too_many_from_address(limits.spectators_per_address)
        per_address = limits.pending_whep_per_address
        if self.viewers < limit and pending.count(address) >= per_address:
            # A slot frees at the latest when this address's oldest pending session hits its deadline.
            started = [s.joined_at for s in self._sessions.values()
                       if s.counted and not s.connected and s.address == address]
            wait = min(started, default=self._clock.monotonic()) + limits.whep_connect_seconds
            raise RelayError(
                "RATE_LIMITED",
                429,
                f"Too many WHEP sessions from your address are still connecting (at most {per_address}).",
                action="Let a session connect, or end it with DELETE, then retry.",
                details={"limit": per_address},
                retry_after=max(1.0, wait - self._clock.monotonic()),
            )
        # Pending sessions do not take viewers' seats: they are bounded on their own, per address
        # (above) and in total (by the same number as the seats), for whep_connect_seconds at most.
        if self.viewers >= limit or len(pending) >= limit:
            raise spectator_limit_reached(limit)

    async def join(self, offer_sdp: str, *, counted: bool = True, address: str | None = None
                   ) -> tuple[Spectator, str]:
        """A WHEP offer: the new (pending) session and the answer's SDP."""
        if self.closed:
            raise not_found("broadcast", self._broadcast_id)
        if counted:
            self._admit(address)
        spectator_id = uuid.uuid4().hex
        feed = self._feed()
        now = self._clock.monotonic()
        # Registered before the first await, so concurrent offers from one address see each other.
        join = asyncio.get_running_loop().create_future()
        self._joins[join] = (counted, address)
        seated = False
        try:
            if counted and self.seats is not None:
                seated = await self._take_seat(spectator_id, address)
            peer = await answer_spectator(
                offer_sdp, feed.track, max_candidates=self._limits.whep_offer_max_candidates,
                on_sender=lambda sender: feed.attach(sender, lambda: self._heard(spectator_id)),
            )
            if self.closed:  # closed while we answered: no join may outlive the close
                await peer.pc.close()
                raise not_found("broadcast", self._broadcast_id)
        except BaseException:
            feed.close()
            if seated:
                self._give_back(spectator_id)
            raise
        finally:
            del self._joins[join]
            join.set_result(None)
        spectator = Spectator(spectator_id, peer.pc, feed, joined_at=now, last_heard=now, counted=counted,
                              address=address, candidates=count_candidates(offer_sdp))
        self._sessions[spectator_id] = spectator

        @peer.pc.on("connectionstatechange")
        async def on_state() -> None:
            if peer.pc.connectionState == "connected":
                await self._connected(spectator)
            elif peer.pc.connectionState in ("failed", "closed"):
                await self.remove(spectator_id)

        log.info("spectator joining", extra={"broadcast_id": self._broadcast_id, "spectator_id": spectator_id})
        return spectator, peer.answer_sdp

    async def _take_seat(self, spectator_id: str, address: str | None) -> bool:
        """One of the cluster's seats for this joiner (pending ones hold theirs too: the only way joiners
        racing at different nodes admit exactly the free seats); 503 when none is free, 429 when its address
        holds spectators_per_address of them across the cluster."""
        assert self.seats is not None
        limits = self._limits
        refused = await self.seats.take(spectator_id, limits.spectators_per_broadcast, address,
                                        limits.spectators_per_address)
        if refused == "spectators_per_address":
            raise too_many_from_address(limits.spectators_per_address)
        if refused is not None:
            raise spectator_limit_reached(limits.spectators_per_broadcast)
        return True

    def _give_back(self, spectator_id: str) -> None:
        if self.seats is not None:
            self.seats.give_back(spectator_id)

    def _viewers_changed(self) -> None:
        self._on_viewers(self.viewers)
        if self.seats is not None:
            self.seats.viewers(self.viewers)

    async def _connected(self, spectator: Spectator) -> None:
        if spectator.connected or self._sessions.get(spectator.spectator_id) is not spectator:
            return
        if spectator.counted and self.viewers >= self._limits.spectators_per_broadcast:
            # Pending sessions are admitted beyond the seats taken; the last seat goes to whoever
            # connects first, and the others are turned away here.
            log.info("spectator connected to a full broadcast: dropped",
                     extra={"broadcast_id": self._broadcast_id, "spectator_id": spectator.spectator_id})
            await self.remove(spectator.spectator_id)
            return
        spectator.connected = True
        self.peak = max(self.peak, self.viewers)
        self._viewers_changed()
        metrics.SPECTATORS.inc()
        log.info("spectator joined", extra={"broadcast_id": self._broadcast_id,
                                            "spectator_id": spectator.spectator_id})

    def _heard(self, spectator_id: str) -> None:
        spectator = self._sessions.get(spectator_id)
        if spectator is not None:
            spectator.last_heard = self._clock.monotonic()

    async def add_candidates(self, spectator_id: str, sdpfrag: str) -> None:
        spectator = self.spectator(spectator_id)
        # The offer's bound holds for the session: trickling cannot add what the offer could not.
        limit = self._limits.whep_offer_max_candidates
        total = spectator.candidates + count_candidates(sdpfrag)
        if total > limit:
            raise too_many_candidates(limit, total)
        spectator.candidates = total
        await add_trickled_candidates(spectator.pc, sdpfrag)

    async def remove(self, spectator_id: str) -> bool:
        spectator = self._sessions.pop(spectator_id, None)
        if spectator is None:
            return False
        if spectator.connected:
            metrics.SPECTATORS.dec()
            self._viewers_changed()
        if spectator.counted:
            self._give_back(spectator_id)  # no await before the close: the peer is closed whatever Redis does
        await spectator.close()
        log.info("spectator left", extra={"broadcast_id": self._broadcast_id, "spectator_id": spectator_id})
        return True

    async def tick(self) -> None:
        """Drop spectators that went silent or never connected."""
        now = self._clock.monotonic()
        for spectator in list(self._sessions.values()):
            if now - spectator.last_heard > self._limits.spectator_timeout_seconds:
                log.info("spectator timed out", extra={"spectator_id": spectator.spectator_id})
                await self.remove(spectator.spectator_id)
            elif not spectator.connected and now - spectator.joined_at > self._limits.whep_connect_seconds:
                log.info("spectator never connected", extra={"spectator_id": spectator.spectator_id})
                await self.remove(spectator.spectator_id)

    def refuse_joins(self) -> None:
        """The broadcast is closing: no join from now on; joins still answering close their own peer."""
        self.closed = True

    async def close(self) -> None:
        """Safe to call twice: the second finds nothing left to close."""
        self.refuse_joins()
        if self._joins:  # each closes its own peer connection on seeing `closed`
            await asyncio.wait(list(self._joins), timeout=JOIN_CLOSE_WAIT)
        await asyncio.gather(*(self.remove(s) for s in list(self._sessions)))
