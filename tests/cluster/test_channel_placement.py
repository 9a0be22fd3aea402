"""Channels in a cluster, as they are today (one node's each): a connection on a channel stays on the
channel's node. Two `relay serve` nodes on one real Redis."""

from __future__ import annotations

from tests.cluster.test_cluster_core import AUTH, all_joined, open_connection


async def streamers_free(http, node) -> int:
    async with http.get(f"{node.url}/readyz") as r:
        return (await r.json())["streamers_free"]


async def test_a_connection_on_a_channel_is_not_placed_on_a_node_that_does_not_know_it(cluster, http):
    a, b = await cluster(2, limits={"streamers": 1})
    await all_joined(http, [a, b])
    async with http.post(f"{a.url}/v1/channels", json={"title": "Friday", "slug": "friday"}, headers=AUTH) as r:
        assert r.status == 201, await r.text()
        channel = await r.json()
    busy = await open_connection(http, a)  # a's one streamer

    for ref in (channel["channel_id"], "friday"):
        async with http.post(f"{a.url}/v1/connections", json={"channel_id": ref}, headers=AUTH) as r:
            body = await r.json()
            assert r.status == 503 and body["error"]["code"] == "STREAMER_NOT_AVAILABLE", body
            assert int(r.headers["Retry-After"]) >= 1
    async with http.post(f"{a.url}/v1/connections", json={"channel_id": 7}, headers=AUTH) as r:
        assert r.status == 400 and (await r.json())["error"]["code"] == "INVALID_REQUEST"
    async with http.post(f"{a.url}/v1/connections", data=b"{not json",
                           headers={**AUTH, "Content-Type": "application/json"}) as r:
        assert r.status == 400
    assert await streamers_free(http, b) == 1  # none of them went to b

    # A plain connection is still placed on b; the channel's waits for a's streamer.
    placed = await open_connection(http, a)
    assert placed["control_url"].startswith(b.url.replace("http", "ws", 1))
    async with http.delete(f"{a.url}/v1/connections/{busy['connection_id']}", headers=AUTH) as r:
        assert r.status == 204
    async with http.post(f"{a.url}/v1/connections", json={"channel_id": "friday"}, headers=AUTH) as r:
        opened = await r.json()
        assert r.status == 201, opened
    assert opened["broadcast"] == channel["broadcast"] and opened["channel_id"] == channel["channel_id"]
