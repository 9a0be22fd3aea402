"""A shared replay link in a cluster: the origin records and signs (with the cluster's key), a spectator at
another node gets the link on its events socket, and the link opens the recording at any node."""

from __future__ import annotations

from urllib.parse import urlsplit

from tests.cluster.conftest import AUTH, all_joined
from tests.conftest import eventually, next_of


async def test_a_spectator_at_another_node_gets_a_replay_link_to_the_origin(cluster, http):
    a, b = await cluster(2, recordings={"enabled": True, "replay_link_seconds": 300})
    await all_joined(http, [a, b])
    async with http.post(f"{a.url}/v1/connections", headers=AUTH, json={"share_replay": True}) as r:
        assert r.status == 201, await r.text()
        conn = await r.json()
    broadcast = conn["broadcast"]
    assert broadcast["share_replay"] is True
    events_url = (f"{b.url.replace('http://', 'ws://')}/v1/broadcasts/{broadcast['broadcast_id']}/events"
                  f"?token={broadcast['spectator_token']}")
    async with http.ws_connect(events_url) as events:
        await next_of(events, "hello")
        async with http.post(f"{a.url}/v1/connections/{conn['connection_id']}/streams", headers=AUTH,
                             json={"prompt": "a calm ocean"}) as r:
            assert r.status == 201, await r.text()
            stream_id = (await r.json())["stream_id"]
        await next_of(events, "stream_started")
        async with http.delete(f"{a.url}/v1/streams/{stream_id}", headers=AUTH) as r:
            assert r.status == 200, await r.text()
        ended = await next_of(events, "stream_ended")
    replay = urlsplit(ended["replay_url"])
    assert f"{replay.scheme}://{replay.netloc}" == a.url and replay.path == f"/recordings/{stream_id}"
    info = f"{a.url}{replay.path}/info?{replay.query}"

    async def finished() -> bool:
        async with http.get(info) as r:
            assert r.status == 200, await r.text()
            return (await r.json())["status"] not in ("recording", None)
    await eventually(finished, timeout=15, what="the origin's recording finished")
    # Signed with the cluster's key: the other node takes the link too (and finds the origin's recording),
    # and refuses it for another stream id in the error shape.
    async with http.get(f"{b.url}{replay.path}/info?{replay.query}") as r:
        assert r.status == 200 and (await r.json())["stream_id"] == stream_id
        shared_log = urlsplit((await r.json())["events_url"])
    # The link's filtered events log too, asked for at the node that does not hold it.
    assert shared_log.path == f"/recordings/{stream_id}/events.jsonl"
    async with http.get(f"{b.url}{shared_log.path}?{shared_log.query}") as r:
        assert r.status == 200 and '"stream_started"' in await r.text()
    async with http.get(f"{b.url}/recordings/{'0' * 32}/info?{replay.query}") as r:
        assert r.status == 403 and (await r.json())["error"]["code"] == "FORBIDDEN"

    # The host's PATCH at the other node is carried to the origin.
    async with http.patch(f"{b.url}/v1/broadcasts/{broadcast['broadcast_id']}", headers=AUTH,
                          json={"share_replay": False}) as r:
        assert r.status == 200, await r.text()
        assert (await r.json())["share_replay"] is False
