"""Three `relay serve` processes and one real Redis on loopback: any node answers any call about a
connection or stream of another node (REST and the control socket), placement, the quotas across nodes,
a node killed -9, Redis stopped and restarted mid-stream."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import numpy as np
import pytest

from relay.client import Spectator
from tests.cluster.conftest import AUTH, CLUSTER_KEY, all_joined, members, open_connection
from tests.conftest import eventually, frames_for, mean_rgb


async def test_any_node_answers_a_hosts_rest_calls_and_control_socket(cluster, http):
    a, b, c = await cluster(3)
    conn = await open_connection(http, a)
    cid = conn["connection_id"]
    # REST at another node: the owner's answer, unchanged.
    async with http.get(f"{b.url}/v1/connections/{cid}", headers=AUTH) as r:
        assert r.status == 200 and (await r.json())["connection_id"] == cid
    async with http.get(f"{b.url}/v1/connections/{cid}") as r:
        assert r.status == 401  # the owner's refusal, carried back
    async with http.post(f"{c.url}/v1/connections/{cid}/streams", headers=AUTH, json={"prompt": "a red sky"}) as r:
        assert r.status == 201, await r.text()
        stream_id = (await r.json())["stream_id"]
    async with http.post(f"{b.url}/v1/streams/{stream_id}/interact", headers=AUTH, json={"prompt": "rain"}) as r:
        assert r.status == 200 and (await r.json()) == {"acknowledged_prompt": "rain"}
    async with http.get(f"{c.url}/v1/streams/{stream_id}", headers={"Authorization": f"Bearer {conn['client_token']}"}) as r:
        assert r.status == 200 and (await r.json())["status"] == "live"
    # Unknown ids at any node: 404 as on one node.
    async with http.get(f"{b.url}/v1/connections/{'0' * 32}", headers=AUTH) as r:
        assert r.status == 404 and (await r.json())["error"]["code"] == "NOT_FOUND"

    # The control socket through another node: frames both ways, and the owner's close code.
    ws_url = f"{c.url.replace('http', 'ws', 1)}/v1/connections/{cid}/control"
    async with http.ws_connect(ws_url, headers=AUTH) as ws:
        assert (await ws.receive_json(timeout=5))["type"] == "connected"
        assert (await ws.receive_json(timeout=5))["type"] == "stream_started"
        await ws.send_json({"type": "interact", "prompt": "snow"})
        assert (await ws.receive_json(timeout=5)) == {"type": "interact_acknowledged", "prompt": "snow"}
        async with http.delete(f"{b.url}/v1/connections/{cid}", headers=AUTH) as r:
            assert r.status == 204
        kinds = []
        while (msg := await ws.receive(timeout=5)).type == aiohttp.WSMsgType.TEXT:
            kinds.append(msg.json()["type"])
        assert "disconnected" in kinds
        assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1000 and msg.extra == "disconnected"
    async with http.get(f"{c.url}/v1/connections/{cid}", headers=AUTH) as r:
        assert r.status == 404  # closed: gone from the directory too
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await http.ws_connect(ws_url, headers=AUTH)
    assert refused.value.status == 404


async def test_placement_opens_the_connection_on_a_node_with_a_free_streamer(cluster, http):
    nodes = await cluster(3, limits={"streamers": 1})
    a = nodes[0]
    await all_joined(http, nodes)
    async with http.get(f"{a.url}/metrics") as r:
        text = await r.text()
    assert "relay_cluster_nodes 3.0" in text and "relay_cluster_redis_up 1.0" in text
    opened = [await open_connection(http, a) for _ in range(3)]  # all asked of node a, which has one streamer
    async with http.post(f"{a.url}/v1/connections", headers=AUTH) as r:
        assert r.status == 503 and (await r.json())["error"]["code"] == "STREAMER_NOT_AVAILABLE"
    owners = set()
    for node in nodes:
        async with http.get(f"{node.url}/readyz") as r:
            body = await r.json()
            assert body["streamers_free"] == 0, "one connection per node"
    # The answers' URLs work at any node (here: each connection asked of each node).
    for conn in opened:
        for node in nodes:
            async with http.get(f"{node.url}/v1/connections/{conn['connection_id']}", headers=AUTH) as r:
                assert r.status == 200
        owners.add(conn["control_url"].split("/v1/")[0])
    assert owners == {n.url.replace("http", "ws", 1) for n in nodes}
    # A freed streamer is found again.
    async with http.delete(f"{nodes[2].url}/v1/connections/{opened[1]['connection_id']}", headers=AUTH) as r:
        assert r.status == 204
    await eventually(lambda: _free_somewhere(http, a), timeout=5, what="the freed streamer in membership")
    await open_connection(http, a)


async def _free_somewhere(http, node) -> bool:
    async with http.get(f"{node.url}/readyz") as r:
        return any(n["streamers_free"] > 0 for n in (await r.json())["cluster"]["nodes"])


async def test_concurrent_streams_hold_across_nodes(cluster, http):
    nodes = await cluster(3, limits={"concurrent_streams": 2})
    conns = [await open_connection(http, node) for node in nodes]

    async def start(i: int):
        async with http.post(f"{nodes[(i + 1) % 3].url}/v1/connections/{conns[i]['connection_id']}/streams",
                             headers=AUTH, json={"prompt": f"sky {i}"}) as r:
            return r.status, await r.json()

    outcomes = await asyncio.gather(*(start(i) for i in range(3)))
    statuses = sorted(status for status, _ in outcomes)
    assert statuses == [201, 201, 429], outcomes
    refused = next(i for i, (status, _) in enumerate(outcomes) if status == 429)
    assert outcomes[refused][1]["error"]["code"] == "CONCURRENT_LIMIT_REACHED"
    # Ending one stream frees its slot for the refused one, whichever node each is on.
    ended = next(body["stream_id"] for status, body in outcomes if status == 201)
    async with http.delete(f"{nodes[refused].url}/v1/streams/{ended}", headers=AUTH) as r:
        assert r.status == 200
    status, body = await start(refused)
    assert status == 201, body


SCRIPT = [{"timestamp_ms": 0, "start": {"prompt": "a long calm sea"}}, {"timestamp_ms": 150_000, "end": {}}]


async def test_pending_simulations_race_across_nodes_admits_exactly_one(cluster, http):
    # Workers render slowly enough (150 s of video each) that no job leaves during the race.
    nodes = await cluster(3, limits={"pending_simulations": 10}, recordings={"enabled": True})
    admitted: list[tuple[str, str]] = []

    async def submit(node):
        async with http.post(f"{node.url}/v1/simulations", headers=AUTH, json={"script": SCRIPT}) as r:
            body = await r.json()
            if r.status == 202:
                admitted.append((node.url, body["job_id"]))
            return r.status, body

    for i in range(9):
        assert (await submit(nodes[i % 3]))[0] == 202
    outcomes = await asyncio.gather(*(submit(nodes[i % 3]) for i in range(10)))
    statuses = [status for status, _ in outcomes]
    assert statuses.count(202) == 1 and statuses.count(429) == 9, outcomes
    assert all(body["error"]["code"] == "SIMULATION_QUEUE_FULL" for status, body in outcomes if status == 429)
    # Cancelling one (at the node that admitted it) gives its slot back to the cluster.
    for url, job_id in admitted:
        async with http.delete(f"{url}/v1/simulations/{job_id}", headers=AUTH) as r:
            if r.status == 200:
                break
    await eventually(lambda: _admits(submit, nodes[0]), timeout=5, what="a slot after a cancel")
    for url, job_id in admitted:  # leave no worker rendering for the next test
        async with http.delete(f"{url}/v1/simulations/{job_id}", headers=AUTH):
            pass


async def _admits(submit, node) -> bool:
    return (await submit(node))[0] == 202


async def test_a_node_killed_leaves_within_node_timeout_and_its_ids_answer_404(cluster, http):
    nodes = await cluster(3)
    a, b, _ = nodes
    await all_joined(http, nodes)
    conn = await open_connection(http, b)
    cid, bid = conn["connection_id"], conn["broadcast"]["broadcast_id"]
    async with http.get(f"{a.url}/v1/connections/{cid}", headers=AUTH) as r:
        assert r.status == 200
    b.kill()
    killed = time.monotonic()
    await eventually(lambda: _without(http, a, b.node_id), timeout=5, what="b gone from membership")
    left = time.monotonic() - killed
    assert left <= 1.5 + 0.25 + 0.5, f"left after {left:.2f} s (node_timeout 1.5 s)"
    async with http.get(f"{a.url}/v1/connections/{cid}", headers=AUTH) as r:
        assert r.status == 404 and (await r.json())["error"]["code"] == "NOT_FOUND"
    async with http.get(f"{a.url}/v1/broadcasts/{bid}") as r:
        assert r.status == 404


async def _without(http, node, node_id) -> bool:
    return node_id not in await members(http, node)


async def test_redis_stopped_and_restarted_mid_stream(cluster, redis_server, http):
    a, b, _ = await cluster(3)
    conn = await open_connection(http, a)
    cid = conn["connection_id"]
    async with http.post(f"{a.url}/v1/connections/{cid}/streams", headers=AUTH, json={"prompt": "a calm sea"}) as r:
        assert r.status == 201
    broadcast = conn["broadcast"]
    async with Spectator(broadcast["whep_url"], broadcast["spectator_token"]) as viewer:
        await asyncio.wait_for(viewer.track.recv(), 10)
        await redis_server.stop()
        # What needs Redis fails fast and says so; the stream goes on at its node.
        started = time.monotonic()
        async with http.get(f"{b.url}/v1/connections/{cid}", headers=AUTH) as r:
            assert r.status == 503 and (await r.json())["error"]["code"] == "CLUSTER_UNAVAILABLE"
        assert time.monotonic() - started < 3
        frames = 0
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            await asyncio.wait_for(viewer.track.recv(), 2)
            frames += 1
        assert frames >= 30, f"{frames} frames in 2 s without Redis"
        async with http.get(f"{a.url}/v1/connections/{cid}", headers=AUTH) as r:
            assert r.status == 200  # the owner answers for its own without Redis
        async with http.get(f"{a.url}/readyz") as r:
            assert (await r.json())["cluster"]["redis"] is False
        # A spectator joins at the origin without Redis (its seat written back later), counted there.
        async with Spectator(broadcast["whep_url"], broadcast["spectator_token"], session=http) as second:
            await asyncio.wait_for(second.track.recv(), 10)
            await eventually(lambda: _counted(http, a, broadcast, 2), timeout=5, what="2 counted without Redis")
        await redis_server.start()  # empty: the nodes write it all back
        await eventually(lambda: _answers(http, b, cid), timeout=5, what="a cross-node call after Redis is back")
        await asyncio.wait_for(viewer.track.recv(), 5)


async def _answers(http, node, cid) -> bool:
    async with http.get(f"{node.url}/v1/connections/{cid}", headers=AUTH) as r:
        return r.status == 200


async def test_odyssey_tokens_hold_on_every_node_and_signalling_reaches_the_owner(cluster, http):
    a, b, _ = await cluster(3)
    async with http.post(f"{a.url}/odyssey/auth/token", json={"api_key": CLUSTER_KEY}) as r:
        access = {"Authorization": f"Bearer {(await r.json())['access_token']}"}
    async with http.post(f"{b.url}/odyssey/sessions/request", headers=access, json={}) as r:
        assert r.status == 200, await r.text()  # minted at a, accepted at b
    async with http.post(f"{a.url}/odyssey/sessions/request", headers=access, json={}) as r:
        session_id = (await r.json())["session_id"]
    async with http.post(f"{a.url}/odyssey/sessions/token", headers=access, json={"session_id": session_id}) as r:
        token = (await r.json())["session_token"]
    # The SDK's signalling socket for a session of node a, opened at node b: proxied, the offer comes through.
    url = f"{b.url.replace('http', 'ws', 1)}/odyssey/signalling/client/{session_id}?token={token}"
    async with http.ws_connect(url) as ws:
        assert (await ws.receive_json(timeout=10))["type"] == "offer"


async def test_spectators_at_every_node_watch_one_broadcast_through_edges(cluster, http):
    # The origin (A) holds the stream; B and C serve it as edges, each from one uncounted feed.
    a, b, c = await cluster(3)
    conn = await open_connection(http, a)
    async with http.post(f"{a.url}/v1/connections/{conn['connection_id']}/streams", headers=AUTH,
                         json={"prompt": "a calm ocean"}) as r:
        assert r.status == 201, await r.text()
        stream_id = (await r.json())["stream_id"]
    broadcast = conn["broadcast"]
    whep = {node: f"{node.url}/v1/broadcasts/{broadcast['broadcast_id']}/whep" for node in (a, b, c)}
    async with Spectator(whep[a], broadcast["spectator_token"], session=http) as at_a, \
            Spectator(whep[b], broadcast["spectator_token"], session=http) as at_b, \
            Spectator(whep[c], broadcast["spectator_token"], session=http) as at_c:
        seen = await asyncio.gather(*(frames_for(s.track, 2.0) for s in (at_a, at_b, at_c)))
        assert all(len(frames) >= 44 for frames in seen), [len(f) for f in seen]  # >= 22 fps at every node
        # A host prompt at the origin changes the picture at every node, far beyond its natural motion.
        before = [mean_rgb(frames[-1]) for frames in seen]
        drift = max(np.abs(mean_rgb(frames[0]) - mean_rgb(frames[-1])).sum() for frames in seen)
        async with http.post(f"{a.url}/v1/streams/{stream_id}/interact", headers=AUTH,
                             json={"prompt": "neon night over a lava desert"}) as r:
            assert r.status == 200, await r.text()

        async def changed(spectator, reference) -> float:
            change = 0.0
            for _ in range(75):  # up to 3 s of frames for the ~1 s transition
                change = np.abs(mean_rgb(await spectator.track.recv()) - reference).sum()
                if change > max(30.0, 4 * drift):
                    break
            return change

        changes = await asyncio.gather(*(changed(s, ref) for s, ref in zip((at_a, at_b, at_c), before)))
        assert all(change > max(30.0, 4 * drift) for change in changes), (changes, drift)
        # Every node's spectators count, the edges' feeds not (tests/cluster/test_counts.py for more).
        await eventually(lambda: _counted(http, a, broadcast, 3), timeout=5, what="3 spectators at the origin")
    async with http.post(whep[b], data="v=0\r\n", params={"token": "wrong"},
                         headers={"Content-Type": "application/sdp"}) as r:
        assert r.status == 401  # the edge checks the broadcast's own token


async def _counted(http, node, broadcast, count: int) -> bool:
    async with http.get(f"{node.url}/v1/broadcasts/{broadcast['broadcast_id']}",
                        params={"token": broadcast["spectator_token"]}) as r:
        return r.status == 200 and (await r.json())["spectators"] == count
