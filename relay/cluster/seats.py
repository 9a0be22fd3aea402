"""Spectators counted across the cluster: each broadcast's seats (spectators_per_broadcast, and
spectators_per_address of them per client address) and viewer count.

Seats: a sorted set per broadcast, ``relay:quota:spectators:<broadcast_id>`` (member = the spectator, score =
when it lapses, Redis's clock), beside two hashes, ``relay:seat-address:<broadcast_id>`` (spectator -> its
client address) and ``relay:address-seats:<broadcast_id>`` (address -> seats it holds). A take is one Lua
script (one round trip): drop lapsed seats (and their addresses' counts), then admit if the broadcast and the
address each have a seat free; so joiners racing on different nodes admit exactly the free seats, and an
address holds at most spectators_per_address across every node. The hashes hold only seated spectators (at
most the broadcast's cap, whatever addresses strangers come from) and expire with the set. A seat is given back
when its spectator leaves, and a dead node's lapse within node_timeout_seconds (no longer refreshed). With
Redis away a joiner is admitted on this node's counts alone (its seat is added back at the next beat that
reaches Redis).

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
from redis.exceptions import MaxConnectionsError, RedisError

from ..errors import RelayError, cluster_busy, cluster_unavailable
from .quota import quota_key

log = logging.getLogger(__name__)


# Shared by the scripts below (KEYS[1] the seats, KEYS[2] spectator -> address, KEYS[3] address -> seats):
# forget(m) drops m's address (idempotent: a seat pruned as lapsed, then given back, counts down once);
# prune drops the lapsed seats with their addresses; keep extends the keys' lifetime; now is Redis's clock in ms.
_SHARED = """
local function forget(m)
  local a = redis.call('HGET', KEYS[2], m)
  if a then
    redis.call('HDEL', KEYS[2], m)
    if redis.call('HINCRBY', KEYS[3], a, -1) <= 0 then redis.call('HDEL', KEYS[3], a) end
  end
end
local function prune(now)
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do forget(m) end
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
end
local function keep(ttl)  -- the keys outlive every seat in them (a node with a longer timeout's too)
  for i = 1, 3 do
    if redis.call('PTTL', KEYS[i]) < ttl then redis.call('PEXPIRE', KEYS[i], ttl) end
  end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# ARGV: spectator, limit, ttl_ms, address ('' = none counted), address limit.
# Returns {1 seated | 0 the broadcast is full | -1 the address holds its limit, seats held after}.
_TAKE = _SHARED + """
local ttl = tonumber(ARGV[3])
prune(now)
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
  return {1, redis.call('ZCARD', KEYS[1])}
end
local held = redis.call('ZCARD', KEYS[1])
if held >= tonumber(ARGV[2]) then return {0, held} end
local address = ARGV[4]
if address ~= '' and tonumber(redis.call('HGET', KEYS[3], address) or '0') >= tonumber(ARGV[5]) then
  return {-1, held}
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
if address ~= '' then
  redis.call('HSET', KEYS[2], ARGV[1], address)
  redis.call('HINCRBY', KEYS[3], address, 1)
end
keep(ttl)
return {1, held + 1}
"""

# ARGV: spectators given back.
_GIVE_BACK = _SHARED + """
for _, m in ipairs(ARGV) do
  forget(m)
  redis.call('ZREM', KEYS[1], m)
end
return #ARGV
"""

# ARGV: ttl_ms, then (spectator, address) pairs this node holds: their lapse time pushed back, re-added (and
# counted for their address) should Redis have lost them meanwhile: the holder's word is the truth.
_REFRESH = _SHARED + """
local ttl = tonumber(ARGV[1])
prune(now)
for i = 2, #ARGV, 2 do
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[i])
  if ARGV[i + 1] ~= '' and redis.call('HSETNX', KEYS[2], ARGV[i], ARGV[i + 1]) == 1 then
    redis.call('HINCRBY', KEYS[3], ARGV[i + 1], 1)
  end
end
keep(ttl)
return #ARGV
"""

BROADCAST_FULL, ADDRESS_FULL = "spectators_per_broadcast", "spectators_per_address"  # the limit that refused


def viewers_key(broadcast_id: str) -> str:
    return f"relay:viewers:{broadcast_id}"


def seat_keys(broadcast_id: str) -> list[str]:
    """The seats, spectator -> address, address -> seats held (every key a take touches)."""
    return [quota_key("spectators", broadcast_id), f"relay:seat-address:{broadcast_id}",
            f"relay:address-seats:{broadcast_id}"]


class SeatSets:
    """The seats this node holds, each broadcast's in Redis; `held`: spectator -> (broadcast, address)."""

    def __init__(self, redis: Redis, timeout_seconds: float) -> None:
        self._redis = redis
        self._ttl_ms = int(timeout_seconds * 1000)
        self._take = redis.register_script(_TAKE)
        self._give_back = redis.register_script(_GIVE_BACK)
        self._refresh = redis.register_script(_REFRESH)
        self.held: dict[str, tuple[str, str]] = {}

    async def take(self, broadcast_id: str, spectator_id: str, limit: int, address: str,
                   address_limit: int) -> str | None:
        """None once seated, else the limit that refused; 503 CLUSTER_UNAVAILABLE without Redis, CLUSTER_BUSY
        when this node's connections to it stayed busy."""
        try:
            seated, _held = await self._take(keys=seat_keys(broadcast_id),
                                             args=[spectator_id, limit, self._ttl_ms, address, address_limit])
        except MaxConnectionsError:  # Redis is there: a joiner is refused for now, not admitted on a local count
            raise cluster_busy() from None
        except (RedisError, OSError):
            raise cluster_unavailable() from None
        if seated == 1:
            self.held[spectator_id] = (broadcast_id, address)
            return None
        return BROADCAST_FULL if seated == 0 else ADDRESS_FULL

    def hold(self, broadcast_id: str, spectator_id: str, address: str) -> None:
        """Held without asking Redis (it is away): the next heartbeat that reaches it adds the seat."""
        self.held[spectator_id] = (broadcast_id, address)

    async def remove(self, seats: dict[str, str]) -> None:
        """Free seats this node no longer holds (spectator -> broadcast) in one pipelined round trip."""
        by_broadcast: dict[str, list[str]] = {}
        for spectator_id, broadcast_id in seats.items():
            by_broadcast.setdefault(broadcast_id, []).append(spectator_id)
        async with self._redis.pipeline(transaction=False) as pipe:
            for broadcast_id, spectator_ids in by_broadcast.items():
                await self._give_back(keys=seat_keys(broadcast_id), args=spectator_ids, client=pipe)
            await pipe.execute()

    async def refresh(self) -> None:
        """The heartbeat's: this node still holds these (re-added if Redis lost them), in one round trip."""
        if not self.held:
            return
        by_broadcast: dict[str, list[str]] = {}
        for spectator_id, (broadcast_id, address) in self.held.items():
            by_broadcast.setdefault(broadcast_id, []).extend((spectator_id, address))
        async with self._redis.pipeline(transaction=False) as pipe:
            for broadcast_id, pairs in by_broadcast.items():
                await self._refresh(keys=seat_keys(broadcast_id), args=[self._ttl_ms, *pairs], client=pipe)
            await pipe.execute()


class BroadcastSeats:
    """One broadcast's side of SpectatorCounts: the seam relay/spectators.py calls (its `Seats`)."""

    def __init__(self, counts: SpectatorCounts, broadcast_id: str) -> None:
        self._counts, self.broadcast_id = counts, broadcast_id

    async def take(self, spectator_id: str, limit: int, address: str | None = None,
                   address_limit: int = 0) -> str | None:
        return await self._counts.take(self.broadcast_id, spectator_id, limit, address or "", address_limit)

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
        self.seats = SeatSets(redis, timeout_seconds)
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

    async def take(self, broadcast_id: str, spectator_id: str, limit: int, address: str = "",
                   address_limit: int = 0) -> str | None:
        """None once seated, else the limit that refused (see SeatSets.take)."""
        try:
            if self._reachable():
                return await self.seats.take(broadcast_id, spectator_id, limit, address, address_limit)
        except RelayError as err:
            if err.code != "CLUSTER_UNAVAILABLE":
                raise
        # Streams go on without Redis, and so do joins at the node that serves them (capped by its own
        # counts, checked before): the seat is written back with the next beat that reaches Redis.
        self.seats.hold(broadcast_id, spectator_id, address)
        return None

    def give_back(self, spectator_id: str) -> None:
        """Forgotten here at once (no longer refreshed, it lapses within node_timeout_seconds at worst), removed
        in Redis by one task owned here: a leaving spectator, the reaper's tick or a broadcast's close never
        waits on Redis, and the seats given back together (a closing broadcast's) go in one pipelined ZREM."""
        seat = self.seats.held.pop(spectator_id, None)
        if seat is None or not self._reachable():
            return
        self._leaving[spectator_id] = seat[0]
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
