"""Quotas that hold across nodes: each API key's held slots are a sorted set in Redis, member = what holds
the slot (a connection's stream, a simulation job), score = when it lapses (Redis's own clock, in ms).

A take is one Lua script (atomic on the server): drop lapsed slots, count, add if below the limit. So ten
submits at nine held, whichever nodes they reach, admit exactly one. The holding node refreshes its slots
at every heartbeat; a node that dies stops refreshing and its slots lapse within node_timeout_seconds.

Keys: ``relay:quota:<name>:<owner>`` (owner = the API key's hash, never the key).
"""

from __future__ import annotations

import contextlib

from redis.asyncio import Redis
from redis.exceptions import MaxConnectionsError, RedisError

from ..errors import cluster_busy, cluster_unavailable

# KEYS[1] the set; ARGV: member, limit, ttl_ms. Returns {admitted (0/1), held after}.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
  return {1, redis.call('ZCARD', KEYS[1])}
end
local held = redis.call('ZCARD', KEYS[1])
if held >= tonumber(ARGV[2]) then
  return {0, held}
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl)
return {1, held + 1}
"""

# KEYS: sets; ARGV[1] ttl_ms, then one member per key: pushes back the lapse time of the slots this node holds
# (re-adding them, should Redis have lost its data meanwhile: the holder's word is the truth), lapsed ones pruned.
_REFRESH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  redis.call('ZADD', key, now + ttl, ARGV[i + 1])
  redis.call('PEXPIRE', key, ttl)
end
return #KEYS
"""


def quota_key(name: str, owner: str) -> str:
    return f"relay:quota:{name}:{owner}"


class ClusterQuota:
    """Slots of one quota (``name``) per owner, held by this node until given back."""

    def __init__(self, redis: Redis, name: str, timeout_seconds: float) -> None:
        self._redis = redis
        self.name = name
        self._ttl_ms = int(timeout_seconds * 1000)
        self._take = redis.register_script(_TAKE)
        self._refresh = redis.register_script(_REFRESH)
        self.held: dict[str, str] = {}  # member -> owner, what this node holds
        self.submitting: set[str] = set()  # taken for something not yet where reconcile looks (a job in flight)

    async def take(self, owner: str, member: str, limit: int) -> tuple[bool, int]:
        """(admitted, slots the owner holds now across the cluster); 503 CLUSTER_UNAVAILABLE without Redis,
        CLUSTER_BUSY when this node's connections to it stayed busy."""
        try:
            admitted, held = await self._take(keys=[quota_key(self.name, owner)], args=[member, limit, self._ttl_ms])
        except MaxConnectionsError:  # Redis is there: a joiner is refused for now, not admitted on a local count
            raise cluster_busy() from None
        except (RedisError, OSError):
            raise cluster_unavailable() from None
        if admitted:
            self.held[member] = owner
        return bool(admitted), int(held)

    def hold(self, owner: str, member: str) -> None:
        """Held without asking Redis (it is away): the next heartbeat that reaches it adds the slot."""
        self.held[member] = owner

    async def give_back(self, member: str) -> None:
        """Free the slot. Forgotten here first: should Redis be away, it is no longer refreshed and lapses."""
        owner = self.held.pop(member, None)
        if owner is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._redis.zrem(quota_key(self.name, owner), member)

    async def remove(self, slots: dict[str, str]) -> None:
        """Free slots this node no longer holds (member -> owner) in one pipelined round trip."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for member, owner in slots.items():
                pipe.zrem(quota_key(self.name, owner), member)
            await pipe.execute()

    async def refresh(self) -> None:
        """The heartbeat's: this node still holds these (re-added if Redis lost them)."""
        if not self.held:
            return
        items = list(self.held.items())
        await self._refresh(keys=[quota_key(self.name, owner) for _, owner in items],
                            args=[self._ttl_ms, *[member for member, _ in items]])
