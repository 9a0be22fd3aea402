"""Spectators' seats and viewer counts under load and failure: the pool, the give-backs, the counts gone to 0
(fakeredis where no Lua runs, the real redis-server where the seats' script or the pool is what is tested)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import fakeredis
import pytest
import redis.asyncio as aioredis

from relay.cluster.node import Cluster
from relay.cluster.quota import quota_key
from relay.cluster.seats import SpectatorCounts, seat_keys, viewers_key
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
        refusals, owners = await asyncio.gather(
            asyncio.gather(*(seats.take(f"s{i}", 150) for i in range(400))),
            asyncio.gather(*(cluster.owner("connection", f"c{i}") for i in range(200))))
        assert refusals.count(None) == 150 and owners == [None] * 200
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
        assert await seats.take("one-more", 1000) is None
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


async def test_one_address_holds_its_share_of_seats_across_nodes_and_lapsed_ones_count_no_more(redis_server):
    # The seats' Lua on the real redis-server: two nodes on one Redis, 10 seats, spectators_per_address = 3.
    client = aioredis.from_url(redis_server.url)
    a, b = SpectatorCounts(client, "a", 30.0), SpectatorCounts(client, "b", 1.0)
    at_a, at_b = a.for_broadcast("bc1"), b.for_broadcast("bc1")
    seats, addresses, held = seat_keys("bc1")
    x = "198.51.100.7"
    try:
        # Ten joiners from one address racing at both nodes: exactly three seated, the rest refused for it.
        refusals = await asyncio.gather(*((at_a if i % 2 else at_b).take(f"x{i}", 10, x, 3) for i in range(10)))
        assert refusals.count(None) == 3 and refusals.count("spectators_per_address") == 7
        assert await client.hget(held, x) == b"3"
        # Other addresses still find the broadcast's free seats; at the broadcast's cap, that cap refuses first.
        others = [await at_a.take(f"y{i}", 10, f"203.0.113.{i}", 3) for i in range(8)]
        assert others == [None] * 7 + ["spectators_per_broadcast"]
        # Refused addresses leave nothing behind: the hashes hold the seated only, and expire with the seats.
        assert (await client.zcard(seats), await client.hlen(addresses), await client.hlen(held)) == (10, 10, 8)
        for key in (seats, addresses, held):
            assert 0 < await client.pttl(key) <= 30000
        # A seat given back (twice: idempotent) is the address's again, at the other node.
        holder = a if _of(a, x) else b
        mine = next(s for s, (_, address) in holder.seats.held.items() if address == x)
        holder.give_back(mine)
        holder.give_back(mine)
        await eventually(lambda: _takes(at_b, "x-again", 10, x, 3), timeout=5, what="the seat given back")
        assert await at_a.take("x-more", 11, x, 3) == "spectators_per_address"
        # b dies (no longer refreshes): its seats lapse within its timeout, and its address's count with them.
        at_a_count = _of(a, x)  # only b's (lapsing at different times) stand between x and a seat more here
        assert _of(b, x) == len(b.seats.held) > 0
        b.seats.held.clear()
        await eventually(lambda: _takes(at_a, "x-after", 10, x, at_a_count + 1), timeout=5, what="b's seats lapsed")
        assert await client.hget(held, x) == str(at_a_count + 1).encode()
        assert {s.decode() for s in await client.hkeys(addresses)} == set(a.seats.held)
        # Redis comes back empty: the holder's beat writes its seats and its addresses' counts back.
        await client.flushall()
        await a.beat([], live={"a"})
        assert await client.hget(held, x) == str(_of(a, x)).encode()
        assert await at_a.take("x-full", 20, x, _of(a, x)) == "spectators_per_address"
        # Given back all at once (a broadcast closing): nothing is left of the seats or the addresses.
        for spectator_id in list(a.seats.held):
            at_a.give_back(spectator_id)
        await eventually(lambda: _gone(client, seats, addresses, held), timeout=5, what="every seat given back")
    finally:
        await a.close()
        await b.close()
        await client.aclose()


def _of(counts: SpectatorCounts, address: str) -> int:
    """Seats the node holds for the address."""
    return sum(1 for _, held_for in counts.seats.held.values() if held_for == address)


async def _takes(seats, spectator_id: str, limit: int, address: str, address_limit: int) -> bool:
    return await seats.take(spectator_id, limit, address, address_limit) is None


async def _gone(client, *keys: str) -> bool:
    return not await client.exists(*keys)
