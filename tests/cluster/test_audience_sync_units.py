"""An edge's catch-up after pushes may have been lost (relay/cluster/audience_link.py), one AudienceLink on
the real redis-server with the test playing the other node through its inbox."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest
import redis.asyncio as aioredis

from relay.audience import EventChannel
from relay.cluster.audience_link import AudienceLink, RelayedParticipant, inbox
from relay.cluster.membership import NodeInfo
from relay.cluster.node import Cluster
from relay.config import Settings

SNAPSHOT = {"orchestration": {"mode": "vote", "candidates": []}, "live": True, "viewers": 3,
            "chat": {"enabled": True, "history": [{"type": "chat", "text": "hi"}]}}


@pytest.fixture
async def edge(redis_server):
    """Node "e" (an edge holding one socket of origin "o"'s broadcast "b1"), and "o"'s inbox as a subscription."""
    settings = Settings.from_dict({"server": {"public_url": "http://127.0.0.1:9"}, "cluster": {
        "redis_url": redis_server.url, "node_id": "e", "heartbeat_seconds": 0.25, "node_timeout_seconds": 1.5}})
    cluster = Cluster(settings, SimpleNamespace())
    cluster.reachable, cluster.nodes_seen = True, [NodeInfo("o", "http://127.0.0.1:8", 1, {})]
    link = AudienceLink(settings, cluster, SimpleNamespace(broadcasts={}))
    link.listening = True
    channel = EventChannel()
    participant = RelayedParticipant(link, "b1", "o", "s1", channel, hello={
        "type": "hello", "participant_id": "me", "resume_token": "rt", "invited": False, "resumed": False})
    link._sockets["s1"] = participant
    link._by_broadcast["b1"] = {"s1": participant}
    client = aioredis.from_url(redis_server.url)
    origin = client.pubsub(ignore_subscribe_messages=True)
    await origin.subscribe(inbox("o"))
    yield SimpleNamespace(link=link, channel=channel, origin=origin, cluster=cluster)
    await link.close()
    await origin.aclose()
    await client.aclose()
    await cluster.redis.aclose()


async def _received(pubsub, timeout: float = 5.0) -> dict:
    async with asyncio.timeout(timeout):
        while (message := await pubsub.get_message(timeout=timeout)) is None:
            pass
    return json.loads(message["data"])


def _from_origin(link: AudienceLink, **body) -> None:
    link._dispatch(json.dumps({**body, "from": "o"}))


def _pushed(channel: EventChannel) -> list[dict]:
    events = []
    while not channel.queue.empty():
        events.append(json.loads(channel.queue.get_nowait()))
    return events


async def test_a_stale_during_a_sync_in_flight_asks_nothing_more_and_one_after_its_reply_asks_again(edge):
    link = edge.link
    link._stale.add("b1")  # Redis came back: the edge's own catch-up
    link._sync_stale()
    request = await _received(edge.origin)
    assert request["op"] == "sync" and request["broadcast_id"] == "b1"
    _from_origin(link, op="stale")  # the origin subscribed again: sent before it read our request
    _from_origin(link, op="reply", id=request["id"], reply=SNAPSHOT)
    _from_origin(link, op="push", broadcast_id="b1", event='{"type": "chat", "text": "newer"}')
    # The hello is applied as its reply is dispatched: the push the origin sent after it comes after it.
    hello, push = _pushed(edge.channel)
    assert hello == {"type": "hello", "participant_id": "me", "resume_token": "rt", "invited": False,
                     "resumed": True, **SNAPSHOT}
    assert push == {"type": "chat", "text": "newer"}
    await asyncio.gather(*link._work)
    link.sweep()
    link.sweep()
    assert not link._work and _pushed(edge.channel) == []  # no second sync: one hello per outage
    _from_origin(link, op="stale")  # the origin lost pushes since that reply: not ignored
    assert (await _received(edge.origin))["op"] == "sync"


async def test_a_push_whose_publish_failed_is_followed_by_a_stale_once_redis_answers(edge, redis_server):
    link = edge.link
    await redis_server.stop()
    await link._publish(inbox("o"), json.dumps({"op": "push", "broadcast_id": "b1", "event": "{}"}), False, "o")
    await redis_server.start()
    client = aioredis.from_url(redis_server.url)
    listener = client.pubsub(ignore_subscribe_messages=True)
    await listener.subscribe(inbox("o"))
    link.start()
    try:
        assert await _received(listener) == {"op": "stale", "from": "e"}  # at the next sweep
    finally:
        await listener.aclose()
        await client.aclose()
