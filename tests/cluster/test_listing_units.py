"""Jobs in the directory, on fakeredis: registered with their long TTL, owned while their node lives,
re-registered wholesale once per refresh (or when Redis lost the marker), and not before the store opens."""

from __future__ import annotations

import fakeredis
import pytest

from relay.cluster.directory import JOB_REFRESH_SECONDS, JOB_TTL_SECONDS, Directory, jobs_marker_key, owner_key
from relay.cluster.membership import Membership, NodeInfo
from relay.cluster.node import Cluster
from relay.config import Settings


@pytest.fixture
async def fake():
    client = fakeredis.FakeAsyncRedis()
    yield client
    await client.aclose()


async def test_a_job_is_owned_by_its_node_while_the_node_lives(fake):
    membership = Membership(fake, "a", 1.0)
    directory = Directory(fake, membership, 1.0)
    await directory.register_jobs([f"job{i}" for i in range(1500)])  # more than one pipeline's chunk
    assert await fake.ttl(owner_key("job", "job1499")) == JOB_TTL_SECONDS
    assert await directory.owner("job", "job7") is None  # a has not heart-beaten: gone
    await membership.beat(NodeInfo("a", "http://a:1", 1, {}))
    assert (await directory.owner("job", "job7")).node_id == "a"
    assert await directory.owner("job", "nope") is None
    assert await directory.owner("job", "x" * 129) is None


async def test_jobs_are_due_once_per_refresh_and_again_when_redis_lost_the_marker(fake):
    directory = Directory(fake, Membership(fake, "a", 1.0), 1.0)
    assert await directory.jobs_due() is True
    assert await directory.jobs_due() is False
    assert 0 < await fake.ttl(jobs_marker_key("a")) <= JOB_REFRESH_SECONDS < JOB_TTL_SECONDS
    await fake.flushall()
    assert await directory.jobs_due() is True


class _NoSessions:
    connections: dict = {}
    broadcasts: dict = {}
    streamers_free = 0

    def stream_ids(self):
        return []


async def test_the_beat_registers_every_job_once_the_store_is_open(fake):
    settings = Settings.from_dict({"server": {"public_url": "http://a:1"},
                                   "cluster": {"redis_url": "redis://127.0.0.1:1/0", "node_id": "a"}})
    store: list[str] | None = None

    async def all_jobs():
        return store

    cluster = Cluster(settings, _NoSessions(), all_jobs=all_jobs)
    await cluster.redis.aclose()
    cluster.redis = fake
    cluster.directory = Directory(fake, cluster.membership, 6.0)
    await cluster._register_jobs()  # the store is not open yet: nothing, and still due
    assert await fake.keys("relay:owner:job:*") == []
    store = ["j1", "j2"]
    await cluster._register_jobs()
    assert sorted(await fake.keys("relay:owner:job:*")) == [b"relay:owner:job:j1", b"relay:owner:job:j2"]
    store.append("j3")
    await cluster._register_jobs()  # not due again before the refresh: a new job registers itself at submit
    assert await fake.get(owner_key("job", "j3")) is None
    await cluster.job_submitted("j3")
    assert await fake.get(owner_key("job", "j3")) == b"a"
