"""A channel's broadcast with no host is released once nobody has needed it for channel_release_seconds.

No HTTP, no media threads: a FakeClock moves time, ``tick()`` is the reaper, FakeMedia stands in for the
media graph (tests/integration/test_channels.py plays the real thing through a release).
"""

from __future__ import annotations

from relay.channels import ChannelStore
from relay.clock import FakeClock
from relay.config import Settings
from relay.recordings import owner_id
from relay.sessions import SessionManager
from relay.worldmodel.synthetic import SyntheticWorldModel
from tests.unit.fake_media import FakeMedia

GRACE = 30.0


def make_manager(tmp_path) -> tuple[SessionManager, FakeClock]:
    clock = FakeClock()
    settings = Settings.from_dict({"auth": {"api_keys": ["k"]},
                                   "limits": {"channel_release_seconds": GRACE, "idle_timeout_seconds": 5}})
    sessions = SessionManager(settings, SyntheticWorldModel(64, 48, 25), clock=clock, media=FakeMedia,
                              channels=ChannelStore(tmp_path, 5))
    return sessions, clock


async def later(sessions: SessionManager, clock: FakeClock, seconds: float) -> None:
    clock.advance(seconds)
    await sessions.tick()


async def test_an_unused_channel_broadcast_is_released_and_made_again_with_the_same_ids(tmp_path):
    sessions, clock = make_manager(tmp_path)
    try:
        channel = sessions.channels.create(owner_id("k"), {"title": "Friday"}, clock.time())
        first = sessions.broadcast(channel.broadcast_id)  # a watch page asked for it
        await later(sessions, clock, GRACE - 1)
        assert sessions.broadcasts.get(channel.broadcast_id) is first  # not yet
        await later(sessions, clock, 1)
        assert channel.broadcast_id not in sessions.broadcasts
        assert first.closed and first.media.closed and first.spectators.closed

        again = sessions.broadcast(channel.broadcast_id)  # the next ask makes it again: same id and token
        assert again is not first and not again.closed
        assert (again.broadcast_id, again.spectator_token) == (first.broadcast_id, first.spectator_token)
    finally:
        await sessions.close()
    assert sessions.broadcasts == {} and again.closed


async def test_an_events_socket_or_a_host_keeps_it_and_the_grace_counts_from_when_they_left(tmp_path):
    sessions, clock = make_manager(tmp_path)
    try:
        channel = sessions.channels.create(owner_id("k"), {"title": "Friday"}, clock.time())
        broadcast = sessions.broadcast(channel.broadcast_id)
        participant = broadcast.audience.open_channel()  # a watch page's events socket
        await later(sessions, clock, GRACE * 3)
        assert sessions.broadcasts.get(channel.broadcast_id) is broadcast
        broadcast.audience.close_channel(participant)
        await later(sessions, clock, GRACE - 1)  # counted from the socket's close, not from the first ask
        assert sessions.broadcasts.get(channel.broadcast_id) is broadcast

        conn = await sessions.open_connection("k", channel)  # a host on it: never released
        assert conn.broadcast is broadcast
        sessions.control_opened(conn)
        await later(sessions, clock, GRACE * 3)
        assert sessions.broadcasts.get(channel.broadcast_id) is broadcast
        await sessions.close_connection(conn)
        assert sessions.broadcasts.get(channel.broadcast_id) is broadcast and not broadcast.closed
        await later(sessions, clock, GRACE - 1)
        assert sessions.broadcasts.get(channel.broadcast_id) is broadcast
        await later(sessions, clock, 1)
        assert channel.broadcast_id not in sessions.broadcasts and broadcast.closed
        assert sessions.streamers_free == sessions._limits.streamers
    finally:
        await sessions.close()
