"""The channel store (its file, its bounds) and a channel's broadcast across connections, on a fake clock."""

from __future__ import annotations

import asyncio
import json

import pytest

from relay.channels import CHANNELS_FILE, ChannelStore
from relay.clock import FakeClock
from relay.config import Settings
from relay.errors import RelayError
from relay.recordings import owner_id
from relay.sessions import SessionManager
from relay.worldmodel.synthetic import SyntheticWorldModel
from tests.unit.fake_media import FakeMedia

KEY = "key-a"


def test_channels_are_kept_on_disk_and_read_back(tmp_path):
    store = ChannelStore(tmp_path, 3)
    kept = store.create("alice", {"title": " Friday ", "slug": "friday"}, 100.0)
    gone = store.create("alice", {"title": "Saturday"}, 101.0)
    store.delete(gone)
    again = ChannelStore(tmp_path, 3)
    assert again.list("alice") == [kept] and kept.title == "Friday"
    assert again.get("alice", "friday") == kept and again.by_broadcast(kept.broadcast_id) == kept
    assert again.by_broadcast(gone.broadcast_id) is None
    with pytest.raises(RelayError) as unknown:
        again.get("bob", kept.channel_id)
    assert unknown.value.status == 404
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temporary file, renamed


def test_an_unreadable_file_is_set_aside_never_overwritten(tmp_path):
    (tmp_path / CHANNELS_FILE).write_text('{"channels": [{"title": "half')
    store = ChannelStore(tmp_path, 3)
    assert store.list("alice") == []
    aside = list(tmp_path.glob(f"{CHANNELS_FILE}.unreadable-*"))
    assert len(aside) == 1 and aside[0].read_text().startswith('{"channels"')
    store.create("alice", {"title": "new"}, 1.0)
    assert [c["title"] for c in json.loads((tmp_path / CHANNELS_FILE).read_text())["channels"]] == ["new"]


async def test_a_channels_broadcast_outlives_its_connections_until_shutdown(tmp_path):
    settings = Settings.from_dict({"auth": {"api_keys": [KEY]}, "limits": {"idle_timeout_seconds": 5},
                                   "world_model": {"width": 64, "height": 48}})
    store = ChannelStore(tmp_path, 3)
    channel = store.create(owner_id(KEY), {"title": "lasting"}, 1.0)
    clock = FakeClock()
    sessions = SessionManager(settings, SyntheticWorldModel(64, 48, 25), clock=clock, media=FakeMedia,
                              channels=store)
    try:
        broadcast = sessions.broadcast(channel.broadcast_id)  # a spectator's look, before any host
        assert broadcast.connection_id is None and broadcast.state()["title"] == "lasting"
        first = await sessions.open_connection(KEY, channel)
        assert first.broadcast is broadcast and broadcast.connection_id == first.connection_id
        with pytest.raises(RelayError) as busy:
            await sessions.open_connection(KEY, channel)
        assert (busy.value.status, busy.value.code) == (409, "CHANNEL_IN_USE")
        assert sessions.streamers_free == settings.limits.streamers - 1  # the refusal held no streamer
        await sessions.start_stream(first, "a calm sea")
        clock.advance(6)  # the host vanished: the reaper closes its connection, not the channel's broadcast
        await sessions.tick()
        assert first.closed and not broadcast.closed and broadcast.connection_id is None
        assert sessions.broadcast(channel.broadcast_id) is broadcast
        second = await sessions.open_connection(KEY, channel)
        assert second.broadcast is broadcast
    finally:
        await sessions.close()
    assert broadcast.closed and not sessions.broadcasts


class GatedWorldModel(SyntheticWorldModel):
    """connect() waits for the test's go: a channel can be deleted while a connection on it is opening."""

    def __init__(self) -> None:
        super().__init__(64, 48, 25)
        self.go = asyncio.Event()
        self.connecting = asyncio.Event()

    async def connect(self):
        self.connecting.set()
        await self.go.wait()
        return await super().connect()


async def test_a_channel_deleted_while_a_connection_on_it_opens_leaves_nothing(tmp_path):
    settings = Settings.from_dict({"auth": {"api_keys": [KEY]}, "world_model": {"width": 64, "height": 48}})
    store = ChannelStore(tmp_path, 3)
    channel = store.create(owner_id(KEY), {"title": "brief"}, 1.0)
    world = GatedWorldModel()
    sessions = SessionManager(settings, world, clock=FakeClock(), media=FakeMedia, channels=store)
    try:
        opening = asyncio.create_task(sessions.open_connection(KEY, channel))
        await world.connecting.wait()
        store.delete(channel)
        await sessions.drop_channel(channel)
        world.go.set()
        with pytest.raises(RelayError) as gone:
            await opening
        assert gone.value.status == 404
        assert not sessions.connections and not sessions.broadcasts
        assert sessions.streamers_free == settings.limits.streamers
    finally:
        await sessions.close()
