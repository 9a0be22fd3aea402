"""Participants at any node: three `relay serve` processes on one real Redis, aiohttp WebSocket participants
on every node. An events socket at a node that is not the origin is served there; the origin's audience
answers over Redis (relay/cluster/audience_link.py)."""

from __future__ import annotations

import asyncio
import os
import time

import aiohttp
import redis.asyncio as aioredis

from tests.cluster.conftest import CLUSTER_KEY
from tests.cluster.test_cluster_core import all_joined, open_connection
from tests.conftest import eventually

AUTH = {"Authorization": f"Bearer {CLUSTER_KEY}"}


class Participant:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.hello: dict = {}

    async def next(self, type_: str, timeout: float = 5.0, where=lambda e: True) -> dict:
        """The next event of this type (skipping others), within timeout."""
        async with asyncio.timeout(timeout):
            while True:
                event = await self.ws.receive_json()
                if event.get("type") == type_ and where(event):
                    return event

    async def send(self, **message) -> None:
        await self.ws.send_json(message)


async def join(http, node, broadcast: dict, name: str | None = None, resume: str | None = None) -> Participant:
    url = f"{node.url.replace('http', 'ws', 1)}/v1/broadcasts/{broadcast['broadcast_id']}/events" \
          f"?token={broadcast['spectator_token']}"
    if resume is not None:
        url += f"&resume={resume}"
    p = Participant(await http.ws_connect(url))
    p.hello = await p.next("hello")
    if name:
        await p.send(type="hello", name=name)
    return p


async def live_broadcast(http, cluster, n: int = 3, sections: dict | None = None, **orchestration):
    """n nodes (config `sections`), a live stream at the first; `orchestration` set by the host."""
    nodes = await cluster(n, **(sections or {}))
    await all_joined(http, nodes)
    origin = nodes[0]
    conn = await open_connection(http, origin)
    async with http.post(f"{origin.url}/v1/connections/{conn['connection_id']}/streams", headers=AUTH,
                         json={"prompt": "a calm sea"}) as r:
        assert r.status == 201, await r.text()
        stream_id = (await r.json())["stream_id"]
    broadcast = conn["broadcast"]
    if orchestration:
        async with http.put(f"{origin.url}/v1/broadcasts/{broadcast['broadcast_id']}/orchestration",
                            headers=AUTH, json=orchestration) as r:
            assert r.status == 200, await r.text()
    return nodes, broadcast, stream_id


async def test_a_vote_with_participants_on_three_nodes_is_decided_once_and_announced_on_all(cluster, http):
    (a, b, c), broadcast, stream_id = await live_broadcast(http, cluster, mode="vote", vote_window_seconds=2)
    pa, pb, pc = [await join(http, node, broadcast, name) for node, name in ((a, "ana"), (b, "ben"), (c, "cy"))]
    assert pb.hello["orchestration"]["mode"] == "vote" and pb.hello["live"] is True
    ids = {p.hello["participant_id"] for p in (pa, pb, pc)}
    assert len(ids) == 3  # the origin issues every identity, wherever the socket is
    await pb.send(type="input", prompt="volcano")
    volcano = await pb.next("input_result")
    await pc.send(type="input", prompt="glacier")
    glacier = await pc.next("input_result")
    assert volcano["status"] == glacier["status"] == "candidate"
    await pa.send(type="vote", candidate_id=glacier["candidate_id"])
    assert (await pa.next("vote_result"))["status"] == "voted"
    await pb.send(type="vote", candidate_id=glacier["candidate_id"])
    assert (await pb.next("vote_result"))["status"] == "voted"
    # The same participant again, through a third node with its resume token: still one vote.
    again = await join(http, c, broadcast, resume=pb.hello["resume_token"])
    assert again.hello["participant_id"] == pb.hello["participant_id"] and again.hello["resumed"] is True
    await again.send(type="vote", candidate_id=glacier["candidate_id"])
    await again.next("vote_result")
    async with http.get(f"{b.url}/v1/broadcasts/{broadcast['broadcast_id']}/orchestration", headers=AUTH) as r:
        tally = await r.json()  # the origin's, wherever asked
    assert {x["prompt"]: x["votes"] for x in tally["candidates"]} == {"volcano": 0, "glacier": 3}
    pushed = await pa.next("orchestration", where=lambda e: any(x["votes"] == 3 for x in e["candidates"]))
    assert pushed["candidates"] == tally["candidates"]
    for p in (pa, again, pc):  # announced at every node
        applied = await p.next("prompt_applied", timeout=6, where=lambda e: e["source"] == "participant")
        assert applied["prompt"] == "glacier" and applied["mode"] == "vote"
    async with http.get(f"{a.url}/v1/streams/{stream_id}", headers=AUTH) as r:
        assert (await r.json())["last_applied_prompt"] == "glacier"
    for p in (pa, pb, pc, again):
        await p.ws.close()


async def test_queue_input_at_an_edge_reaches_the_stream_and_resume_works_on_another_node(cluster, http):
    (a, b, c), broadcast, stream_id = await live_broadcast(http, cluster, mode="queue", cooldown_seconds=0)
    pb = await join(http, b, broadcast, "ben")
    await pb.send(type="input", prompt="northern lights")
    assert (await pb.next("input_result"))["status"] in ("queued", "forwarded")
    applied = await pb.next("prompt_applied", where=lambda e: e["source"] == "participant")
    assert applied["prompt"] == "northern lights" and applied["participant_id"] == pb.hello["participant_id"]
    async with http.get(f"{c.url}/v1/streams/{stream_id}", headers=AUTH) as r:
        assert (await r.json())["last_applied_prompt"] == "northern lights"
    # The resume token taken at b is accepted at c; the socket at b is replaced.
    pc = await join(http, c, broadcast, resume=pb.hello["resume_token"])
    assert pc.hello["resumed"] is True and pc.hello["participant_id"] == pb.hello["participant_id"]
    closed = await pb.ws.receive(timeout=5)
    assert closed.type == aiohttp.WSMsgType.CLOSE and closed.data == 4001
    # ... and at the origin, back again.
    pa = await join(http, a, broadcast, resume=pc.hello["resume_token"])
    assert pa.hello["participant_id"] == pb.hello["participant_id"]
    assert (await pc.ws.receive(timeout=5)).data == 4001
    await pa.ws.close()
    stranger = await join(http, b, broadcast, resume="x" * 300)  # longer than any token: a new identity
    assert stranger.hello["resumed"] is False and stranger.hello["participant_id"] != pb.hello["participant_id"]
    await stranger.ws.close()


async def test_redis_away_edge_input_is_refused_at_once_and_flows_again_when_it_returns(cluster, redis_server, http):
    (a, b), broadcast, stream_id = await live_broadcast(http, cluster, 2, {"limits": {"participants_per_broadcast": 2}},
                                                        mode="queue", cooldown_seconds=0)
    pb, leaving = await join(http, b, broadcast), await join(http, b, broadcast)
    await redis_server.stop()
    await leaving.ws.close()  # its leave cannot reach the origin now: sent when Redis is back
    started = time.monotonic()
    await pb.send(type="input", prompt="fog")
    error = await pb.next("error")
    assert error["code"] == "CLUSTER_UNAVAILABLE" and error["fatal"] is False and error["retry_after"] > 0
    assert time.monotonic() - started < 3
    assert not pb.ws.closed
    await redis_server.start()  # empty: the nodes write it all back, the links subscribe again

    seen: list[dict] = []
    attempts = iter(range(1000))

    async def goes_through() -> bool:  # a new prompt each time: one that got through is a duplicate after
        await pb.send(type="input", prompt=f"clear skies {next(attempts)}")
        while (event := await pb.ws.receive_json(timeout=6))["type"] not in ("input_result", "error"):
            seen.append(event)
        return event["type"] == "input_result" and event["status"] in ("queued", "forwarded")
    await eventually(goes_through, timeout=15, what="an edge input after Redis is back")
    if not any(e["type"] == "prompt_applied" and e["source"] == "participant" for e in seen):
        await pb.next("prompt_applied", where=lambda e: e["source"] == "participant")  # pushes flow again

    # 2 places: pb's, and the one `leaving` held until its leave landed
    await eventually(lambda: _admitted(http, b, broadcast), timeout=5, what="the leave sent when Redis came back")
    await pb.ws.close()


async def test_an_edge_limits_its_sockets_before_redis_and_closes_them_when_the_origin_dies(cluster, http):
    (a, b), broadcast, _ = await live_broadcast(
        http, cluster, 2, {"limits": {"events_flood_messages": 40, "participants_per_broadcast": 2}},
        # the host's rate, enforced at the edge:
        participant_messages_per_second=1, participant_messages_burst=3)
    pb = await join(http, b, broadcast)
    for _ in range(6):  # past the burst: refused at the edge, in the shape a single node answers
        await pb.send(type="raise_hand")
    replies = [await pb.next("turn_result") for _ in range(6)]
    refused = [r for r in replies if r.get("code") == "RATE_LIMITED"]
    assert len(refused) >= 2 and all(r["retry_after"] > 0 for r in refused)
    for _ in range(60):  # kept flooding: closed as on one node
        if pb.ws.closed:
            break
        await pb.send(type="raise_hand")
    closed = await pb.ws.receive(timeout=5)
    while closed.type == aiohttp.WSMsgType.TEXT:
        closed = await pb.ws.receive(timeout=5)
    assert pb.ws.close_code == 4029

    again = await join(http, b, broadcast)
    await eventually(lambda: _admitted(http, a, broadcast), timeout=5, what="the flooder's leave giving back its place")
    a.kill()  # the origin dies: the edge's socket is closed within node_timeout, not left hanging
    started = time.monotonic()
    while (msg := await again.ws.receive(timeout=8)).type == aiohttp.WSMsgType.TEXT:
        pass
    assert msg.type == aiohttp.WSMsgType.CLOSE and time.monotonic() - started < 6


async def _admitted(http, node, broadcast) -> bool:
    """A participant admitted at `node` (and gone again), or refused 503 for want of a place."""
    try:
        await (await join(http, node, broadcast)).ws.close()
        return True
    except aiohttp.WSServerHandshakeError as refused:
        assert refused.status == 503
        return False


async def test_a_mode_change_while_redis_is_away_reaches_an_edge_participant_when_it_returns(cluster, redis_server, http):
    (a, b), broadcast, _ = await live_broadcast(http, cluster, 2, mode="queue", cooldown_seconds=0)
    pb = await join(http, b, broadcast, "ben")
    assert pb.hello["orchestration"]["mode"] == "queue"
    await pb.send(type="chat", text="before the outage")
    await pb.next("chat", where=lambda e: e["text"] == "before the outage")
    await redis_server.stop()
    # The host (at the origin, which needs no Redis for it) changes the mode: the push to b is lost.
    async with http.put(f"{a.url}/v1/broadcasts/{broadcast['broadcast_id']}/orchestration", headers=AUTH,
                        json={"mode": "vote", "vote_window_seconds": 30}) as r:
        assert r.status == 200, await r.text()
    await redis_server.start()
    started = time.monotonic()
    # No further state change: the edge brings its socket up to date by itself, as a fresh hello.
    hello = await pb.next("hello", timeout=10)
    assert time.monotonic() - started < 5  # two nodes' listeners back (a heartbeat each), then one round trip
    assert hello["orchestration"]["mode"] == "vote" and hello["resumed"] is True
    assert hello["participant_id"] == pb.hello["participant_id"]
    assert hello["resume_token"] == pb.hello["resume_token"]
    assert [m["text"] for m in hello["chat"]["history"]] == ["before the outage"]
    await pb.ws.close()


def _local_ports(pid: int) -> set[int]:
    """The local TCP ports of a process's sockets (from /proc: which Redis clients are that node's)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    ports = set()
    with open(f"/proc/{pid}/net/tcp") as table:
        for row in list(table)[1:]:
            fields = row.split()
            if fields[9] in inodes:
                ports.add(int(fields[1].split(":")[1], 16))
    return ports


async def test_an_origin_whose_redis_subscription_broke_has_the_edges_catch_its_sockets_up(cluster, redis_server, http):
    (a, b), broadcast, _ = await live_broadcast(http, cluster, 2, mode="queue", cooldown_seconds=0)
    pb = await join(http, b, broadcast, "ben")
    # Only the origin's subscription is cut (Redis and the edge's stay up): the origin cannot know what its
    # pushes met meanwhile, so when it subscribes again it tells the edge its sockets are stale.
    redis = aioredis.from_url(redis_server.url)
    try:
        ports = _local_ports(a.proc.pid)
        killed = 0
        for client in await redis.client_list():
            if client.get("sub") == "1" and int(client["addr"].rsplit(":", 1)[1]) in ports:
                killed += await redis.client_kill_filter(_id=client["id"])
        assert killed == 1
    finally:
        await redis.aclose()
    hello = await pb.next("hello", timeout=5)  # one heartbeat to subscribe again, then the sync
    assert hello["participant_id"] == pb.hello["participant_id"] and hello["resumed"] is True
    assert hello["orchestration"]["mode"] == "queue"
    await pb.ws.close()
