"""Unit tests of a broadcast's parts on a fake media graph (tests/unit/fake_media.py): the stream's
hand-off, the audience and its orchestration pushes, the spectators' caps, the close order, and the
SessionManager's state machine, with no render or encoder thread anywhere."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import pytest
from aiortc import RTCPeerConnection

from relay.audience import STATE_PUSH_INTERVAL
from relay.broadcast import STATUS_SPAN, Broadcast
from relay.clock import FakeClock
from relay.config import Settings
from relay.errors import RelayError
from relay.media.webrtc import restrict_ice_host_addresses
from relay.orchestration import Forward
from relay.sessions import SessionManager
from relay.worldmodel.synthetic import SyntheticTrack, SyntheticWorldModel
from tests.unit.fake_media import FakeMedia

KEY = "key-a"


def make_settings(**sections: dict[str, Any]) -> Settings:
    data: dict[str, Any] = {"auth": {"api_keys": [KEY]}, "world_model": {"width": 64, "height": 48, "fps": 25},
                            "webrtc": {"ice_host_addresses": ["127.0.0.1"]}}
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return Settings.from_dict(data)


def drain(queue: asyncio.Queue) -> list[Any]:
    events = []
    while not queue.empty():
        event = queue.get_nowait()
        events.append(json.loads(event) if isinstance(event, str) else event)
    return events


def media_threads() -> list[str]:
    """Render and encoder threads (asyncio's own executor, which aiortc's gathering uses, is not media)."""
    return [t.name for t in threading.enumerate() if t.name.startswith(("synthetic-render", "relay-encoder"))]


@pytest.fixture
async def no_new_threads():
    yield
    assert media_threads() == []


@pytest.fixture
async def broadcast(no_new_threads):
    clock = FakeClock()
    b = Broadcast("conn-1", make_settings(), clock, media=FakeMedia)
    b.clock = clock  # type: ignore[attr-defined]  (the tests move it)
    yield b
    await b.close()


def media(b: Broadcast) -> FakeMedia:
    assert isinstance(b.media, FakeMedia)
    return b.media


# -- the stream's hand-off -------------------------------------------------------------------

async def test_a_stream_attaches_to_the_media_graph_and_is_announced_and_recorded(broadcast):
    channel = broadcast.audience.open_channel()
    track = SyntheticTrack(64, 48, 25)
    broadcast.attach_stream("s1", "hills", track, 64, 48, 25)
    assert broadcast.live and broadcast.state()["stream_id"] == "s1" and broadcast.prompt == "hills"
    assert media(broadcast).sources == [("s1", 64, 48, 25)]
    broadcast.prompt_applied("ocean", "host")
    started = {"type": "stream_started", "stream_id": "s1", "prompt": "hills"}
    applied = {"type": "prompt_applied", "prompt": "ocean", "source": "host", "mode": "host"}
    assert drain(channel.queue) == [started, applied]
    assert media(broadcast).recorded == [started, applied]  # what the recording's events log keeps

    await broadcast.detach_stream("ended")
    assert not broadcast.live and media(broadcast).detached == ["ended"] and track.readyState == "ended"
    assert drain(channel.queue) == [{"type": "stream_ended", "stream_id": "s1", "reason": "ended"}]
    await broadcast.detach_stream("ended")  # nothing live: nothing said
    assert drain(channel.queue) == [] and media(broadcast).detached == ["ended"]


async def test_viewer_counts_go_to_everyone_but_not_into_the_recording(broadcast):
    channel = broadcast.audience.open_channel()
    broadcast.attach_stream("s1", "hills", SyntheticTrack(64, 48, 25), 64, 48, 25)
    drain(channel.queue)
    await broadcast.tick()
    assert drain(channel.queue) == [{"type": "viewers", "count": 0}]
    await broadcast.tick()  # unchanged: not repeated
    assert drain(channel.queue) == []
    assert [e["type"] for e in media(broadcast).recorded] == ["stream_started"]


async def test_other_nodes_viewers_add_to_the_count_the_peak_and_the_recording(broadcast):
    channel = broadcast.audience.open_channel()
    broadcast.attach_stream("s1", "hills", SyntheticTrack(64, 48, 25), 64, 48, 25)
    drain(channel.queue)
    broadcast.viewers_elsewhere = 3  # a cluster's beat: three viewers at edges
    assert broadcast.state()["spectators"] == 3
    await broadcast.tick()
    assert drain(channel.queue) == [{"type": "viewers", "count": 3}]
    broadcast.viewers_elsewhere = 1
    await broadcast.tick()
    assert broadcast.viewers == 1 and broadcast.peak_spectators == 3
    assert [e["count"] for e in media(broadcast).recorded if e["type"] == "viewers"] == [3, 1]


# -- the audience: the host's actions push the state themselves ------------------------------

async def test_each_orchestration_action_pushes_the_new_state_at_once(broadcast):
    host: list[dict[str, Any]] = []
    broadcast.audience.host_event = host.append
    channel = broadcast.audience.open_channel()
    pid = channel.participant_id

    broadcast.audience.configure({"type": "orchestration", "mode": "turns"})
    assert [e["mode"] for e in drain(channel.queue)] == ["turns"]
    assert host[-1]["type"] == "orchestration" and host[-1]["mode"] == "turns"

    # No tick in between, no time passing: each action shows its result straight away.
    for action, check in [
        (lambda: broadcast.audience.grant_turn(pid), lambda s: s["turn"]["holder"]["participant_id"] == pid),
        (broadcast.audience.revoke_turn, lambda s: s["turn"]["holder"] is None),
        (lambda: broadcast.audience.block(pid), lambda s: s["participants"][0]["blocked"]),
        (lambda: broadcast.audience.unblock(pid), lambda s: not s["participants"][0]["blocked"]),
    ]:
        pushed = len(host)
        action()
        assert len(host) == pushed + 1 and check(host[-1]), host[-1]


async def test_a_refused_action_pushes_nothing(broadcast):
    host: list[dict[str, Any]] = []
    broadcast.audience.host_event = host.append
    with pytest.raises(RelayError) as info:
        broadcast.audience.grant_turn("nobody")  # not in turns mode
    assert info.value.status == 409 and host == []
    with pytest.raises(RelayError):
        broadcast.audience.configure({"mode": 3})
    assert host == []


async def test_state_pushes_from_the_tick_are_coalesced(broadcast):
    host: list[dict[str, Any]] = []
    broadcast.audience.host_event = host.append
    broadcast.audience.open_channel()  # a participant arriving changes the host's state
    await broadcast.tick()
    assert len(host) == 1
    broadcast.audience.open_channel()
    await broadcast.tick()  # changed, but within the interval: held back
    assert len(host) == 1
    broadcast.clock.advance(STATE_PUSH_INTERVAL)
    await broadcast.tick()
    assert len(host) == 2 and len(host[-1]["participants"]) == 2


async def test_an_accepted_input_reaches_the_stream_only_while_one_is_live(broadcast):
    forwarded: list[Forward] = []

    async def forward(f: Forward) -> None:
        forwarded.append(f)

    broadcast.audience.forward_input = forward
    channel = broadcast.audience.open_channel()
    broadcast.audience.configure({"mode": "turns"})
    broadcast.audience.grant_turn(channel.participant_id)
    reply = await broadcast.audience.participant_message(channel, {"type": "input", "prompt": "a red kite"})
    assert reply["status"] == "forwarded" and forwarded == []  # nothing live: dropped, not queued upstream
    broadcast.attach_stream("s1", "hills", SyntheticTrack(64, 48, 25), 64, 48, 25)
    broadcast.clock.advance(broadcast.orchestrator.settings.cooldown_seconds)
    await broadcast.audience.participant_message(channel, {"type": "input", "prompt": "a blue kite"})
    assert [f.prompt for f in forwarded] == ["a blue kite"]


# -- spectators --------------------------------------------------------------------------------

async def offer() -> tuple[RTCPeerConnection, str]:
    pc = RTCPeerConnection()
    pc.addTransceiver("video", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    return pc, pc.localDescription.sdp


async def test_no_events_socket_is_admitted_once_the_audience_closed():
    # Closing a broadcast awaits its recording and streamer after the audience closes; a watch page
    # reconnecting in that window must be refused, not left open with nobody to ever close it.
    b = Broadcast("conn-1", make_settings(), FakeClock(), media=FakeMedia)
    early = b.audience.open_channel(address="10.0.0.1")
    await b.close()
    assert json.loads(early.queue.get_nowait()) == {"type": "disconnected", "reason": "disconnected"}
    assert early.queue.get_nowait() is None  # told to finish
    with pytest.raises(RelayError) as info:
        b.audience.open_channel(address="10.0.0.1")
    assert info.value.status == 404 and b.audience._channels == {}


async def test_the_cluster_seams_publish_each_event_once_and_tell_a_relayed_participants_close(broadcast):
    # A participant whose socket is at another node (relay/cluster/audience_link.py): its events travel in
    # `published`, once per event however many such participants; its close is told, not queued.
    audience, published, told = broadcast.audience, [], []
    local = audience.open_channel(address="10.0.0.1")
    relayed = [audience.open_channel(address="10.0.0.2") for _ in range(3)]
    for channel in relayed:
        channel.relayed_close = told.append
    audience.published = published.append
    broadcast.emit({"type": "viewers", "count": 7})
    assert [json.loads(text) for text in published] == [{"type": "viewers", "count": 7}]
    assert drain(local.queue) == [{"type": "viewers", "count": 7}]
    assert all(channel.queue.empty() for channel in relayed)
    again = audience.open_channel(audience.resume_token(relayed[0].participant_id), address="10.0.0.3")
    assert again.resumed and told == [True] and relayed[0].replaced  # replaced: its node closes it 4001
    await broadcast.close()
    # The local socket hears why (the audience's `disconnected`), then its queue ends; the relayed ones' nodes
    # hear it in `published` and are told to close.
    assert told == [True, False, False] and drain(local.queue) == [{"type": "disconnected", "reason": "disconnected"}, None]
    assert json.loads(published[-1]) == {"type": "disconnected", "reason": "disconnected"}


async def test_pending_sessions_are_capped_per_address_and_none_outlives_the_close(no_new_threads):
    restrict_ice_host_addresses(("127.0.0.1",))
    b = Broadcast("conn-1", make_settings(limits={"pending_whep_per_address": 1}), FakeClock(), media=FakeMedia)
    clients = [await offer() for _ in range(4)]
    try:
        first, _ = await b.spectators.join(clients[0][1], address="10.0.0.1")
        assert not first.connected and b.viewers == 0 and list(b.spectators) == [first.spectator_id]
        with pytest.raises(RelayError) as info:
            await b.spectators.join(clients[1][1], address="10.0.0.1")
        assert info.value.code == "RATE_LIMITED" and info.value.status == 429
        await b.spectators.join(clients[2][1], address="10.0.0.2")  # another address: its own allowance
        preview, _ = await b.spectators.join(clients[3][1], counted=False, address="10.0.0.1")  # the host
        assert len(b.spectators) == 3 and b.spectators.spectator(preview.spectator_id) is preview

        await b.close()
        assert b.spectators == {} and all(f.track.readyState == "ended" for f in media(b).feeds)
        assert media(b).closed
        with pytest.raises(RelayError) as info:
            await b.spectators.join((await offer())[1])
        assert info.value.status == 404
    finally:
        await b.close()
        for pc, _ in clients:
            await pc.close()


# -- the session state machine, on the fake graph ---------------------------------------------

async def test_a_session_runs_its_streams_on_a_fake_media_graph(no_new_threads):
    clock = FakeClock()
    manager = SessionManager(make_settings(limits={"stream_max_seconds": 30}), SyntheticWorldModel(64, 48, 25),
                             clock=clock, media=FakeMedia)
    try:
        conn = await manager.open_connection(KEY)
        stream = await manager.start_stream(conn, "hills")
        assert conn.broadcast.live and media(conn.broadcast).source is conn.streamer.track
        assert media_threads() == []  # live, and nothing renders or encodes
        assert await manager.interact(stream, "ocean") == "ocean" and conn.broadcast.prompt == "ocean"

        media(conn.broadcast).source_failed = RuntimeError("upstream gone")
        await manager.tick()
        assert stream.end_reason == "upstream_error" and not conn.broadcast.live

        second = await manager.start_stream(conn, "dunes")
        clock.advance(30)
        await manager.tick()
        assert second.end_reason == "duration_limit"
        assert media(conn.broadcast).detached == ["upstream_error", "duration_limit"]
    finally:
        await manager.close()
    assert manager.connections == {} and media(conn.broadcast).closed


# -- the host's control room -------------------------------------------------------------------

async def test_the_control_room_status_counts_and_measures_the_stream():
    clock = FakeClock()
    b = Broadcast("conn-1", make_settings(), clock, media=FakeMedia)
    b.audience.open_channel(address="10.0.0.1")
    assert b.status() == {"type": "status", "viewers": {"webrtc": 0, "hls": 0}, "participants": 1, "stream": None}

    b.attach_stream("s1", "hills", SyntheticTrack(64, 48, 25), 64, 48, 25)
    assert b.status()["stream"] == {"stream_id": "s1", "fps": None, "bitrate_kbps": None, "keyframes_forced": 0}
    clock.advance(STATUS_SPAN * 2)
    b.media.hub.published += round(50 * STATUS_SPAN)  # 25 fps and 250 kB/s: 2000 kbps
    b.media.hub.published_bytes += round(500_000 * STATUS_SPAN)
    assert b.status()["stream"] == {"stream_id": "s1", "fps": 25.0, "bitrate_kbps": 2000, "keyframes_forced": 0}
    clock.advance(STATUS_SPAN / 2)  # asked again soon: the same measure, not one over a sliver of time
    assert b.status()["stream"]["fps"] == 25.0
    await b.close()
