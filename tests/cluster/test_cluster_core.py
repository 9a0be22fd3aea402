"""Three `relay serve` processes and one real Redis on loopback: any node answers any call about a
connection or stream of another node (REST and the control socket), placement, the quotas across nodes,
a node killed -9, Redis stopped and restarted mid-stream."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from relay.client import Spectator
from tests.cluster.conftest import CLUSTER_KEY
from tests.conftest import eventually

AUTH = {"Authorization": f"Bearer {CLUSTER_KEY}"}


async def open_connection(http: aiohttp.ClientSession, node) -> dict:
    async with http.post(f"{node.url}/v1/connections", headers=AUTH) as r:
        assert r.status == 201, await r.text()
        return await r.json()


async def members(http: aiohttp.ClientSession, node) -> set[str]:
    async with http.get(f"{node.url}/readyz") as r:
        return {n["node_id"] for n in (await r.json())["cluster"]["nodes"]}


async def all_joined(http, nodes) -> None:
    names = {n.node_id for n in nodes}

    async def joined():
        return all([await members(http, n) == names for n in nodes])
    await eventually(joined, timeout=10, what="every node sees every node")


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
