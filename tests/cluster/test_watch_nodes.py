"""GET /v1/broadcasts/{id}/nodes, where a watch page goes when its node dies: answered by any node from
its own view of the cluster (never forwarded), least-loaded first, no secrets, bounded; a node killed -9
leaves the list within node_timeout. And on a single node: just that node."""

from __future__ import annotations

import time

from relay.client import RelayClient, Spectator
from tests.cluster.conftest import AUTH, all_joined, open_connection
from tests.conftest import API_KEY, eventually


def nodes_url(node, broadcast_id: str) -> str:
    return f"{node.url}/v1/broadcasts/{broadcast_id}/nodes"


async def watch_nodes(http, node, broadcast: dict) -> list[dict]:
    async with http.get(nodes_url(node, broadcast["broadcast_id"]), params={"token": broadcast["spectator_token"]}) as r:
        assert r.status == 200, await r.text()
        assert r.headers["Cache-Control"] == "private, max-age=1"  # heartbeat 0.25 s: at least a second
        assert r.headers["Access-Control-Allow-Origin"] == "*"  # a page of another node may ask
        body = await r.json()
    assert body["broadcast_id"] == broadcast["broadcast_id"]
    return body["nodes"]


async def test_every_node_lists_the_live_nodes_least_loaded_first_and_a_killed_one_leaves(cluster, http):
    nodes = await cluster(3)
    a, b, c = nodes
    await all_joined(http, nodes)
    conn = await open_connection(http, a)
    broadcast = conn["broadcast"]
    async with http.post(f"{a.url}/v1/connections/{conn['connection_id']}/streams", headers=AUTH,
                         json={"prompt": "a calm ocean"}) as r:
        assert r.status == 201
    for node in nodes:  # the origin and both edges answer the same, each from its own beat
        listed = await watch_nodes(http, node, broadcast)
        assert {n["node_id"] for n in listed} == {"node1", "node2", "node3"}
        assert all(set(n) == {"node_id", "url"} for n in listed)  # no load, no secret
        assert {n["url"] for n in listed} == {a.url, b.url, c.url}

    # Two spectators at the edge B: B is the most loaded (its edge's viewers count), so it comes last.
    whep = f"{b.url}/v1/broadcasts/{broadcast['broadcast_id']}/whep"
    async with Spectator(whep, broadcast["spectator_token"], session=http), \
            Spectator(whep, broadcast["spectator_token"], session=http):
        async def b_last() -> bool:
            return (await watch_nodes(http, c, broadcast))[-1]["node_id"] == "node2"
        await eventually(b_last, timeout=3, what="B listed last once its edge holds two viewers")

    c.kill()
    killed = time.monotonic()

    async def c_gone() -> bool:
        return "node3" not in {n["node_id"] for n in await watch_nodes(http, b, broadcast)}
    await eventually(c_gone, timeout=5, what="C gone from the list")
    assert time.monotonic() - killed <= 1.5 + 0.25 + 1.0


async def test_wrong_token_unknown_or_oversized_ids_are_refused_in_the_error_shape(cluster, http):
    a, b = await cluster(2)
    conn = await open_connection(http, a)
    broadcast = conn["broadcast"]
    for node in (a, b):  # the origin checks its own broadcast; an edge checks the directory's token
        async with http.get(nodes_url(node, broadcast["broadcast_id"]), params={"token": "wrong"}) as r:
            assert r.status == 401 and (await r.json())["error"]["code"] == "UNAUTHORIZED"
        async with http.get(nodes_url(node, broadcast["broadcast_id"])) as r:
            assert r.status == 401
        for ident in ("0" * 32, "x" * 129):
            async with http.get(nodes_url(node, ident), params={"token": broadcast["spectator_token"]}) as r:
                assert r.status == 404 and (await r.json())["error"]["code"] == "NOT_FOUND"
        async with http.options(nodes_url(node, broadcast["broadcast_id"]),
                                headers={"Origin": "http://elsewhere.example", "Access-Control-Request-Method": "GET"}) as r:
            assert r.status == 204 and r.headers["Access-Control-Allow-Origin"] == "*"


async def test_a_single_node_lists_itself(relay_factory, http):
    relay = await relay_factory()
    async with RelayClient(relay.url, API_KEY) as client, client.connect() as conn:
        b = conn.broadcast
        async with http.get(f"{relay.url}/v1/broadcasts/{b['broadcast_id']}/nodes",
                            params={"token": b["spectator_token"]}) as r:
            assert r.status == 200
            assert (await r.json())["nodes"] == [{"node_id": "", "url": relay.url}]
        async with http.get(f"{relay.url}/v1/broadcasts/{b['broadcast_id']}/nodes", params={"token": "x"}) as r:
            assert r.status == 401
