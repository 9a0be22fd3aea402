"""A spectator leaving a node whose Redis stalls: its peer connection closes at once, its seat is given back
when Redis answers again (a real relay node, a real redis-server paused with CLIENT PAUSE, a real aiortc viewer)."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from relay.client import Spectator
from relay.cluster.quota import quota_key
from tests.cluster.test_counts import live_broadcast, metric, whep
from tests.conftest import eventually

# A beat of 2 s makes each Redis call wait up to 2 s: longer than the pause, which the old order sat through.
SLOW_BEAT = {"heartbeat_seconds": 2, "node_timeout_seconds": 6}
PAUSE_MS = 1500


async def test_a_leaving_spectator_is_closed_without_waiting_on_a_stalled_redis(cluster, redis_server, http):
    (a,) = await cluster(1, cluster=SLOW_BEAT)
    broadcast, _stream_id = await live_broadcast(http, a)
    seats = quota_key("spectators", broadcast["broadcast_id"])
    client = aioredis.from_url(redis_server.url)
    try:
        async with Spectator(whep(a, broadcast), broadcast["spectator_token"], session=http) as viewer:
            assert await client.zcard(seats) == 1
            peers = await metric(http, a, "relay_peer_connections")
            await client.client_pause(PAUSE_MS)  # every client's commands wait: Redis stalls, it is not away
            loop = asyncio.get_running_loop()
            started = loop.time()
            async with http.delete(viewer.location) as r:
                assert r.status == 200, await r.text()
            assert loop.time() - started < PAUSE_MS / 2000  # answered (the peer closed) long before Redis
            viewer.location = None
            assert await metric(http, a, "relay_peer_connections") == peers - 1
        # Redis answers again: the seat given back lands (no need to wait for it to lapse).
        await eventually(lambda: _zcard_is(client, seats, 0), timeout=PAUSE_MS / 1000 + 3, what="the seat given back")
    finally:
        await client.aclose()


async def _zcard_is(client, key: str, count: int) -> bool:
    return await client.zcard(key) == count
