"""Spectators counted across the cluster: each broadcast's seats (spectators_per_broadcast) and viewer count.

Seats are quota slots (quota.py: one atomic Lua take) with owner = the broadcast and member = the spectator,
so joiners racing at the cap on different nodes admit exactly the free seats; a seat is given back when its
spectator leaves, and a dead node's lapse within node_timeout_seconds (no longer refreshed). With Redis away a
joiner is admitted on this node's count alone (its seat is added back at the next beat that reaches Redis).

Counts: a hash per broadcast, ``relay:viewers:<broadcast_id>``, node_id -> that node's connected viewers
(origin and edges alike), written as they change and rewritten at every beat. The origin sums the fields of
the live nodes at each beat (dropping the fields of nodes that left) into its broadcast's
``viewers_elsewhere``: what its state, its watch page and its stream's ``spectators`` add to its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from redis.asyncio import Redis
from redis.exceptions import RedisError

from ..errors import RelayError
from .quota import ClusterQuota

log = logging.getLogger(__name__)


def viewers_key(broadcast_id: str) -> str:
    return f"relay:viewers:{broadcast_id}"


class BroadcastSeats:
    """One broadcast's side of SpectatorCounts: the seam relay/spectators.py calls (its `Seats`)."""

    def __init__(self, counts: SpectatorCounts, broadcast_id: str) -> None:
        self._counts, self.broadcast_id = counts, broadcast_id

    async def take(self, spectator_id: str, limit: int) -> bool:
        return await self._counts.take(self.broadcast_id, spectator_id, limit)

    def give_back(self, spectator_id: str) -> None:
        self._counts.give_back(spectator_id)

    def viewers(self, count: int) -> None:
        self._counts.changed(self.broadcast_id, count)


class SpectatorCounts:
    def __init__(self, redis: Redis, node_id: str, timeout_seconds: float,
                 reachable: Callable[[], bool] = lambda: True) -> None:
        self._redis = redis
        self.node_id = node_id
        self._reachable = reachable  # as the last heartbeat found Redis: away, a join does not wait on it
        self._ttl_ms = int(timeout_seconds * 1000)
        self.seats = ClusterQuota(redis, "spectators", timeout_seconds)
        self.local: dict[str, int] = {}  # broadcast id -> viewers connected here (none: absent)
        self._dirty: set[str] = set()  # counts changed since the last write
        self._flusher: asyncio.Task | None = None
        self._leaving: dict[str, str] = {}  # seats given back, not yet removed in Redis: spectator -> broadcast
        self._returner: asyncio.Task | None = None

    def for_broadcast(self, broadcast_id: str) -> BroadcastSeats:
        return BroadcastSeats(self, broadcast_id)

    @property
    def viewers_here(self) -> int:
        return sum(self.local.values())

    async def take(self, broadcast_id: str, spectator_id: str, limit: int) -> bool:
        try:
            if self._reachable():
                admitted, _held = await self.seats.take(broadcast_id, spectator_id, limit)
                return admitted
        except RelayError as err:
            if err.code != "CLUSTER_UNAVAILABLE":
                raise
        # Streams go on without Redis, and so do joins at the node that serves them (capped by its own
        # count, checked before): the seat is written back with the next beat that reaches Redis.
        self.seats.hold(broadcast_id, spectator_id)
        return True

    def give_back(self, spectator_id: str) -> None:
        """Forgotten here at once (no longer refreshed, it lapses within node_timeout_seconds at worst), removed
        in Redis by one task owned here: a leaving spectator, the reaper's tick or a broadcast's close never
        waits on Redis, and the seats given back together (a closing broadcast's) go in one pipelined ZREM."""
        broadcast_id = self.seats.held.pop(spectator_id, None)
        if broadcast_id is None or not self._reachable():
            return
        self._leaving[spectator_id] = broadcast_id
        if self._returner is None or self._returner.done():
            self._returner = asyncio.get_running_loop().create_task(self._return_seats(), name="relay-cluster-seats")

    async def _return_seats(self) -> None:
        while self._leaving:
            leaving, self._leaving = self._leaving, {}
            try:
                await self.seats.remove(leaving)
            except (RedisError, OSError) as exc:  # not refreshed any more: they lapse
                log.warning("cluster: %d seats not given back (%s); they lapse", len(leaving), exc)

    def changed(self, broadcast_id: str, count: int) -> None:
        """This node's viewers of the broadcast now: written at once by one writer task (so writes land in
        order); a write that fails is the next beat's to mend."""
        if count:
            self.local[broadcast_id] = count
        else:
            self.local.pop(broadcast_id, None)
        self._dirty.add(broadcast_id)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush(), name="relay-cluster-viewers")

    async def _flush(self) -> None:
        while self._dirty:
            dirty, self._dirty = self._dirty, set()
            try:
                await self._write(dirty)
            except (RedisError, OSError) as exc:
                self._dirty |= dirty  # a count gone to 0 is in no `local`: only this set remembers to HDEL it
                log.warning("cluster: viewer count write failed (%s); the next heartbeat retries", exc)
                return

    async def _write(self, broadcast_ids: Iterable[str]) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            for broadcast_id in broadcast_ids:
                key = viewers_key(broadcast_id)
                if broadcast_id in self.local:
                    pipe.hset(key, self.node_id, self.local[broadcast_id])
                    pipe.pexpire(key, self._ttl_ms)
                else:
                    pipe.hdel(key, self.node_id)
            await pipe.execute()

    async def beat(self, origin_of: Iterable[str], live: set[str]) -> dict[str, int]:
        """The heartbeat's: seats refreshed, this node's counts rewritten; for each broadcast this node is
        the origin of, the viewers at the other live nodes (the fields of nodes that left, dropped)."""
        await self.seats.refresh()
        # Every count held here, and those that went to 0 since the last write (HDEL'd: absent from local).
        dirty, self._dirty = self._dirty, set()
        try:
            await self._write(set(self.local) | dirty)
        except BaseException:
            self._dirty |= dirty
            raise
        origin_ids = list(origin_of)
        if not origin_ids:
            return {}
        async with self._redis.pipeline(transaction=False) as pipe:
            for broadcast_id in origin_ids:
                pipe.hgetall(viewers_key(broadcast_id))
            tables = await pipe.execute()
        elsewhere: dict[str, int] = {}
        for broadcast_id, table in zip(origin_ids, tables):
            counts = {_text(node): int(count) for node, count in table.items()}
            gone = [node for node in counts if node not in live]
            if gone:
                await self._redis.hdel(viewers_key(broadcast_id), *gone)
            elsewhere[broadcast_id] = sum(c for node, c in counts.items() if node in live and node != self.node_id)
        return elsewhere

    async def close(self) -> None:
        if self._returner is not None:  # seats given back at the end (each call bounded by the Redis timeout)
            await asyncio.gather(self._returner, return_exceptions=True)
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
