"""Spectators' seats and viewer counts under load and failure: the pool, the give-backs, the counts gone to 0
(fakeredis where no Lua runs, the real redis-server where the seats' script or the pool is what is tested)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import fakeredis
import pytest

from relay.cluster.node import Cluster
from relay.cluster.quota import quota_key
from relay.cluster.seats import SpectatorCounts, viewers_key
from relay.config import Settings
from relay.errors import RelayError
from tests.conftest import eventually


async def test_a_count_gone_to_zero_is_removed_even_when_its_write_failed_or_a_beat_came_first():
    server = fakeredis.FakeServer()
    client = fakeredis.FakeAsyncRedis(server=server)
    counts = SpectatorCounts(client, "a", 2.0)
    key = viewers_key("bc1")
    try:
        counts.changed("bc1", 1)
        await eventually(lambda: client.hexists(key, "a"), timeout=5, what="the count written")
        # The last viewer leaves while Redis is away: the write fails, and the next beat must still HDEL it.
        server.connected = False
        counts.changed("bc1", 0)
        await eventually(lambda: counts._flusher.done(), timeout=5, what="the failed write")
        server.connected = True
        await counts.beat([], live={"a"})
        assert not await client.hexists(key, "a")
        # A beat that runs before the writer task does: it takes the dirty ids with it, and HDELs the absent.
        counts.changed("bc2", 2)
        await counts.beat([], live={"a"})
        counts.changed("bc2", 0)
        await counts.beat([], live={"a"})
        await eventually(lambda: counts._flusher.done(), timeout=5, what="the writer task")
        assert not await client.hexists(viewers_key("bc2"), "a")
    finally:
        await counts.close()
        await client.aclose()


async def test_a_burst_of_joins_waits_for_a_connection_and_holds_the_cap(redis_server):
    # 400 joiners at once at a cap of 150, with lookups alongside: more calls than the node has connections.
    cluster = Cluster(_settings(redis_server, redis_max_connections=20), _IDLE)
    try:
        await cluster.start()
        seats = cluster.spectators.for_broadcast("bc1")
        taken, owners = await asyncio.gather(
            asyncio.gather(*(seats.take(f"s{i}", 150) for i in range(400))),
            asyncio.gather(*(cluster.owner("connection", f"c{i}") for i in range(200))))
        assert sum(taken) == 150 and owners == [None] * 200
        assert await cluster.redis.zcard(quota_key("spectators", "bc1")) == 150
        assert len(cluster.spectators.seats.held) == 150
        # Every connection held (a burst that outlasts the wait): a joiner is refused with 503 CLUSTER_BUSY,
        # not admitted on this node's count, and Redis is not taken for away.
        pool = cluster.redis.connection_pool
        busy = [await pool.get_connection() for _ in range(pool.max_connections)]
        try:
            with pytest.raises(RelayError) as refused:
                await seats.take("one-more", 1000)
            assert refused.value.code == "CLUSTER_BUSY" and refused.value.status == 503
            with pytest.raises(RelayError, match="busy"):
                await cluster.owner("connection", "c1")
            await cluster.beat()
            assert cluster.reachable and "one-more" not in cluster.spectators.seats.held
        finally:
            for connection in busy:
                await pool.release(connection)
        assert await seats.take("one-more", 1000)
        # And they all leave at once (a broadcast closing): every seat is free, none left behind.
        for spectator_id in [f"s{i}" for i in range(400)] + ["one-more"]:
            seats.give_back(spectator_id)
        assert cluster.spectators.seats.held == {}
        await eventually(lambda: _zcard_is(cluster.redis, "bc1", 0), timeout=5, what="every seat given back")
    finally:
        await cluster.close()


async def _zcard_is(redis, broadcast_id: str, count: int) -> bool:
    return await redis.zcard(quota_key("spectators", broadcast_id)) == count


_IDLE = SimpleNamespace(connections={}, broadcasts={}, channels=None, streamers_free=1, stream_ids=lambda: [])


def _settings(redis_server, **cluster) -> Settings:
    return Settings.from_dict({"server": {"public_url": "http://127.0.0.1:1"},
                               "cluster": {"redis_url": redis_server.url, "heartbeat_seconds": 0.2,
                                           "node_timeout_seconds": 2, **cluster}})
