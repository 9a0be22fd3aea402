"""Channels in a cluster: a channel is kept by the node that made it (its data_dir), and answered for at
every node: /v1/channels/{id} is carried to its node, its broadcast (between hosts too) is in the directory,
and GET /v1/channels lists the key's channels at every node. Two `relay serve` nodes on a real Redis."""

from __future__ import annotations

import asyncio
import os
import signal

import redis.asyncio

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


async def test_a_slug_answers_at_every_node_and_a_connection_on_it_opens_at_the_channels_node(cluster, http):
    a, b = await cluster(2)
    async with http.post(f"{a.url}/v1/channels", headers=AUTH, json={"title": "Friday", "slug": "friday"}) as r:
        friday = await r.json()
    async with http.get(f"{b.url}/v1/channels/friday", headers=AUTH) as r:  # at once, before any heartbeat
        assert r.status == 200, await r.text()
        assert (await r.json())["channel_id"] == friday["channel_id"]
    async with http.post(f"{b.url}/v1/connections", headers=AUTH, json={"channel_id": "friday"}) as r:
        opened = await r.json()
        assert r.status == 201, opened
    assert opened["broadcast"] == friday["broadcast"]  # the channel's lasting broadcast, at its node
    assert opened["control_url"].startswith(a.url.replace("http", "ws", 1))
    async with http.post(f"{b.url}/v1/connections", headers=AUTH, json={"channel_id": friday["channel_id"]}) as r:
        assert r.status == 409 and (await r.json())["error"]["code"] == "CHANNEL_IN_USE"  # a's answer
    # A slug is the key's once across the cluster, as on one node.
    async with http.post(f"{b.url}/v1/channels", headers=AUTH, json={"title": "Again", "slug": "friday"}) as r:
        assert r.status == 409 and (await r.json())["error"]["code"] == "SLUG_TAKEN"
    other = await _create(http, b, "Other")
    async with http.patch(f"{b.url}/v1/channels/{other['channel_id']}", headers=AUTH, json={"slug": "friday"}) as r:
        assert r.status == 409 and (await r.json())["error"]["code"] == "SLUG_TAKEN"
    # Renamed at the other node: the new slug answers everywhere at once, the old one nowhere.
    async with http.patch(f"{b.url}/v1/channels/friday", headers=AUTH, json={"slug": "saturday"}) as r:
        assert r.status == 200, await r.text()
    for node in (a, b):
        async with http.get(f"{node.url}/v1/channels/saturday", headers=AUTH) as r:
            assert r.status == 200
        async with http.get(f"{node.url}/v1/channels/friday", headers=AUTH) as r:
            assert r.status == 404
    async with http.patch(f"{b.url}/v1/channels/{other['channel_id']}", headers=AUTH, json={"slug": "friday"}) as r:
        assert r.status == 200, await r.text()  # free again
    # Another key's slug of the same name is another channel: none here.
    async with http.post(f"{b.url}/v1/connections", headers={"Authorization": "Bearer nope"},
                         json={"channel_id": "saturday"}) as r:
        assert r.status == 401
    for ref in ("", "y" * 129, "no-such-slug"):
        async with http.post(f"{b.url}/v1/connections", headers=AUTH, json={"channel_id": ref}) as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "NOT_FOUND", ref


async def test_two_nodes_racing_for_one_slug_make_one_channel_and_a_refused_channel_frees_its_slug(cluster, http):
    a, b = await cluster(2, limits={"channels_per_key": 2})

    async def create(node, title: str) -> tuple[int, dict]:
        async with http.post(f"{node.url}/v1/channels", headers=AUTH, json={"title": title, "slug": "race"}) as r:
            return r.status, await r.json()
    for attempt in range(5):  # the same instant at both nodes: exactly one wins, every time
        answers = await asyncio.gather(create(a, "A"), create(b, "B"))
        assert sorted(status for status, _ in answers) == [201, 409], answers
        assert [body["error"]["code"] for status, body in answers if status == 409] == ["SLUG_TAKEN"]
        winner = next(body for status, body in answers if status == 201)
        async with http.delete(f"{a.url}/v1/channels/{winner['channel_id']}", headers=AUTH) as r:
            assert r.status == 204
    # A channel the store refuses (the key is at its channels_per_key at a) leaves no claim on its slug.
    for title in ("One", "Two"):
        await _create(http, a, title)
    async with http.post(f"{a.url}/v1/channels", headers=AUTH, json={"title": "Three", "slug": "kept"}) as r:
        assert r.status == 409 and (await r.json())["error"]["code"] == "CHANNEL_LIMIT_REACHED"

    async def free_at_b() -> bool:
        async with http.post(f"{b.url}/v1/channels", headers=AUTH, json={"title": "Three", "slug": "kept"}) as r:
            return r.status == 201
    await eventually(free_at_b, timeout=5, what="the refused channel's slug free at the other node")


async def test_a_channel_whose_node_is_down_answers_503_with_what_to_do_at_the_others(cluster, http):
    a, b = await cluster(2)
    async with http.post(f"{a.url}/v1/channels", headers=AUTH, json={"title": "Friday", "slug": "friday"}) as r:
        friday = await r.json()
    a.kill()

    async def down() -> bool:  # NODE_UNAVAILABLE (its calls refused) until its record expires
        async with http.get(f"{b.url}/v1/channels/{friday['channel_id']}", headers=AUTH) as r:
            return r.status == 503 and (await r.json())["error"]["code"] == "CHANNEL_NODE_UNAVAILABLE"
    await eventually(down, timeout=5, what="the channel's node seen down")  # node_timeout_seconds 1.5
    for method, path, body in (("GET", "/v1/channels/friday", None),
                               ("POST", "/v1/connections", {"channel_id": "friday"}),
                               ("POST", "/v1/connections", {"channel_id": friday["channel_id"]})):
        async with http.request(method, b.url + path, headers=AUTH, json=body) as r:
            answer = await r.json()
            assert r.status == 503 and answer["error"]["code"] == "CHANNEL_NODE_UNAVAILABLE", answer
            assert answer["error"]["action"] and int(r.headers["Retry-After"]) >= 1
            assert answer["error"]["details"]["node_id"] == a.node_id
    async with http.get(f"{b.url}/v1/channels/{'0' * 32}", headers=AUTH) as r:
        assert r.status == 404  # unknown is still unknown
    async with http.post(f"{b.url}/v1/connections", headers=AUTH) as r:
        assert r.status == 201  # b itself goes on


async def test_a_slug_freed_while_redis_stalled_is_free_at_every_node_once_it_answers(cluster, redis_server, http):
    a, b = await cluster(2)
    async with http.post(f"{a.url}/v1/channels", headers=AUTH, json={"title": "Friday", "slug": "friday"}) as r:
        friday = await r.json()
    os.kill(redis_server.proc.pid, signal.SIGSTOP)  # Redis stalls, its data kept: the slug's entry names a
    try:
        async with http.delete(f"{a.url}/v1/channels/{friday['channel_id']}", headers=AUTH) as r:
            assert r.status == 204  # deleted at its node; its slug's entry is owed to a heartbeat that reaches Redis
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)

    async def free_at_b() -> bool:  # not held for CHANNEL_HOME_SECONDS by a channel that no longer exists
        async with http.post(f"{b.url}/v1/channels", headers=AUTH, json={"title": "Friday", "slug": "friday"}) as r:
            return r.status == 201
    await eventually(free_at_b, timeout=10, what="the slug free at the other node")


async def test_a_refused_duplicate_never_gives_back_the_slug_its_own_channel_holds(cluster, redis_server, http):
    # Beats 3 s apart: between two, Redis loses its data, and the node's own channel's slug entry is gone.
    a, b = await cluster(2, cluster={"heartbeat_seconds": 3, "node_timeout_seconds": 10})
    async with http.post(f"{a.url}/v1/channels", headers=AUTH, json={"title": "Zed", "slug": "zed"}) as r:
        assert r.status == 201
    client = redis.asyncio.from_url(redis_server.url)
    try:
        await client.flushall()
    finally:
        await client.aclose()
    # A duplicate at a takes the free key, then a's store refuses it: the key stays a's (its channel has the slug).
    async with http.post(f"{a.url}/v1/channels", headers=AUTH, json={"title": "Zed 2", "slug": "zed"}) as r:
        assert r.status == 409 and (await r.json())["error"]["code"] == "SLUG_TAKEN"
    async with http.post(f"{b.url}/v1/channels", headers=AUTH, json={"title": "Zed 3", "slug": "zed"}) as r:
        assert r.status == 409 and (await r.json())["error"]["code"] == "SLUG_TAKEN"  # one channel per slug
    # A malformed slug is the store's to refuse (422), and never written to Redis.
    async with http.post(f"{b.url}/v1/channels", headers=AUTH, json={"title": "Bad", "slug": "Not A Slug"}) as r:
        assert r.status == 422
    client = redis.asyncio.from_url(redis_server.url)
    try:
        assert [k async for k in client.scan_iter(match="*Not A Slug*")] == []
    finally:
        await client.aclose()
