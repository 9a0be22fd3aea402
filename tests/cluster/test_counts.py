"""Counts and caps across the cluster: three `relay serve` nodes on one real Redis, real aiortc spectators at
every node. A broadcast's `spectators` (its state, its watch page's pushes, its stream) add every node's;
spectators_per_broadcast holds across nodes, exactly under a race; a node killed -9 leaves the counts and gives
its seats back within node_timeout_seconds; /readyz and /metrics show the edge feeds; /odyssey tokens survive a
Redis that came back empty."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import redis.asyncio as aioredis

from relay.client import RelayAPIError, Spectator
from tests.cluster.conftest import CLUSTER_KEY
from tests.cluster.test_cluster_core import AUTH, all_joined, open_connection
from tests.conftest import eventually

HEARTBEAT, NODE_TIMEOUT = 0.25, 1.5  # tests/cluster/conftest.py's node_config


async def live_broadcast(http: aiohttp.ClientSession, node) -> tuple[dict, str]:
    """A connection at `node` with a live stream: (its broadcast, the stream id)."""
    conn = await open_connection(http, node)
    async with http.post(f"{node.url}/v1/connections/{conn['connection_id']}/streams", headers=AUTH,
                         json={"prompt": "a calm ocean"}) as r:
        assert r.status == 201, await r.text()
        return conn["broadcast"], (await r.json())["stream_id"]


def whep(node, broadcast: dict) -> str:
    return f"{node.url}/v1/broadcasts/{broadcast['broadcast_id']}/whep"


async def spectators(http, node, broadcast: dict) -> int | None:
    """The broadcast's count as `node` answers it; None while its Redis call timed out (a busy box)."""
    async with http.get(f"{node.url}/v1/broadcasts/{broadcast['broadcast_id']}",
                        params={"token": broadcast["spectator_token"]}) as r:
        body = await r.json()
        if r.status == 503 and body["error"]["code"] == "CLUSTER_UNAVAILABLE":
            return None
        assert r.status == 200, body
        return body["spectators"]


async def metric(http, node, name: str) -> float:
    async with http.get(f"{node.url}/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not in {node.node_id}'s /metrics")


async def test_spectators_at_three_nodes_are_counted_everywhere(cluster, http):
    a, b, c = await cluster(3)
    broadcast, stream_id = await live_broadcast(http, a)
    token = broadcast["spectator_token"]
    # The watch page's socket, opened at an edge (proxied to the origin): its viewer pushes count every node.
    events = f"{c.url.replace('http', 'ws', 1)}/v1/broadcasts/{broadcast['broadcast_id']}/events?token={token}"
    async with http.ws_connect(events) as ws, \
            Spectator(whep(a, broadcast), token, session=http), \
            Spectator(whep(b, broadcast), token, session=http), \
            Spectator(whep(b, broadcast), token, session=http) as second_at_b, \
            Spectator(whep(c, broadcast), token, session=http):
        await eventually(lambda: _all_say(http, (a, b, c), broadcast, 4), timeout=5,
                         what="every node says 4 spectators")
        async with http.get(f"{c.url}/v1/streams/{stream_id}", headers=AUTH) as r:
            assert (await r.json())["spectators"] == 4
        assert await _pushed(ws, 4)
        # /readyz (unauthenticated) at an edge counts its feed and its viewers, and names no broadcast;
        # /metrics counts the cluster.
        async with http.get(f"{b.url}/readyz") as r:
            ready = await r.json()
        assert (ready["cluster"]["edge_feeds"], ready["cluster"]["edge_spectators"]) == (1, 2)
        assert broadcast["broadcast_id"] not in json.dumps(ready)
        async with http.get(f"{a.url}/readyz") as r:
            ready = await r.json()
        assert (ready["cluster"]["edge_feeds"], ready["cluster"]["edge_spectators"]) == (0, 0)  # the origin: none
        assert await metric(http, b, "relay_cluster_edge_feeds") == 1
        await eventually(lambda: _metric_is(http, a, "relay_cluster_spectators", 4), timeout=5,
                         what="relay_cluster_spectators 4 at the origin")
        await second_at_b.leave()
        await eventually(lambda: _all_say(http, (a, b, c), broadcast, 3), timeout=5, what="3 after one left")
        assert await _pushed(ws, 3)
    await eventually(lambda: _all_say(http, (a, b, c), broadcast, 0), timeout=5, what="0 after all left")
    async with http.delete(f"{c.url}/v1/streams/{stream_id}", headers=AUTH) as r:
        assert r.status in (200, 204), await r.text()
    async with http.get(f"{c.url}/v1/streams/{stream_id}", headers=AUTH) as r:
        assert (await r.json())["spectators"] == 4  # ended: its peak, every node's viewers at once


async def _all_say(http, nodes, broadcast, count: int) -> bool:
    return all([await spectators(http, node, broadcast) == count for node in nodes])


async def _metric_is(http, node, name: str, value: float) -> bool:
    return await metric(http, node, name) == value


async def _pushed(ws: aiohttp.ClientWebSocketResponse, count: int) -> bool:
    """Whether the socket pushes `viewers: count` (the hello's count, or a later push), within 5 s."""
    deadline = asyncio.get_running_loop().time() + 5
    while (left := deadline - asyncio.get_running_loop().time()) > 0:
        message = await ws.receive_json(timeout=left)
        if message.get("viewers") == count or (message["type"] == "viewers" and message["count"] == count):
            return True
    return False


async def test_joiners_racing_at_the_cap_on_three_nodes_admit_exactly_the_free_seats(cluster, http):
    a, b, c = await cluster(3, limits={"spectators_per_broadcast": 3, "pending_whep_per_address": 50})
    broadcast, _ = await live_broadcast(http, a)
    token = broadcast["spectator_token"]
    async with Spectator(whep(b, broadcast), token, session=http):  # one seat taken: two are free
        racers = [Spectator(whep(node, broadcast), token, session=http) for node in (a, b, c) for _ in range(3)]
        try:
            results = await asyncio.gather(*(r.join() for r in racers), return_exceptions=True)
            refused = [r for r in results if isinstance(r, RelayAPIError)]
            assert sum(r is None for r in results) == 2, results
            assert len(refused) == 7 and all(e.status == 503 and e.code == "SPECTATOR_LIMIT_REACHED" for e in refused)
            await eventually(lambda: _all_say(http, (a, b, c), broadcast, 3), timeout=5, what="3 spectators")
        finally:
            await asyncio.gather(*(r.leave() for r in racers))
        # Seats given back on leaving: two can join again, at any node.
        async with Spectator(whep(c, broadcast), token, session=http), \
                Spectator(whep(a, broadcast), token, session=http):
            with_cap = Spectator(whep(b, broadcast), token, session=http)
            try:
                await with_cap.join()
                raise AssertionError("a fourth spectator was admitted")
            except RelayAPIError as err:
                assert err.status == 503 and err.code == "SPECTATOR_LIMIT_REACHED"
            finally:
                await with_cap.leave()


async def test_an_edge_killed_leaves_the_counts_and_gives_its_seats_back(cluster, http):
    nodes = await cluster(3, limits={"spectators_per_broadcast": 3})
    a, b, c = nodes
    await all_joined(http, nodes)
    broadcast, _ = await live_broadcast(http, a)
    token = broadcast["spectator_token"]
    viewers = [Spectator(whep(b, broadcast), token, session=http) for _ in range(2)]
    async with Spectator(whep(a, broadcast), token, session=http):
        try:
            for viewer in viewers:
                await viewer.join()
            await eventually(lambda: _all_say(http, (a, c), broadcast, 3), timeout=5, what="3 spectators")
            b.kill()
            killed = time.monotonic()
            await eventually(lambda: _all_say(http, (a, c), broadcast, 1), timeout=5, what="b's 2 gone")
            left = time.monotonic() - killed
            assert left <= NODE_TIMEOUT + HEARTBEAT + 0.5, f"counted {left:.2f} s after the kill"
            # b's seats lapsed with it: two spectators join at c.
            async with Spectator(whep(c, broadcast), token, session=http), \
                    Spectator(whep(c, broadcast), token, session=http):
                await eventually(lambda: _all_say(http, (a, c), broadcast, 3), timeout=5, what="3 again")
        finally:
            for viewer in viewers:
                if viewer.pc is not None:  # b is dead: nobody to say DELETE to
                    await viewer.pc.close()


async def test_odyssey_tokens_hold_after_redis_comes_back_empty(cluster, redis_server, http):
    a, b = await cluster(2)
    async with http.post(f"{a.url}/odyssey/auth/token", json={"api_key": CLUSTER_KEY}) as r:
        before = {"Authorization": f"Bearer {(await r.json())['access_token']}"}
    client = aioredis.from_url(redis_server.url)
    try:
        secret = await client.get("relay:secret")
        await redis_server.stop()
        await redis_server.start()  # no persistence: the secret is gone until a node offers it back
        await eventually(lambda: _secret_is(client, secret), timeout=5, what="the nodes' secret offered back")
    finally:
        await client.aclose()
    await eventually(lambda: _redis_up(http, (a, b)), timeout=5, what="both nodes see Redis again")
    async with http.post(f"{b.url}/odyssey/sessions/request", headers=before, json={}) as r:
        assert r.status == 200, await r.text()  # minted before the outage at a, accepted at b after it
    async with http.post(f"{b.url}/odyssey/auth/token", json={"api_key": CLUSTER_KEY}) as r:
        after = {"Authorization": f"Bearer {(await r.json())['access_token']}"}
    async with http.post(f"{a.url}/odyssey/sessions/request", headers=after, json={}) as r:
        assert r.status == 200, await r.text()


async def _secret_is(client, secret: bytes) -> bool:
    try:
        return await client.get("relay:secret") == secret
    except (OSError, aioredis.RedisError):
        return False


async def _redis_up(http, nodes) -> bool:
    for node in nodes:
        async with http.get(f"{node.url}/readyz") as r:
            if not (await r.json())["cluster"]["redis"]:
                return False
    return True
