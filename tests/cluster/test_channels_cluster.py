"""Channels in a cluster: a channel is kept by the node that made it (its data_dir), and answered for at
every node: /v1/channels/{id} is carried to its node, its broadcast (between hosts too) is in the directory,
and GET /v1/channels lists the key's channels at every node. Two `relay serve` nodes on a real Redis."""

from __future__ import annotations

from relay.client import Spectator
from tests.cluster.test_cluster_core import AUTH
from tests.conftest import eventually


async def _create(http, node, title: str) -> dict:
    async with http.post(f"{node.url}/v1/channels", headers=AUTH, json={"title": title}) as r:
        assert r.status == 201, await r.text()
        return await r.json()


async def test_a_channel_and_its_hostless_broadcast_answer_at_every_node(cluster, http):
    a, b = await cluster(2)
    lesson = await _create(http, a, "Lesson")
    channel_url = f"{b.url}/v1/channels/{lesson['channel_id']}"
    async with http.get(channel_url, headers=AUTH) as r:  # at the other node, at once (before any heartbeat)
        assert r.status == 200, await r.text()
        assert (await r.json())["title"] == "Lesson"
    async with http.patch(channel_url, headers=AUTH, json={"title": "Lesson 2"}) as r:
        assert r.status == 200 and (await r.json())["title"] == "Lesson 2"
    async with http.get(f"{a.url}/v1/channels/{lesson['channel_id']}", headers=AUTH) as r:
        assert (await r.json())["title"] == "Lesson 2"  # changed at its node, where it is kept
    # Its broadcast, with no host yet: its state and WHEP at the other node.
    broadcast = lesson["broadcast"]
    async with http.get(f"{b.url}/v1/broadcasts/{broadcast['broadcast_id']}",
                        params={"token": broadcast["spectator_token"]}) as r:
        assert r.status == 200, await r.text()
    async with Spectator(f"{b.url}/v1/broadcasts/{broadcast['broadcast_id']}/whep", broadcast["spectator_token"],
                         session=http) as viewer:
        assert viewer.location.startswith(b.url)  # b serves it (as an edge of a)
    # Listed at either node, oldest first, every node's.
    other = await _create(http, b, "Other")
    for node in (a, b):
        async with http.get(f"{node.url}/v1/channels", headers=AUTH) as r:
            listing = await r.json()
        assert [c["channel_id"] for c in listing["channels"]] == [lesson["channel_id"], other["channel_id"]]
        assert (listing["total"], listing["partial"]) == (2, False)
    # Deleted at the other node: gone everywhere.
    async with http.delete(channel_url, headers=AUTH) as r:
        assert r.status == 204, await r.text()
    for node in (a, b):
        async with http.get(f"{node.url}/v1/channels/{lesson['channel_id']}", headers=AUTH) as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "NOT_FOUND"
    await eventually(lambda: _gone(http, b, broadcast), timeout=5, what="its broadcast gone at the other node")


async def test_a_channel_at_another_node_is_refused_to_strangers_and_bad_ids(cluster, http):
    a, b = await cluster(2)
    lesson = await _create(http, a, "Lesson")
    async with http.get(f"{b.url}/v1/channels/{lesson['channel_id']}", headers={"Authorization": "Bearer nope"}) as r:
        assert r.status == 401 and (await r.json())["error"]["code"] == "UNAUTHORIZED"
    for ident in ("0" * 32, "x" * 129):
        async with http.get(f"{b.url}/v1/channels/{ident}", headers=AUTH) as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "NOT_FOUND"
    async with http.get(f"{b.url}/v1/channels", headers={"Authorization": "Bearer nope"}) as r:
        assert r.status == 401


async def _gone(http, node, broadcast: dict) -> bool:
    async with http.get(f"{node.url}/v1/broadcasts/{broadcast['broadcast_id']}",
                        params={"token": broadcast["spectator_token"]}) as r:
        return r.status == 404
