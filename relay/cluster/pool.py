"""This node's connections to Redis: a bounded pool where a burst waits its turn.

redis-py's default pool raises at its 101st concurrent call, and a RedisError reads as "Redis away": joins
were then admitted on this node's count alone (past the cluster-wide cap), give-backs and lookups were lost.
Here a call finding every connection busy waits for one (up to `wait_seconds`); past that it fails with
MaxConnectionsError, which callers answer as busy (503 CLUSTER_BUSY), never as Redis away.
"""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MaxConnectionsError


class WaitingPool(aioredis.BlockingConnectionPool):
    async def get_connection(self, *args, **kwargs):
        try:
            return await super().get_connection(*args, **kwargs)
        except RedisConnectionError as exc:
            # The pool's wait ran out (a ConnectionError caused by its timeout, every connection in use):
            # not a Redis that is away, one that is busy.
            if isinstance(exc.__cause__, asyncio.TimeoutError) and len(self._in_use_connections) >= self.max_connections:
                raise MaxConnectionsError(f"all {self.max_connections} Redis connections stayed busy") from exc
            raise


def connect(url: str, max_connections: int, seconds: float) -> aioredis.Redis:
    """A client whose calls each answer within `seconds` (socket and connect timeouts, and the wait for a free
    connection), over at most `max_connections` connections."""
    pool = WaitingPool.from_url(url, max_connections=max_connections, timeout=seconds,
                                socket_timeout=seconds, socket_connect_timeout=seconds)
    return aioredis.Redis(connection_pool=pool)
