"""The cluster's Redis logic, without relay processes: membership and the directory on fakeredis, the
quota's Lua script on the real redis-server (fakeredis runs no Lua without lupa)."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import fakeredis
import pytest
import redis.asyncio as aioredis

from relay.cluster.directory import CHANNEL_HOME_SECONDS, Directory, Entry, Origin, owner_key
from relay.cluster.membership import Membership, NodeInfo, derive_node_id
from relay.cluster.node import Cluster
from relay.cluster.quota import ClusterQuota
from relay.cluster.seats import SpectatorCounts, viewers_key
from relay.config import ConfigError, Settings
from relay.errors import RelayError
from tests.cluster.conftest import free_port
from tests.conftest import eventually


@pytest.fixture
async def fake():
    client = fakeredis.FakeAsyncRedis()
    yield client
    await client.aclose()


def test_node_id_is_derived_from_public_url():
    assert derive_node_id("http://10.0.0.5:8080") == "10.0.0.5-8080"
    assert derive_node_id("https://relay.example.com") == "relay.example.com"


def test_cluster_config_requires_public_url_and_a_timeout_above_the_beat():
    assert not Settings().cluster.enabled
    with pytest.raises(ConfigError, match="server.public_url"):
        Settings.from_dict({"cluster": {"redis_url": "redis://127.0.0.1:6379/0"}})
    with pytest.raises(ConfigError, match="cluster.node_timeout_seconds"):
        Settings.from_dict({"server": {"public_url": "http://a:1"},
                            "cluster": {"redis_url": "redis://x:1/0", "heartbeat_seconds": 2, "node_timeout_seconds": 2}})
    with pytest.raises(ConfigError, match="cluster.redis_url"):
        Settings.from_dict({"server": {"public_url": "http://a:1"}, "cluster": {"redis_url": "http://x"}})
    ok = Settings.from_dict({"server": {"public_url": "http://a:1"}, "cluster": {"redis_url": "redis://x:1/0"}})
    assert ok.cluster.enabled and ok.cluster.node_timeout_seconds == 6


async def test_one_secret_for_the_cluster_and_node_authorization(fake):
    a, b = Membership(fake, "a", 1.0), Membership(fake, "b", 1.0)
    assert await a.join_secret() == await b.join_secret()
    header = a.authorization()
    assert b.verify(header) == "a"
    assert b.verify(header.replace("Node a:", "Node c:")) is None  # the id is signed
    assert b.verify(a.authorization(now=time.time() - 120)) is None  # stale
    assert b.verify("Bearer " + header.split(" ", 1)[1]) is None
    # Redis lost its data: the next node to offer its secret puts the same one back.
    await fake.flushall()
    assert await b.join_secret() == a.secret
    stranger = Membership(fake, "x", 1.0)
    assert await stranger.join_secret() == a.secret


async def test_membership_lists_live_nodes_and_forgets_the_silent(fake):
    a, b = Membership(fake, "a", 0.3), Membership(fake, "b", 0.3)
    await a.beat(NodeInfo("a", "http://a", 2, {}))
    await b.beat(NodeInfo("b", "http://b", 0, {}))
    assert [n.node_id for n in await a.nodes()] == ["a", "b"]
    await asyncio.sleep(0.2)
    await a.beat(NodeInfo("a", "http://a", 1, {}))  # b stays silent
    await asyncio.sleep(0.2)
    assert [(n.node_id, n.streamers_free) for n in await a.nodes()] == [("a", 1)]
    assert await fake.smembers("relay:nodes") == {b"a"}  # pruned
    await a.leave()
    assert await a.nodes() == []


async def test_directory_entries_of_a_dead_node_read_as_gone(fake):
    a = Membership(fake, "a", 0.3)
    directory = Directory(fake, a, 0.3)
    await a.beat(NodeInfo("a", "http://a", 2, {}))
    record = {"node_id": "a", "origin_url": "http://a", "spectator_token": "t", "connection_id": "c1"}
    await directory.publish([Entry("connection", "c1"), Entry("broadcast", "b1", record), Entry("stream", "s1")])
    assert (await directory.owner("connection", "c1")).public_url == "http://a"
    assert (await directory.owner("stream", "s1")).node_id == "a"
    assert await directory.broadcast_record("b1") == record
    assert await directory.origin_of("b1") == Origin("a", "http://a", "t")
    assert await directory.owner("connection", "nope") is None
    assert await directory.owner("other", "c1") is None
    await fake.delete("relay:node:a")  # the node's record lapsed; its entries (TTL not yet) must not count
    assert await directory.owner("connection", "c1") is None and await directory.origin_of("b1") is None
    await a.beat(NodeInfo("a", "http://a", 2, {}))
    await directory.remove([Entry("connection", "c1"), Entry("broadcast", "b1")])
    assert await directory.owner("connection", "c1") is None and await directory.broadcast_record("b1") is None
    assert await directory.owner("stream", "s1") is not None


async def test_quota_race_across_three_nodes_admits_exactly_one(redis_server):
    clients = [aioredis.from_url(redis_server.url) for _ in range(3)]
    try:
        quotas = [ClusterQuota(c, "simulations", 2.0) for c in clients]
        for i in range(9):
            assert (await quotas[i % 3].take("owner", f"held-{i}", 10))[0]
        outcomes = await asyncio.gather(*(quotas[i % 3].take("owner", f"new-{i}", 10) for i in range(10)))
        assert sorted(admitted for admitted, _ in outcomes) == [False] * 9 + [True]
        assert {held for _, held in outcomes} == {10}
        assert (await quotas[0].take("other-owner", "x", 10))[0]  # per owner
        # Given back: the slot is free again; taking the same member twice holds one slot.
        await quotas[1].give_back("held-1")
        assert (await quotas[2].take("owner", "again", 10))[0]
        assert (await quotas[2].take("owner", "again", 10)) == (True, 10)
    finally:
        for c in clients:
            await c.aclose()


async def test_quota_slots_lapse_unless_refreshed_and_come_back_after_a_flush(redis_server):
    client = aioredis.from_url(redis_server.url)
    try:
        holder, other = ClusterQuota(client, "streams", 0.3), ClusterQuota(client, "streams", 0.3)
        assert (await holder.take("o", "kept", 2))[0] and (await other.take("o", "dropped", 2))[0]
        other.held.clear()  # a node that died: nobody refreshes its slot
        for _ in range(4):
            await asyncio.sleep(0.1)
            await holder.refresh()
        assert await client.zrange("relay:quota:streams:o", 0, -1) == [b"kept"]
        assert (await other.take("o", "new", 2)) == (True, 2)  # the lapsed slot counts no more
        await other.give_back("new")
        await client.flushall()  # Redis restarted empty: the holder's next refresh puts its slot back
        await holder.refresh()
        assert await client.zrange("relay:quota:streams:o", 0, -1) == [b"kept"]
        await redis_server.stop()
        with pytest.raises(RelayError) as refused:
            await holder.take("o", "new", 2)
        assert refused.value.code == "CLUSTER_UNAVAILABLE" and refused.value.status == 503
        await holder.give_back("kept")  # without Redis: forgotten here, so it lapses
        assert holder.held == {}
    finally:
        await client.aclose()


async def test_viewer_counts_sum_the_live_nodes_and_drop_the_others(redis_server):
    clients = [aioredis.from_url(redis_server.url) for _ in range(3)]
    origin, b, c = (SpectatorCounts(client, name, 1.0) for client, name in zip(clients, "abc"))
    try:
        origin.changed("bc1", 1)
        b.changed("bc1", 3)
        b.changed("bc1", 2)  # written in order: the last count wins
        c.changed("bc1", 4)
        await eventually(lambda: _fields(clients[0], "bc1", {"a", "b", "c"}), timeout=5, what="three counts written")
        assert await origin.beat(["bc1"], live={"a", "b", "c"}) == {"bc1": 6}  # the others' (a counts its own)
        assert await origin.beat(["bc1"], live={"a", "b"}) == {"bc1": 2}  # c left the cluster
        assert set(await clients[0].hkeys(viewers_key("bc1"))) == {b"a", b"b"}  # and its field with it
        b.changed("bc1", 0)  # b's last viewer left
        await eventually(lambda: _fields(clients[0], "bc1", {"a"}), timeout=5, what="b's field removed")
        assert origin.viewers_here == 1 and b.viewers_here == 0
    finally:
        for counts, client in zip((origin, b, c), clients):
            await counts.close()
            await client.aclose()


async def _fields(client, broadcast_id: str, nodes: set[str]) -> bool:
    return {f.decode() for f in await client.hkeys(viewers_key(broadcast_id))} == nodes


async def test_seats_are_exact_and_a_join_without_redis_is_held_here(redis_server):
    client = aioredis.from_url(redis_server.url)
    away = aioredis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5)  # nobody listens
    counts, offline = SpectatorCounts(client, "a", 2.0), SpectatorCounts(away, "b", 2.0)
    try:
        seats = counts.for_broadcast("bc1")
        refusals = await asyncio.gather(*(seats.take(f"s{i}", 3) for i in range(8)))
        assert refusals.count(None) == 3
        assert await seats.take("late", 3) == "spectators_per_broadcast"
        seats.give_back(next(f"s{i}" for i, refused in enumerate(refusals) if refused is None))
        await eventually(lambda: _seated(seats, "late", 3), timeout=5, what="the seat given back is free")
        # Redis away: the node that serves the broadcast admits on its own count, and holds the seat to write back.
        assert await offline.for_broadcast("bc1").take("s9", 3, "192.0.2.1", 1) is None
        assert offline.seats.held == {"s9": ("bc1", "192.0.2.1")}
    finally:
        await counts.close()
        await client.aclose()
        await away.aclose()


async def _seated(seats, spectator_id: str, limit: int) -> bool:
    return await seats.take(spectator_id, limit) is None


async def test_a_node_whose_secret_changed_derives_its_keys_again(redis_server):
    # Redis came back empty and another secret won it (a newcomer's): this node adopts it, and says so.
    settings = Settings.from_dict({"server": {"public_url": "http://127.0.0.1:1"},
                                   "cluster": {"redis_url": redis_server.url, "heartbeat_seconds": 0.1,
                                               "node_timeout_seconds": 1}})
    idle = SimpleNamespace(connections={}, broadcasts={}, channels=None, streamers_free=1, stream_ids=lambda: [])
    cluster = Cluster(settings, idle)
    client = aioredis.from_url(redis_server.url)
    try:
        await cluster.start()
        before = cluster.token_secret(b"relay/odyssey tokens")
        changed: list[bytes] = []
        cluster.on_secret = lambda: changed.append(cluster.token_secret(b"relay/odyssey tokens"))
        await cluster.beat()
        assert changed == []  # the same secret: nothing to derive again
        await client.flushall()
        await client.set("relay:secret", "ab" * 32)
        await cluster.beat()
        assert cluster.membership.secret == bytes.fromhex("ab" * 32) and changed and changed[0] != before
    finally:
        await cluster.close()
        await client.aclose()


async def test_a_slug_claimed_by_another_node_after_redis_lost_its_data_is_neither_taken_nor_deleted(redis_server):
    """Redis restarted empty: b claims a's slug before a's heartbeat writes it again. a's heartbeat leaves it
    to b (and says so), and deleting a's channel leaves b's claim (Lua on the real redis-server)."""
    client = aioredis.from_url(redis_server.url)
    a = Directory(client, Membership(client, "a", 1.0), 1.0)
    b = Directory(client, Membership(client, "b", 1.0), 1.0)
    slug = Entry("slug", "owner:harbour")
    try:
        assert await a.publish([Entry("channel", "ch-a"), slug]) == []
        assert await a.home("slug", "owner:harbour") == "a"
        await client.flushall()  # Redis lost its data
        assert await b.claim("slug", "owner:harbour") == ("b", True)  # free: taken by this call
        assert await b.claim("slug", "owner:harbour") == ("b", False)  # its own: refreshed, not taken again
        assert await a.claim("slug", "owner:harbour") == ("b", False)  # another's: named, left to it
        assert await a.publish([Entry("channel", "ch-a"), slug]) == [(slug, "b")]
        assert await a.home("slug", "owner:harbour") == "b" and await a.home("channel", "ch-a") == "a"
        await a.remove([Entry("channel", "ch-a"), slug])  # a's channel deleted
        assert await b.home("slug", "owner:harbour") == "b" and await a.home("channel", "ch-a") is None
        assert await b.publish([slug]) == []  # b's own heartbeat refreshes it
        assert 0 < await client.pttl(owner_key("slug", "owner:harbour")) <= CHANNEL_HOME_SECONDS * 1000
        await b.remove([slug])
        assert await a.home("slug", "owner:harbour") is None
    finally:
        await client.aclose()
