"""Spectators' seats and viewer counts under load and failure: the pool, the give-backs, the counts gone to 0
(fakeredis where no Lua runs, the real redis-server where the seats' script or the pool is what is tested)."""

from __future__ import annotations

import fakeredis

from relay.cluster.seats import SpectatorCounts, viewers_key
from tests.conftest import eventually


async def test_a_count_gone_to_zero_is_removed_even_when_its_write_failed_or_a_beat_came_first():
    server = fakeredis.FakeServer()
    client = fakeredis.FakeAsyncRedis(server=server)
    counts = SpectatorCounts(client, "a", 2.0)
    key = viewers_key("bc1")
    try:
        counts.changed("bc1", 1)
        await eventually(lambda: client.hexists(key, "a"), timeout=5, what="the count written")
        # The last viewer leaves while Redis is away: the write fails, and the next beat must still HDEL it.
        server.connected = False
        counts.changed("bc1", 0)
        await eventually(lambda: counts._flusher.done(), timeout=5, what="the failed write")
        server.connected = True
        await counts.beat([], live={"a"})
        assert not await client.hexists(key, "a")
        # A beat that runs before the writer task does: it takes the dirty ids with it, and HDELs the absent.
        counts.changed("bc2", 2)
        await counts.beat([], live={"a"})
        counts.changed("bc2", 0)
        await counts.beat([], live={"a"})
        await eventually(lambda: counts._flusher.done(), timeout=5, what="the writer task")
        assert not await client.hexists(viewers_key("bc2"), "a")
    finally:
        await counts.close()
        await client.aclose()
