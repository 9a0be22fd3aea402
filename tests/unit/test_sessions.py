"""Unit tests of the SessionManager core: the connection and stream state machines, the
streamer pool, the per-key limits and every deadline enforced by ``tick()``.

No HTTP: a FakeClock stands in for time and each test moves it and calls ``tick()`` itself.
The world model is the real SyntheticWorldModel at a tiny size, so a live stream runs the real
pipeline (render thread + encoder thread) and every test can check that those threads are gone.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import pytest

from relay.clock import FakeClock
from relay.config import Settings
from relay.errors import RelayError
from relay.host import HostCommands, broadcast_links
from relay.connection import Connection, ConnectionState
from relay.sessions import MAX_PROMPT_CHARS, SessionManager
from relay.worldmodel.synthetic import SyntheticTrack, SyntheticWorldModel

KEY = "key-a"
OTHER_KEY = "key-b"

WIDTH, HEIGHT, FPS = 64, 48, 25

LIMITS: dict[str, Any] = {
    "streamers": 2,
    "concurrent_streams": 2,
    "stream_max_seconds": 30,
    "connection_max_seconds": 600,
    "idle_timeout_seconds": 10,
    "client_token_seconds": 60,
}


def make_settings(**limits: Any) -> Settings:
    return Settings.from_dict({
        "auth": {"api_keys": [KEY, OTHER_KEY]},
        "limits": {**LIMITS, **limits},
        "world_model": {"width": WIDTH, "height": HEIGHT, "fps": FPS},
        "webrtc": {"ice_host_addresses": ["127.0.0.1"]},
    })


async def wait_threads(count: int, timeout: float = 2.0) -> int:
    """Threads are joined synchronously on close; poll briefly anyway, never a long sleep."""
    for _ in range(int(timeout / 0.02)):
        if threading.active_count() <= count:
            break
        await asyncio.sleep(0.02)
    return threading.active_count()


@pytest.fixture
async def baseline_threads() -> int:
    return threading.active_count()


@pytest.fixture
async def make_manager(baseline_threads):
    managers: list[SessionManager] = []

    def make(**limits: Any) -> SessionManager:
        manager = SessionManager(
            make_settings(**limits), SyntheticWorldModel(WIDTH, HEIGHT, FPS), clock=FakeClock()
        )
        managers.append(manager)
        return manager

    yield make
    for manager in managers:
        await manager.close()
    for manager in managers:
        assert manager.connections == {}
        assert manager.streamers_free == manager._limits.streamers
    assert await wait_threads(baseline_threads) == baseline_threads, [t.name for t in threading.enumerate()]


@pytest.fixture
def manager(make_manager) -> SessionManager:
    return make_manager()


def drain(queue: asyncio.Queue) -> list[dict[str, Any]]:
    """Everything queued; participants' channels hold events already serialized to JSON text."""
    events = []
    while not queue.empty():
        event = queue.get_nowait()
        events.append(json.loads(event) if isinstance(event, str) else event)
    return events


def types(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events]


def live_track(conn: Connection) -> SyntheticTrack:
    track = conn.streamer.track
    assert isinstance(track, SyntheticTrack)
    return track


async def wait_until(predicate, timeout: float = 3.0) -> bool:
    for _ in range(int(timeout / 0.02)):
        if predicate():
            return True
        await asyncio.sleep(0.02)
    return predicate()


async def raises(code: str, status: int, awaitable) -> RelayError:
    with pytest.raises(RelayError) as info:
        await awaitable
    assert (info.value.code, info.value.status) == (code, status), repr(info.value)
    return info.value


def hold_start(conn: Connection) -> asyncio.Event:
    """Make the connection's upstream start wait until the returned event is set."""
    original = conn.streamer.start_stream
    gate = asyncio.Event()

    async def held_start(*args, **kwargs):
        await gate.wait()
        return await original(*args, **kwargs)

    conn.streamer.start_stream = held_start
    return gate


async def _aw(fn):
    """A synchronous lookup as an awaitable, for ``raises``."""
    return fn()


# ------------------------------------------------------------------------------- the pool


async def test_open_connection_reserves_a_streamer(manager):
    assert manager.streamers_free == 2
    conn = await manager.open_connection(KEY)
    assert manager.streamers_free == 1
    assert conn.status == "connected" and not conn.closed
    assert conn.api_key == KEY
    assert conn.stream is None and conn.streams_started == 0
    assert manager.connection(conn.connection_id) is conn
    assert manager.broadcast(conn.broadcast.broadcast_id) is conn.broadcast
    assert manager.connection_for_client_token(conn.client_token) is conn
    # deadlines come from the limits, on the fake clock
    now = manager.clock.monotonic()
    assert conn.deadline == pytest.approx(now + 600)
    assert conn.client_token_deadline == pytest.approx(now + 60)
    await manager.open_connection(OTHER_KEY)  # the pool is shared by every key
    assert manager.streamers_free == 0


async def test_client_token_refresh_keeps_a_long_connection_reachable(manager):
    clock = manager.clock
    conn = await manager.open_connection(KEY)
    first = conn.client_token
    manager.refresh_client_token(conn)  # fresh still: nothing is minted
    assert conn.client_token == first and len(conn.client_tokens) == 1
    clock.advance(31)  # past half of the 60 s life
    manager.refresh_client_token(conn)
    second = conn.client_token
    assert second != first and conn.client_token_deadline == pytest.approx(clock.monotonic() + 60)
    assert manager.connection_for_client_token(first) is conn  # the old one until its own end
    clock.advance(30)
    assert manager.connection_for_client_token(first) is None
    assert manager.connection_for_client_token(second) is conn
    for _ in range(20):  # a host asking every second for an hour keeps about two alive, not 3600
        clock.advance(15)
        manager.refresh_client_token(conn)
        assert len(conn.client_tokens) <= 3
    latest = conn.client_token
    await manager.close_connection(conn)
    assert manager.connection_for_client_token(latest) is None
    assert manager._by_client_token == {}


async def test_pool_exhausted_is_503_with_retry_after(manager):
    await manager.open_connection(KEY)
    await manager.open_connection(OTHER_KEY)
    err = await raises("STREAMER_NOT_AVAILABLE", 503, manager.open_connection(KEY))
    assert err.retry_after is not None and err.retry_after > 0
    assert err.headers() == {"Retry-After": "5"}
    assert err.details == {"streamers": 2}
    assert manager.streamers_free == 0
    assert len(manager.connections) == 2


async def test_closing_frees_the_streamer_at_once(manager):
    a = await manager.open_connection(KEY)
    await manager.open_connection(KEY)
    outbox = a.listen()
    await raises("STREAMER_NOT_AVAILABLE", 503, manager.open_connection(KEY))
    await manager.close_connection(a)  # no tick, no clock movement
    assert manager.streamers_free == 1
    assert a.closed and a.status == "closed" and a.close_reason == "disconnected"
    assert drain(outbox) == [{"type": "disconnected", "reason": "disconnected"}]
    await raises("NOT_FOUND", 404, _aw(lambda: manager.connection(a.connection_id)))
    await raises("NOT_FOUND", 404, _aw(lambda: manager.broadcast(a.broadcast.broadcast_id)))
    assert manager.connection_for_client_token(a.client_token) is None
    assert a.broadcast.closed
    c = await manager.open_connection(KEY)
    assert manager.streamers_free == 0 and not c.closed
    # closing twice is harmless and does not free a second streamer
    await manager.close_connection(a, "disconnected")
    assert manager.streamers_free == 0
    assert drain(outbox) == []


@pytest.mark.parametrize("slow_connect", [False, True], ids=["instant-connect", "yielding-connect"])
async def test_concurrent_opens_never_overbook(make_manager, slow_connect):
    manager = make_manager(streamers=3)
    if slow_connect:  # an upstream that takes a while to hand out a streamer
        wm = manager._world_model
        original = wm.connect

        async def connect():
            await asyncio.sleep(0.01)
            return await original()

        wm.connect = connect
    results = await asyncio.gather(*(manager.open_connection(KEY) for _ in range(7)), return_exceptions=True)
    opened = [r for r in results if isinstance(r, Connection)]
    refused = [r for r in results if not isinstance(r, Connection)]
    assert len(opened) == 3
    assert len(refused) == 4
    assert all(isinstance(e, RelayError) and e.code == "STREAMER_NOT_AVAILABLE" for e in refused)
    assert manager.streamers_free == 0
    assert len(manager.connections) == 3
    assert len({c.streamer for c in opened}) == 3


async def test_failed_upstream_connect_gives_the_reservation_back(manager):
    async def broken():
        raise ConnectionError("upstream down")

    manager._world_model.connect = broken
    with pytest.raises(ConnectionError):
        await manager.open_connection(KEY)
    assert manager.streamers_free == 2
    assert manager.connections == {}


# ------------------------------------------------------------------------------- streams


async def test_start_stream_goes_live(manager, baseline_threads):
    conn = await manager.open_connection(KEY)
    outbox = conn.listen()
    stream = await manager.start_stream(conn, "  sunny desert  ")
    assert stream.live and stream.status == "live"
    assert conn.stream is stream
    assert conn.status == "streaming"
    assert conn.streams_started == 1
    assert stream.prompt == "sunny desert" and stream.last_applied_prompt == "sunny desert"
    assert (stream.width, stream.height) == (WIDTH, HEIGHT)
    assert stream.deadline == pytest.approx(manager.clock.monotonic() + 30)
    assert manager.stream(stream.stream_id) is stream
    assert manager.live_streams(KEY) == [stream]
    assert manager.live_streams(OTHER_KEY) == []
    assert conn.broadcast.live and conn.broadcast.stream_id == stream.stream_id
    assert conn.to_dict(manager.clock.time(), manager.clock.monotonic())["stream"]["stream_id"] == stream.stream_id
    assert drain(outbox) == [{
        "type": "stream_started",
        "stream_id": stream.stream_id,
        "prompt": "sunny desert",
        "max_duration_seconds": 30.0,
        "width": WIDTH,
        "height": HEIGHT,
    }]
    # the pipeline really runs: frames flow from the synthetic track through the encoder
    assert await wait_until(lambda: conn.broadcast.media.hub.published > 0)
    assert conn.broadcast.upstream_failed is None
    await manager.end_stream(stream)
    assert await wait_threads(baseline_threads) == baseline_threads


async def test_portrait_stream_swaps_the_size(manager):
    conn = await manager.open_connection(KEY)
    stream = await manager.start_stream(conn, "forest", portrait=True)
    assert (stream.width, stream.height) == (HEIGHT, WIDTH)
    track = live_track(conn)
    assert (track.width, track.height) == (HEIGHT, WIDTH)


async def test_second_start_while_live_is_409(manager):
    conn = await manager.open_connection(KEY)
    first = await manager.start_stream(conn, "hills")
    err = await raises("STREAM_ALREADY_ACTIVE", 409, manager.start_stream(conn, "ocean"))
    assert err.details == {"stream_id": first.stream_id}
    assert conn.stream is first and first.live
    assert conn.streams_started == 1
    assert live_track(conn).prompt == "hills"


async def test_concurrent_starts_on_one_connection_yield_one_stream(manager):
    conn = await manager.open_connection(KEY)
    original = conn.streamer.start_stream

    async def slow_start(*args, **kwargs):  # an upstream that takes a moment to start
        await asyncio.sleep(0.01)
        return await original(*args, **kwargs)

    conn.streamer.start_stream = slow_start
    results = await asyncio.gather(*(manager.start_stream(conn, "night") for _ in range(3)), return_exceptions=True)
    started = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(started) == 1
    assert all(isinstance(e, RelayError) and e.code == "STREAM_ALREADY_ACTIVE" for e in refused)
    assert conn.streams_started == 1 and conn.stream is started[0]


async def test_concurrent_stream_limit_per_api_key(make_manager):
    manager = make_manager(streamers=4, concurrent_streams=2)
    a1, a2, a3 = [await manager.open_connection(KEY) for _ in range(3)]
    b = await manager.open_connection(OTHER_KEY)
    s1 = await manager.start_stream(a1, "one")
    manager.clock.advance(5)
    await manager.start_stream(a2, "two")
    manager.clock.advance(3)
    err = await raises("CONCURRENT_LIMIT_REACHED", 429, manager.start_stream(a3, "three"))
    assert err.details == {"active_count": 2, "limit": 2}
    # the earliest live stream ends (duration limit) 30 - 8 = 22 s from now
    assert err.retry_after == pytest.approx(22)
    assert err.headers() == {"Retry-After": "22"}
    assert a3.stream is None and a3.status == "connected" and a3.state is ConnectionState.CONNECTED
    assert a3.streams_started == 0
    # another API key is unaffected
    sb = await manager.start_stream(b, "other key")
    assert sb.live and b.status == "streaming"
    # ending one of the key's streams makes room again
    await manager.end_stream(s1)
    s3 = await manager.start_stream(a3, "three")
    assert s3.live
    assert len(manager.live_streams(KEY)) == 2


async def test_concurrent_limit_retry_after_is_at_least_one_second(make_manager):
    manager = make_manager(concurrent_streams=1)
    a, b = [await manager.open_connection(KEY) for _ in range(2)]
    await manager.start_stream(a, "one")
    manager.clock.advance(29.9)
    manager.touch(a)
    err = await raises("CONCURRENT_LIMIT_REACHED", 429, manager.start_stream(b, "two"))
    assert err.retry_after == 1.0
    assert err.details == {"active_count": 1, "limit": 1}


BAD_PROMPTS = ["", "   ", "\n\t", None, 42, 1.5, ["hills"], {"prompt": "x"}, b"hills", "x" * (MAX_PROMPT_CHARS + 1)]


@pytest.mark.parametrize("prompt", BAD_PROMPTS, ids=lambda p: repr(p)[:20])
async def test_bad_prompt_is_422(manager, prompt):
    conn = await manager.open_connection(KEY)
    err = await raises("INVALID_REQUEST", 422, manager.start_stream(conn, prompt))
    assert err.details.get("field") == "prompt"
    assert conn.stream is None and conn.status == "connected" and conn.streams_started == 0
    stream = await manager.start_stream(conn, "hills")
    err = await raises("INVALID_REQUEST", 422, manager.interact(stream, prompt))
    assert err.details.get("field") == "prompt"
    assert stream.last_applied_prompt == "hills"


async def test_longest_prompt_is_accepted(manager):
    conn = await manager.open_connection(KEY)
    stream = await manager.start_stream(conn, "y" * MAX_PROMPT_CHARS)
    assert stream.prompt == "y" * MAX_PROMPT_CHARS
    err = await raises("INVALID_REQUEST", 422, manager.interact(stream, "y" * (MAX_PROMPT_CHARS + 1)))
    assert err.details == {"field": "prompt", "limit": MAX_PROMPT_CHARS}


async def test_interact_updates_the_prompt(manager):
    conn = await manager.open_connection(KEY)
    stream = await manager.start_stream(conn, "hills")
    outbox = conn.listen()
    channel = conn.broadcast.audience.open_channel()
    acknowledged = await manager.interact(stream, "  stormy night  ")
    assert acknowledged == "stormy night"
    assert stream.last_applied_prompt == "stormy night"
    assert stream.prompt == "hills"  # the starting prompt is kept
    assert live_track(conn).prompt == "stormy night"
    assert conn.broadcast.prompt == "stormy night"
    assert drain(outbox) == [{"type": "interact_acknowledged", "prompt": "stormy night"}]
    assert drain(channel.queue) == [
        {"type": "prompt_applied", "prompt": "stormy night", "source": "host", "mode": "host"}
    ]
    assert stream.to_dict()["last_applied_prompt"] == "stormy night"


async def test_interact_on_ended_stream_is_409(manager):
    conn = await manager.open_connection(KEY)
    stream = await manager.start_stream(conn, "hills")
    await manager.end_stream(stream)
    err = await raises("NO_ACTIVE_STREAM", 409, manager.interact(stream, "ocean"))
    assert err.details == {"stream_id": stream.stream_id, "end_reason": "ended"}
    assert stream.last_applied_prompt == "hills"


async def test_end_stream_is_idempotent(manager, baseline_threads):
    conn = await manager.open_connection(KEY)
    outbox = conn.listen()
    channel = conn.broadcast.audience.open_channel()
    stream = await manager.start_stream(conn, "hills")
    drain(outbox), drain(channel.queue)
    await manager.end_stream(stream, "ended")
    assert not stream.live and stream.status == "ended" and stream.end_reason == "ended"
    assert stream.ended_at == manager.clock.time()
    assert conn.status == "connected" and not conn.closed
    assert not conn.broadcast.live
    assert manager.live_streams(KEY) == []
    assert conn.to_dict(manager.clock.time(), manager.clock.monotonic())["stream"] is None
    assert drain(outbox) == [{"type": "stream_ended", "stream_id": stream.stream_id, "reason": "ended"}]
    assert drain(channel.queue) == [{"type": "stream_ended", "stream_id": stream.stream_id, "reason": "ended"}]
    # a second end (any reason) changes nothing and says nothing
    await manager.end_stream(stream, "ended")
    await manager.end_stream(stream, "duration_limit")
    assert stream.end_reason == "ended"
    assert drain(outbox) == [] and drain(channel.queue) == []
    assert manager.stream(stream.stream_id) is stream  # an ended stream stays queryable
    assert manager.streamers_free == 1  # ending a stream keeps the connection's streamer
    assert await wait_threads(baseline_threads) == baseline_threads


async def test_new_stream_after_ended_one_on_same_connection(manager):
    conn = await manager.open_connection(KEY)
    outbox = conn.listen()
    first = await manager.start_stream(conn, "hills")
    await manager.end_stream(first)
    second = await manager.start_stream(conn, "ocean")
    assert second.stream_id != first.stream_id
    assert second.live and not first.live
    assert conn.stream is second and conn.status == "streaming"
    assert conn.streams_started == 2
    assert manager.stream(first.stream_id).status == "ended"
    assert types(drain(outbox)) == ["stream_started", "stream_ended", "stream_started"]
    assert await wait_until(lambda: conn.broadcast.media.hub.published > 0)
    assert live_track(conn).prompt == "ocean"
    assert (await manager.interact(second, "night")) == "night"


async def test_start_on_closed_connection_is_404(manager):
    conn = await manager.open_connection(KEY)
    await manager.close_connection(conn)
    await raises("NOT_FOUND", 404, manager.start_stream(conn, "hills"))
    assert conn.stream is None


async def test_unknown_ids_are_404(manager):
    for lookup in (manager.connection, manager.stream, manager.broadcast):
        await raises("NOT_FOUND", 404, _aw(lambda: lookup("nope")))
    assert manager.connection_for_client_token("nope") is None


# ------------------------------------------------------------------------------- deadlines


async def test_stream_max_seconds_ends_with_duration_limit(manager, baseline_threads):
    conn = await manager.open_connection(KEY)
    manager.control_opened(conn)  # keeps the idle reaper away
    outbox = conn.listen()
    stream = await manager.start_stream(conn, "hills")
    drain(outbox)
    manager.clock.advance(29.5)
    await manager.tick()
    assert stream.live and conn.status == "streaming"
    manager.clock.advance(1)
    assert stream.live  # nothing happens until tick()
    await manager.tick()
    assert not stream.live and stream.end_reason == "duration_limit"
    assert conn.status == "connected" and not conn.closed
    assert manager.streamers_free == 1
    assert drain(outbox) == [{"type": "stream_ended", "stream_id": stream.stream_id, "reason": "duration_limit"}]
    assert await wait_threads(baseline_threads) == baseline_threads
    # the connection can start again, with a fresh deadline
    again = await manager.start_stream(conn, "ocean")
    assert again.deadline == pytest.approx(manager.clock.monotonic() + 30)


async def test_connection_max_seconds_expires_connection(make_manager, baseline_threads):
    manager = make_manager(connection_max_seconds=20, stream_max_seconds=30)
    conn = await manager.open_connection(KEY)
    manager.control_opened(conn)  # an open control socket does not prevent expiry
    outbox = conn.listen()
    stream = await manager.start_stream(conn, "hills")
    drain(outbox)
    manager.clock.advance(19.5)
    await manager.tick()
    assert not conn.closed and stream.live
    manager.clock.advance(1)
    await manager.tick()
    assert conn.closed and conn.close_reason == "expired"
    assert not stream.live and stream.end_reason == "disconnected"
    assert manager.streamers_free == 2
    assert conn.connection_id not in manager.connections
    assert drain(outbox) == [
        {"type": "stream_ended", "stream_id": stream.stream_id, "reason": "disconnected"},
        {"type": "disconnected", "reason": "expired"},
    ]
    assert await wait_threads(baseline_threads) == baseline_threads


async def test_idle_connection_is_reaped(manager):
    conn = await manager.open_connection(KEY)
    outbox = conn.listen()
    manager.clock.advance(9.5)
    await manager.tick()
    assert not conn.closed and manager.streamers_free == 1
    manager.clock.advance(1)
    await manager.tick()
    assert conn.closed and conn.close_reason == "idle_timeout"
    assert manager.streamers_free == 2
    assert drain(outbox) == [{"type": "disconnected", "reason": "idle_timeout"}]


async def test_idle_reaper_ends_a_live_stream(manager, baseline_threads):
    conn = await manager.open_connection(KEY)
    stream = await manager.start_stream(conn, "hills")
    manager.clock.advance(10.5)
    await manager.tick()
    assert conn.closed and conn.close_reason == "idle_timeout"
    assert stream.end_reason == "disconnected"
    assert manager.streamers_free == 2
    assert await wait_threads(baseline_threads) == baseline_threads


async def test_touch_resets_the_idle_timer(manager):
    conn = await manager.open_connection(KEY)
    for _ in range(5):  # 5 x 8 s = 40 s, well past the 10 s idle timeout
        manager.clock.advance(8)
        manager.touch(conn)
        await manager.tick()
        assert not conn.closed
    manager.clock.advance(9.5)
    await manager.tick()
    assert not conn.closed
    manager.clock.advance(1)
    await manager.tick()
    assert conn.closed and conn.close_reason == "idle_timeout"


async def test_open_control_socket_prevents_reaping(manager):
    conn = await manager.open_connection(KEY)
    manager.control_opened(conn)
    manager.control_opened(conn)  # two sockets
    for _ in range(10):  # 500 s, far past idle_timeout, short of connection_max_seconds
        manager.clock.advance(50)
        await manager.tick()
    assert not conn.closed
    manager.control_closed(conn)  # one socket remains
    manager.clock.advance(50)
    await manager.tick()
    assert not conn.closed
    manager.control_closed(conn)  # the last one goes: the countdown starts now, not at the last touch
    assert conn.control_sockets == 0
    manager.clock.advance(9.5)
    await manager.tick()
    assert not conn.closed
    manager.clock.advance(1)
    await manager.tick()
    assert conn.closed and conn.close_reason == "idle_timeout"
    assert manager.streamers_free == 2


async def test_control_closed_never_goes_negative(manager):
    conn = await manager.open_connection(KEY)
    manager.control_closed(conn)
    manager.control_closed(conn)
    assert conn.control_sockets == 0
    manager.control_opened(conn)
    assert conn.control_sockets == 1
    manager.clock.advance(100)
    await manager.tick()
    assert not conn.closed


async def test_client_token_expires(manager):
    conn = await manager.open_connection(KEY)
    manager.control_opened(conn)
    token = conn.client_token
    manager.clock.advance(59.5)
    assert manager.connection_for_client_token(token) is conn
    manager.clock.advance(1)
    assert manager.connection_for_client_token(token) is None
    await manager.tick()
    assert not conn.closed  # only the token expires, not the connection
    assert manager.connection(conn.connection_id) is conn


async def test_upstream_failure_ends_stream_with_upstream_error(manager, baseline_threads):
    conn = await manager.open_connection(KEY)
    manager.control_opened(conn)
    outbox = conn.listen()
    stream = await manager.start_stream(conn, "hills")
    drain(outbox)
    assert await wait_until(lambda: conn.broadcast.media.hub.published > 0)
    live_track(conn).stop()  # the world model's track dies from under the pipeline
    assert await wait_until(lambda: conn.broadcast.upstream_failed is not None)
    assert stream.live  # only tick() acts on it
    await manager.tick()
    assert not stream.live and stream.end_reason == "upstream_error"
    assert conn.status == "connected" and not conn.closed
    assert manager.streamers_free == 1
    assert drain(outbox) == [{"type": "stream_ended", "stream_id": stream.stream_id, "reason": "upstream_error"}]
    assert await wait_threads(baseline_threads) == baseline_threads
    # the same connection can start a new stream, which runs
    again = await manager.start_stream(conn, "ocean")
    assert again.live and conn.streams_started == 2
    published = conn.broadcast.media.hub.published
    assert await wait_until(lambda: conn.broadcast.media.hub.published > published)
    await manager.tick()
    assert again.live and conn.broadcast.upstream_failed is None


# ------------------------------------------------------------------------------- the state and its log


def transitions(caplog, conn: Connection) -> list[str]:
    """The connection's logged state changes, as "a -> b"."""
    return [r.getMessage().removeprefix("connection ") for r in caplog.records
            if r.name == "relay.sessions" and getattr(r, "connection_id", None) == conn.connection_id
            and " -> " in r.getMessage()]


async def test_every_state_change_is_logged_once(manager, caplog):
    caplog.set_level("DEBUG", logger="relay.sessions")
    conn = await manager.open_connection(KEY)
    assert conn.state is ConnectionState.CONNECTED
    stream = await manager.start_stream(conn, "hills")
    assert conn.state is ConnectionState.STREAMING
    await manager.end_stream(stream)
    await manager.end_stream(stream)  # a second end changes nothing, so logs nothing
    assert conn.state is ConnectionState.CONNECTED
    await manager.close_connection(conn)
    await manager.close_connection(conn)
    assert conn.state is ConnectionState.CLOSED
    assert transitions(caplog, conn) == [
        "connected -> starting", "starting -> streaming", "streaming -> ending", "ending -> connected",
        "connected -> closed",
    ]


async def test_starting_and_ending_read_as_connected(manager):
    """The API's status has three values (docs/api.md); the two transient states are not among them."""
    conn = await manager.open_connection(KEY)
    original = conn.streamer.start_stream
    seen: list[tuple[ConnectionState, str]] = []

    async def observed_start(*args, **kwargs):
        seen.append((conn.state, conn.to_dict(0.0, 0.0)["status"]))
        return await original(*args, **kwargs)

    conn.streamer.start_stream = observed_start
    stream = await manager.start_stream(conn, "hills")
    original_end = conn.streamer.end_stream

    async def observed_end():
        seen.append((conn.state, conn.status))
        await original_end()

    conn.streamer.end_stream = observed_end
    await manager.end_stream(stream)
    assert seen == [(ConnectionState.STARTING, "connected"), (ConnectionState.ENDING, "connected")]
    assert [s.status for s in ConnectionState] == ["connected", "connected", "streaming", "connected", "closed"]


async def test_a_refused_start_goes_back_to_connected(manager, caplog):
    caplog.set_level("DEBUG", logger="relay.sessions")
    conn = await manager.open_connection(KEY)

    async def refuse(*args, **kwargs):
        raise RuntimeError("no capacity")

    conn.streamer.start_stream = refuse
    await raises("UPSTREAM_ERROR", 502, manager.start_stream(conn, "hills"))
    assert conn.state is ConnectionState.CONNECTED and conn.stream is None
    assert transitions(caplog, conn) == ["connected -> starting", "starting -> connected"]


async def test_a_close_during_a_start_stays_closed(manager, caplog):
    caplog.set_level("DEBUG", logger="relay.sessions")
    conn = await manager.open_connection(KEY)
    gate = hold_start(conn)
    starting = asyncio.create_task(manager.start_stream(conn, "hills"))
    await asyncio.sleep(0)
    closing = asyncio.create_task(manager.close_connection(conn))
    await asyncio.sleep(0)
    assert conn.state is ConnectionState.CLOSED  # at once, before the close's own work has run
    gate.set()
    await asyncio.gather(starting, closing, return_exceptions=True)
    assert conn.state is ConnectionState.CLOSED
    assert transitions(caplog, conn) == ["connected -> starting", "starting -> closed"]


# ------------------------------------------------------------------------------- host commands


async def test_host_start_announces_the_broadcast_to_every_listener(manager):
    conn = await manager.open_connection(KEY)
    outbox = conn.listen()
    stream = await HostCommands(manager, conn, "https://relay.example").start("hills")
    events = drain(outbox)
    assert types(events) == ["stream_started", "broadcast_ready"]
    b = conn.broadcast
    assert events[1]["broadcast"] == broadcast_links(b, "https://relay.example")
    assert events[1]["broadcast"]["watch_url"] == (
        f"https://relay.example/watch/{b.broadcast_id}?token={b.spectator_token}")
    assert conn.live_stream is stream


async def test_host_start_without_announcing(manager):
    conn = await manager.open_connection(KEY)
    outbox = conn.listen()
    await HostCommands(manager, conn, "").start("hills", announce=False)  # an SDK that asked for no broadcast
    assert types(drain(outbox)) == ["stream_started"]


async def test_host_commands_need_a_live_stream(manager):
    conn = await manager.open_connection(KEY)
    host = HostCommands(manager, conn, "")
    for command in (host.interact("ocean"), host.end()):
        err = await raises("NO_ACTIVE_STREAM", 409, command)
        assert err.details == {}  # nothing named: the connection has no live stream
    with pytest.raises(RelayError):
        conn.live_stream
    first = await host.start("hills")
    assert await host.interact("ocean") == "ocean"
    assert await host.end() is first and not first.live
    second = await host.start("desert")
    # A stream named by id (REST) is checked itself, not the connection's current one.
    for command in (host.interact("x", first), host.end(first)):
        err = await raises("NO_ACTIVE_STREAM", 409, command)
        assert err.details == {"stream_id": first.stream_id, "end_reason": "ended"}
    assert second.live and second.last_applied_prompt == "desert"


# ------------------------------------------------------------------------------- shutdown


async def test_manager_close_closes_everything(make_manager, baseline_threads):
    manager = make_manager(streamers=3)
    a = await manager.open_connection(KEY)
    b = await manager.open_connection(OTHER_KEY)
    c = await manager.open_connection(KEY)
    manager.control_opened(c)
    outbox_a = a.listen()
    sa = await manager.start_stream(a, "hills")
    sb = await manager.start_stream(b, "ocean")
    drain(outbox_a)
    assert await wait_until(lambda: a.broadcast.media.hub.published > 0 and b.broadcast.media.hub.published > 0)
    await manager.close()
    assert manager.closed
    assert all(conn.closed and conn.close_reason == "shutdown" for conn in (a, b, c))
    assert sa.end_reason == sb.end_reason == "disconnected"
    assert manager.connections == {} and manager.broadcasts == {}
    assert manager.streamers_free == 3
    assert all(conn.broadcast.closed for conn in (a, b, c))
    assert drain(outbox_a) == [
        {"type": "stream_ended", "stream_id": sa.stream_id, "reason": "disconnected"},
        {"type": "disconnected", "reason": "shutdown"},
    ]
    assert await wait_threads(baseline_threads) == baseline_threads
    # a closed manager opens nothing more
    await raises("STREAMER_NOT_AVAILABLE", 503, manager.open_connection(KEY))
    await manager.close()  # twice is fine
    await manager.tick()


# ------------------------------------------------------------------------------- races (bugs)


@pytest.mark.parametrize("phase", ["old-track-still-live", "old-track-stopped"])
async def test_start_racing_a_pending_end(manager, phase):
    """A start that arrives while the previous stream's end is still finishing (POST /streams
    right after DELETE, or the reaper ending the stream at its duration limit while the host
    starts the next one) must either wait for that end or be refused with a 409 - never fail
    as an upstream error, and never be torn down by the old stream's end."""
    conn = await manager.open_connection(KEY)
    manager.control_opened(conn)
    first = await manager.start_stream(conn, "hills")
    old_track = live_track(conn)
    assert await wait_until(lambda: conn.broadcast.media.hub.published > 0)
    ending = asyncio.create_task(manager.end_stream(first))
    await asyncio.sleep(0)  # end_stream now waits for the pipeline task to finish cancelling
    if phase == "old-track-stopped":
        # ... and then for the encoder flush on its thread, before streamer.end_stream()
        for _ in range(10_000):
            if ending.done() or old_track.readyState != "live":
                break
            await asyncio.sleep(0)
    if ending.done():
        pytest.skip("the end finished before a start could race it")
    assert not first.live and conn.status == "connected"  # reads as ended: a start is legitimate
    try:
        second = await manager.start_stream(conn, "ocean")
    except RelayError as err:
        await ending
        assert err.status == 409, (
            f"BUG: a start racing the previous stream's end failed with {err.code} {err.status} "
            f"({err.message}): the old track was still running on the streamer"
        )
        return
    await ending
    assert conn.stream is second and second.live
    track = conn.streamer.track
    assert track is not None and track.readyState == "live", (
        "BUG: the old stream's end_stream() called streamer.end_stream() after the new stream "
        "had started, stopping the NEW stream's track (and clearing streamer.track)"
    )
    await wait_until(lambda: conn.broadcast.upstream_failed is not None, timeout=0.3)
    await manager.tick()
    assert second.live, f"the new stream died: {second.end_reason}"


async def test_concurrent_limit_holds_with_a_slow_upstream(make_manager):
    """concurrent_streams must hold even when the world model takes time to start a stream."""
    manager = make_manager(streamers=3, concurrent_streams=1)
    conns = [await manager.open_connection(KEY) for _ in range(3)]
    for conn in conns:
        original = conn.streamer.start_stream

        async def slow_start(*args, _original=original, **kwargs):
            await asyncio.sleep(0.01)
            return await _original(*args, **kwargs)

        conn.streamer.start_stream = slow_start
    results = await asyncio.gather(*(manager.start_stream(c, "hills") for c in conns), return_exceptions=True)
    started = [r for r in results if not isinstance(r, BaseException)]
    assert len(manager.live_streams(KEY)) == len(started)
    assert len(started) == 1, (
        f"BUG: {len(started)} streams started for one API key with concurrent_streams=1: the limit "
        "is checked before awaiting the upstream and the stream is only registered after it"
    )
    assert all(isinstance(r, RelayError) and r.code == "CONCURRENT_LIMIT_REACHED"
               for r in results if isinstance(r, BaseException))


async def test_close_during_a_slow_start_leaves_nothing_running(manager, baseline_threads):
    """Closing a connection while its start is in flight must not leave a pipeline running
    on a closed connection (render and encoder threads nobody will ever stop)."""
    conn = await manager.open_connection(KEY)
    gate = hold_start(conn)
    starting = asyncio.create_task(manager.start_stream(conn, "hills"))
    await asyncio.sleep(0)
    await manager.close_connection(conn)
    gate.set()
    result = (await asyncio.gather(starting, return_exceptions=True))[0]
    try:
        assert isinstance(result, RelayError), result
        assert conn.closed
        assert conn.stream is None or not conn.stream.live, (
            "BUG: a stream went live on a connection closed while its start was in flight"
        )
        assert conn.status == "closed", f"BUG: closed connection's status became {conn.status!r}"
        assert not conn.broadcast.live, "BUG: a pipeline is attached to a closed broadcast"
        assert await wait_threads(baseline_threads) == baseline_threads, "BUG: pipeline threads leaked"
    finally:  # clean up what the manager no longer tracks, so later tests are unaffected
        await conn.broadcast.detach_stream("disconnected")
        await conn.streamer.end_stream()


async def test_close_manager_during_a_slow_open_leaves_no_connection(manager):
    """manager.close() while an open is in flight must not leave that connection open."""
    wm = manager._world_model
    original = wm.connect
    gate = asyncio.Event()

    async def slow_connect():
        await gate.wait()
        return await original()

    wm.connect = slow_connect
    opening = asyncio.create_task(manager.open_connection(KEY))
    await asyncio.sleep(0)
    await manager.close()
    gate.set()
    result = (await asyncio.gather(opening, return_exceptions=True))[0]
    leaked = [c for c in manager.connections.values()]
    try:
        assert leaked == [], (
            "BUG: open_connection() finished after close() and registered a connection on a closed manager"
        )
        assert manager.streamers_free == 2
    finally:
        for conn in leaked:
            await manager.close_connection(conn, "shutdown")
    assert isinstance(result, (Connection, RelayError))
