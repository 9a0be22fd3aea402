"""A slug stays unique after Redis lost its data (relay/cluster/directory.py): two `relay serve` nodes on a
real Redis, each paused (SIGSTOP) in turn so whose heartbeat runs when is not left to chance."""

from __future__ import annotations

import os
import signal

import redis.asyncio as aioredis

from tests.cluster.test_cluster_core import AUTH
from tests.conftest import eventually


async def test_a_slug_another_node_took_after_redis_lost_its_data_is_left_to_it_and_survives_our_delete(
        cluster, redis_server, http):
    a, b = await cluster(2)
    async with http.post(f"{a.url}/v1/channels", headers=AUTH, json={"title": "A", "slug": "harbour"}) as r:
        assert r.status == 201, await r.text()
        at_a = await r.json()
    redis = aioredis.from_url(redis_server.url, decode_responses=True)
    paused: list[int] = []

    def pause(node) -> None:
        os.kill(node.proc.pid, signal.SIGSTOP)
        paused.append(node.proc.pid)

    def resume(node) -> None:
        os.kill(node.proc.pid, signal.SIGCONT)
        paused.remove(node.proc.pid)

    async def slug_holder() -> str | None:
        keys = await redis.keys("relay:owner:slug:*")
        return await redis.get(keys[0]) if keys else None

    async def a_channel_entry() -> str | None:
        return await redis.get(f"relay:owner:channel:{at_a['channel_id']}")
    try:
        pause(a)  # a's heartbeat is not to write "harbour" back before b takes it
        await redis.flushall()  # Redis lost its data (a restart without persistence)
        async with http.post(f"{b.url}/v1/channels", headers=AUTH, json={"title": "B", "slug": "harbour"}) as r:
            assert r.status == 201, await r.text()
        assert await slug_holder() == b.node_id
        pause(b)
        resume(a)
        await eventually(lambda: _is(a_channel_entry, a.node_id), timeout=5, what="a's heartbeat back")
        assert await slug_holder() == b.node_id  # a's heartbeat left b's slug to b
        async with http.delete(f"{a.url}/v1/channels/{at_a['channel_id']}", headers=AUTH) as r:
            assert r.status == 204
        await eventually(lambda: _is(a_channel_entry, None), timeout=5, what="a's channel out of the directory")
        assert await slug_holder() == b.node_id  # ... and deleting a's channel did not delete b's entry
    finally:
        for pid in paused:
            os.kill(pid, signal.SIGCONT)
        await redis.aclose()


async def _is(read, value) -> bool:
    return await read() == value
