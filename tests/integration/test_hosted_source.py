"""`[world_model] kind = "hosted"`: the relay as a client of the hosted world-model API.

The hosted API cannot be reached from here, so its part is played by the relay's own twin of it: relay B
(synthetic source) serves `/odyssey`, relay A takes `B.url + "/odyssey"` as its hosted API, with B's API
key in `ODYSSEY_API_KEY`. Everything else is real: both relays in-process on loopback, A driven through
its normal host API (relay.client), A's broadcast watched over WHEP with aiortc.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json

import aiohttp
import av
import numpy as np
import pytest

from relay.api.app import WORLD_MODEL
from relay.client import RelayAPIError, RelayClient, Spectator
from relay.errors import RelayError
from relay.odyssey.server import TWIN
from relay.connection import ConnectionState
from relay.web import RECORDINGS
from relay.worldmodel.hosted import HostedWorldModel
from tests.conftest import API_KEY, OTHER_KEY, Relay, eventually, frames_for, mean_rgb

LONG = {"stream_max_seconds": 30, "idle_timeout_seconds": 30}


async def start_pair(relay_factory, tmp_path, monkeypatch, *, upstream_key: str = API_KEY,
                     b_limits: dict | None = None, a_limits: dict | None = None,
                     a_simulations: dict | None = None) -> tuple[Relay, Relay]:
    """Relay B (the hosted API's stand-in) and relay A, whose source is B's /odyssey."""
    b = await relay_factory(server={"data_dir": str(tmp_path / "b")}, limits={**LONG, **(b_limits or {})})
    monkeypatch.setenv("ODYSSEY_API_KEY", upstream_key)
    a = await relay_factory(server={"data_dir": str(tmp_path / "a")}, limits={**LONG, **(a_limits or {})},
                            world_model={"kind": "hosted", "url": b.url + "/odyssey"},
                            simulations=a_simulations or {})
    assert isinstance(a.app[WORLD_MODEL], HostedWorldModel)
    return a, b


def hosted_tasks() -> list[asyncio.Task]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("hosted-")]


async def next_event(ws: aiohttp.ClientWebSocketResponse, kind: str, timeout: float = 10.0) -> dict:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        event = await ws.receive_json(timeout=max(0.01, deadline - loop.time()))
        if event["type"] == kind:
            return event


async def test_relay_a_broadcasts_relay_b_world(relay_factory, tmp_path, monkeypatch):
    a, b = await start_pair(relay_factory, tmp_path, monkeypatch)
    model: HostedWorldModel = a.app[WORLD_MODEL]
    async with RelayClient(a.url, API_KEY) as client:
        async with client.connect() as conn:
            # Opening a connection on A opened one session on B (a B connection, its streamer held).
            (b_conn,) = b.sessions.connections.values()
            (streamer,) = model.streamers
            assert streamer.session_id == b_conn.connection_id and b_conn.control_sockets == 1

            started = await conn.start_stream("a calm ocean at sunset")
            b_stream = b_conn.stream
            assert b_stream is not None and b_stream.live and b_stream.prompt == "a calm ocean at sunset"
            assert [s.stream_id for s in b.sessions.live_streams(API_KEY)] == [b_stream.stream_id]  # one stream on B

            b_info = conn.broadcast
            async with Spectator(b_info["whep_url"], b_info["spectator_token"]) as viewer:
                await asyncio.wait_for(viewer.track.recv(), 10)
                frames = await frames_for(viewer.track, 1.0)
                assert len(frames) >= 15, len(frames)  # B's world, re-encoded by A, at >= 15 fps
                assert (frames[-1].width, frames[-1].height) == (320, 176)
                before = mean_rgb(frames[-1])
                drift = np.abs(mean_rgb(frames[0]) - before).sum()

                acknowledged = await conn.interact("neon night over a lava desert")
                assert acknowledged == "neon night over a lava desert"
                assert b_stream.last_applied_prompt == "neon night over a lava desert"  # reached B's model
                assert a.sessions.stream(started["stream_id"]).last_applied_prompt == acknowledged
                changed = 0.0
                for _ in range(100):  # ... and A's spectators see the picture change
                    changed = np.abs(mean_rgb(await asyncio.wait_for(viewer.track.recv(), 5)) - before).sum()
                    if changed > max(30.0, 4 * drift):
                        break
                assert changed > max(30.0, 4 * drift), (changed, drift)

            ended = await conn.end_stream()
            assert ended["end_reason"] == "ended"
            assert not b_stream.live and b_stream.end_reason == "ended"  # ended on B before A answered
            assert b.sessions.live_streams(API_KEY) == []

            # The next stream runs on the same B session; with an image, the start goes over the socket.
            session = streamer._session
            await conn.start_stream("snowy mountains", portrait=True, image="data:image/png;base64,iVBORw0KGgo=")
            assert b_conn.stream is not b_stream and b_conn.stream.live and b_conn.stream.portrait
            assert list(b.sessions.connections) == [b_conn.connection_id] and streamer._session is session
            second = b_conn.stream
        # Leaving the block disconnects A's connection: B's session closes and its streamer is free.
        await eventually(lambda: b.sessions.connections == {})
        # A's core ended the stream first (interactive_stream_end), then the session went.
        assert second.end_reason == "ended" and b_conn.close_reason == "disconnected"
    assert b.sessions.streamers_free == 4 and a.sessions.streamers_free == 4
    await eventually(lambda: model._background == set() and b.app[TWIN].live == {})
    assert a.sessions.connections == {} and model.streamers == set()
    # Nothing of the hosted session outlives it: its tasks, its peer connection, its socket.
    assert hosted_tasks() == [] and session.pc.connectionState == "closed" and session.ws.closed


async def test_upstream_ends_and_failures_end_the_stream_with_upstream_error(relay_factory, tmp_path, monkeypatch):
    a, b = await start_pair(relay_factory, tmp_path, monkeypatch, b_limits={"stream_max_seconds": 1.5})
    model: HostedWorldModel = a.app[WORLD_MODEL]
    async with RelayClient(a.url, API_KEY) as client:
        conn_info = await client.request("POST", "/v1/connections")
        control = await client.http.ws_connect(conn_info["control_url"] + f"?token={conn_info['client_token']}")
        try:
            await next_event(control, "connected")
            (b_conn,) = b.sessions.connections.values()

            # B's stream reaches B's stream_max_seconds: A's stream ends with upstream_error, on A's control socket.
            await control.send_json({"type": "start_stream", "prompt": "a green forest"})
            first = await next_event(control, "stream_started")
            ended = await next_event(control, "stream_ended", timeout=8)
            assert ended == {"type": "stream_ended", "stream_id": first["stream_id"], "reason": "upstream_error"}
            assert a.sessions.stream(first["stream_id"]).end_reason == "upstream_error"
            assert b_conn.stream.end_reason == "duration_limit"

            # The session itself is fine: the next stream runs on it.
            await control.send_json({"type": "start_stream", "prompt": "a desert at noon"})
            second = await next_event(control, "stream_started")
            assert list(b.sessions.connections) == [b_conn.connection_id] and b_conn.stream.live

            # B shuts the session (as at its connection_max_seconds): A's stream ends with upstream_error ...
            await b.sessions.close_connection(b_conn, "expired")
            ended = await next_event(control, "stream_ended", timeout=8)
            assert ended["stream_id"] == second["stream_id"] and ended["reason"] == "upstream_error"
            await eventually(lambda: model._background == set())
            assert a.sessions.connection(conn_info["connection_id"]).status == "connected"  # A's connection stays

            # ... and A's next start requests a new B session (as the SDK does after an error).
            await control.send_json({"type": "start_stream", "prompt": "snowy mountains at night"})
            third = await next_event(control, "stream_started")
            (b_conn2,) = b.sessions.connections.values()
            assert b_conn2 is not b_conn and b_conn2.stream.live
            assert a.sessions.stream(third["stream_id"]).live
        finally:
            await control.close()
            await client.request("DELETE", f"/v1/connections/{conn_info['connection_id']}")
    await eventually(lambda: b.sessions.connections == {} and model._background == set())
    assert model.streamers == set() and hosted_tasks() == []


async def test_killing_the_upstream_ends_the_stream_and_a_keeps_serving(relay_factory, tmp_path, monkeypatch):
    a, b = await start_pair(relay_factory, tmp_path, monkeypatch)
    model: HostedWorldModel = a.app[WORLD_MODEL]
    async with RelayClient(a.url, API_KEY) as client:
        async with client.connect() as conn:
            started = await conn.start_stream("a calm ocean")
            info = conn.broadcast
            async with Spectator(info["whep_url"], info["spectator_token"]) as viewer:
                await asyncio.wait_for(viewer.track.recv(), 10)
                await b.server.close()  # the upstream vanishes
                a_conn = a.sessions.connection(conn.connection_id)
                await eventually(lambda: not a.sessions.stream(started["stream_id"]).live and a_conn.state is ConnectionState.CONNECTED)
                assert a.sessions.stream(started["stream_id"]).end_reason == "upstream_error"
                await eventually(lambda: model._background == set())
                # A keeps serving: the connection, its broadcast and its spectator are all still there.
                state = await conn.state()
                assert state["status"] == "connected" and state["stream"] is None
                assert viewer.pc.connectionState == "connected"
                async with client.http.get(a.url + "/healthz") as r:
                    assert r.status == 200
                # A start now cannot reach the upstream: a clear 502, and the connection survives it.
                with pytest.raises(RelayAPIError) as caught:
                    await conn.start_stream("again")
                assert caught.value.status == 502 and caught.value.code == "UPSTREAM_ERROR"
                assert "hosted world model" in caught.value.message.lower()
    await eventually(lambda: model._background == set())
    assert a.sessions.connections == {} and model.streamers == set() and hosted_tasks() == []


async def test_shutting_a_down_releases_its_hosted_sessions(relay_factory, tmp_path, monkeypatch):
    a, b = await start_pair(relay_factory, tmp_path, monkeypatch)
    model: HostedWorldModel = a.app[WORLD_MODEL]
    async with RelayClient(a.url, API_KEY) as client:
        conn = await client.request("POST", "/v1/connections")
        await client.request("POST", f"/v1/connections/{conn['connection_id']}/streams", json={"prompt": "forest"})
        (b_conn,) = b.sessions.connections.values()
        loop = asyncio.get_running_loop()
        began = loop.time()
        await a.server.close()  # A's shutdown: its connections close, then the world model
        assert loop.time() - began < 5
    assert b_conn.stream.end_reason == "ended" and b_conn.closed
    await eventually(lambda: b.sessions.connections == {} and b.app[TWIN].live == {})
    assert model.closed and model.streamers == set() and model._background == set() and hosted_tasks() == []


async def test_a_silent_upstream_times_out_cleanly(relay_factory, tmp_path, monkeypatch):
    a, b = await start_pair(relay_factory, tmp_path, monkeypatch)
    model: HostedWorldModel = a.app[WORLD_MODEL]
    patient, impatient = model.timeouts, dataclasses.replace(model.timeouts, command=0.5)
    gates: list[asyncio.Event] = []  # all opened at the end, pass or fail: a held call must not hold the teardown

    def hold(name: str) -> asyncio.Event:
        """B's core holds this call until the returned gate opens: an upstream that is late."""
        method, gate = getattr(b.sessions, name), asyncio.Event()
        gates.append(gate)

        async def held(*args, **kwargs):
            await gate.wait()
            return await method(*args, **kwargs)
        setattr(b.sessions, name, held)
        return gate

    try:
        await _late_upstream(a, b, model, hold, patient, impatient)
    finally:
        for gate in gates:
            gate.set()
    await eventually(lambda: b.sessions.connections == {} and model._background == set())
    assert model.streamers == set() and hosted_tasks() == []


async def _late_upstream(a, b, model, hold, patient, impatient) -> None:
    async with RelayClient(a.url, API_KEY) as client:
        async with client.connect() as conn:
            (b_conn,) = b.sessions.connections.values()
            # A start the upstream does not confirm in time: 502, and the session is given up (whatever
            # it may start late cannot outlive it); the next start gets a new session.
            gate = hold("start_stream")
            model.timeouts = impatient
            with pytest.raises(RelayAPIError) as caught:
                await conn.start_stream("a green forest")
            assert caught.value.status == 502 and "did not answer interactive_stream_start" in caught.value.message
            await eventually(lambda: b_conn.closed)
            gate.set()  # the late start now reaches a session that is already gone
            del b.sessions.start_stream
            model.timeouts = patient
            await conn.start_stream("a green forest")
            (b_conn2,) = b.sessions.connections.values()
            assert b_conn2 is not b_conn and b_conn2.stream.live

            # An update acknowledged late: 502, the stream goes on, and the late acknowledgement does not
            # answer the next update.
            gate = hold("interact")
            model.timeouts = impatient
            with pytest.raises(RelayAPIError) as caught:
                await conn.interact("night falls")
            assert caught.value.status == 502 and "did not answer update" in caught.value.message
            gate.set()  # the late update is applied upstream; its acknowledgement arrives late
            await eventually(lambda: b_conn2.stream.last_applied_prompt == "night falls")
            del b.sessions.interact
            model.timeouts = patient
            assert await conn.interact("snow begins to fall") == "snow begins to fall"
            assert b_conn2.stream.last_applied_prompt == "snow begins to fall"
            assert (await conn.state())["stream"]["status"] == "live"


async def test_a_wrong_upstream_key_fails_the_open_clearly_and_holds_nothing(relay_factory, tmp_path, monkeypatch):
    a, b = await start_pair(relay_factory, tmp_path, monkeypatch, upstream_key="not-a-key")
    model: HostedWorldModel = a.app[WORLD_MODEL]
    async with RelayClient(a.url, API_KEY) as client:
        with pytest.raises(RelayAPIError) as caught:
            await client.request("POST", "/v1/connections")
    assert caught.value.status == 502 and caught.value.code == "UPSTREAM_ERROR"
    assert "Invalid API key" in caught.value.message and "ODYSSEY_API_KEY" in caught.value.message
    assert caught.value.details == {"upstream_status": 401}
    assert a.sessions.connections == {} and a.sessions.streamers_free == 4
    assert b.sessions.connections == {} and b.sessions.streamers_free == 4
    assert model.streamers == set() and model._background == set() and hosted_tasks() == []


async def test_the_upstream_concurrent_limit_reaches_the_host(relay_factory, tmp_path, monkeypatch):
    a, b = await start_pair(relay_factory, tmp_path, monkeypatch, b_limits={"concurrent_streams": 1})
    model: HostedWorldModel = a.app[WORLD_MODEL]
    async with RelayClient(a.url, API_KEY) as client:
        async with client.connect() as first, client.connect() as second:
            assert len(b.sessions.connections) == 2
            await first.start_stream("a green forest")

            # A start over B's limit: B's stream error, as A's 429 with the hosted code and message.
            with pytest.raises(RelayAPIError) as caught:
                await second.start_stream("a desert")
            assert caught.value.status == 429 and caught.value.code == "CONCURRENT_LIMIT_REACHED"
            assert caught.value.message.startswith("Hosted world model: ") and "limit 1" in caught.value.message

            # ... and on the control socket, as an `error` event.
            control = await client.http.ws_connect(second.info["control_url"] + f"?token={second.info['client_token']}")
            try:
                await next_event(control, "connected")
                await control.send_json({"type": "start_stream", "prompt": "a desert"})
                error = await next_event(control, "error")
                assert error["code"] == "CONCURRENT_LIMIT_REACHED" and "limit 1" in error["message"]
            finally:
                await control.close()
            assert second.stream_id is None and a.sessions.connection(second.connection_id).stream is None

            # A new connection at B's limit: B's 429 usage error on /sessions/request, as A's 429.
            async with client.http.post(a.url + "/v1/connections", headers={"Authorization": f"Bearer {API_KEY}"}) as r:
                body = await r.json()
                assert r.status == 429 and "Retry-After" in r.headers
            assert body["error"]["code"] == "CONCURRENT_LIMIT_REACHED"
            assert body["error"]["details"] == {"active_count": 1, "limit": 1}
            assert body["error"]["message"].startswith("Hosted world model: ") and body["error"]["action"]
            assert len(a.sessions.connections) == 2 and len(b.sessions.connections) == 2  # nothing held for it
    await eventually(lambda: b.sessions.connections == {} and model._background == set())
    assert a.sessions.connections == {} and model.streamers == set() and hosted_tasks() == []


async def test_no_free_upstream_streamer_is_polled_then_503(relay_factory, tmp_path, monkeypatch):
    a, b = await start_pair(relay_factory, tmp_path, monkeypatch, b_limits={"streamers": 1})
    model: HostedWorldModel = a.app[WORLD_MODEL]
    async with RelayClient(a.url, API_KEY) as client:
        first = await client.request("POST", "/v1/connections")  # holds B's only streamer

        # B answers 503 while none is free: A polls (as the SDK's queue), then gives up with its own 503.
        model.timeouts = dataclasses.replace(model.timeouts, queue=1.5)
        async with client.http.post(a.url + "/v1/connections", headers={"Authorization": f"Bearer {API_KEY}"}) as r:
            body = await r.json()
            assert r.status == 503 and "Retry-After" in r.headers
        assert body["error"]["code"] == "STREAMER_NOT_AVAILABLE" and "hosted" in body["error"]["message"]
        assert list(a.sessions.connections) == [first["connection_id"]] and len(b.sessions.connections) == 1

        # A streamer freed while A polls: the next poll gets it.
        model.timeouts = dataclasses.replace(model.timeouts, queue=10)
        refused = 0
        open_on_b = b.sessions.open_connection

        async def counted(*args, **kwargs):
            nonlocal refused
            try:
                return await open_on_b(*args, **kwargs)
            except RelayError:
                refused += 1
                raise
        b.sessions.open_connection = counted
        opening = asyncio.create_task(client.request("POST", "/v1/connections"))
        await eventually(lambda: refused >= 2, what="A polling B's full pool")  # A keeps asking
        assert not opening.done()
        await client.request("DELETE", f"/v1/connections/{first['connection_id']}")
        second = await asyncio.wait_for(opening, 8)
        del b.sessions.open_connection
        assert list(a.sessions.connections) == [second["connection_id"]] and len(b.sessions.connections) == 1
        await client.request("DELETE", f"/v1/connections/{second['connection_id']}")
    await eventually(lambda: b.sessions.connections == {} and model._background == set())
    assert model.streamers == set() and hosted_tasks() == []


async def test_a_simulation_on_a_hosted_relay_is_rendered_by_the_hosted_model(relay_factory, tmp_path, monkeypatch):
    # A's simulation goes to B's /simulation-jobs; B renders it, A imports B's video (copied, not
    # re-encoded) as A's own recording. Nothing of A's synthetic model is involved.
    a, b = await start_pair(relay_factory, tmp_path, monkeypatch)
    script = [{"timestamp_ms": 0, "start": {"prompt": "a calm ocean at sunset"}},
              {"timestamp_ms": 1000, "interact": {"prompt": "night falls over the sea"}},
              {"timestamp_ms": 2000, "end": {}}]
    async with RelayClient(a.url, API_KEY) as client_a, RelayClient(b.url, API_KEY) as client_b:
        accepted = await client_a.simulate(script)

        async def finished() -> dict | None:
            job = await client_a.get_simulation(accepted["job_id"])
            return job if job["status"] in ("completed", "failed") else None
        await eventually(finished, timeout=60, what="A's simulation finished")
        job = await client_a.get_simulation(accepted["job_id"])
        assert job["status"] == "completed", job
        (rec,) = job["streams"]

        # B ran exactly one simulation, of that script; its video is what A recorded.
        b_jobs = (await client_b.list_simulations())["jobs"]
        assert len(b_jobs) == 1 and b_jobs[0]["status"] == "completed"
        (b_rec,) = (await client_b.get_simulation(b_jobs[0]["job_id"]))["streams"]
        assert rec["stream_id"] != b_rec["stream_id"] and rec["frame_count"] == b_rec["frame_count"] == 50
        meta = a.app[RECORDINGS].get(rec["stream_id"])
        assert (meta["world_model"], meta["upstream_stream_id"]) == ("hosted", b_rec["stream_id"])

        async with aiohttp.ClientSession() as http:
            async with http.get(rec["video_url"]) as r:
                (tmp_path / "a.mp4").write_bytes(await r.read())
            async with http.get(b_rec["video_url"]) as r:
                (tmp_path / "b.mp4").write_bytes(await r.read())
            async with http.get(rec["events_url"]) as r:
                events = [json.loads(line) for line in (await r.text()).splitlines()]
        packets = []
        for name in ("a.mp4", "b.mp4"):
            with av.open(str(tmp_path / name)) as container:
                stream = container.streams.video[0]
                assert stream.codec_context.name == "h264"
                packets.append([bytes(p) for p in container.demux(stream) if p.size])
        assert packets[0] == packets[1]  # the same encoded pictures: a copy, no second encode
        assert [(e["type"], e.get("prompt"), e["offset_ms"]) for e in events] == [
            ("stream_started", "a calm ocean at sunset", 0),
            ("prompt_applied", "night falls over the sea", 1000),
            ("stream_ended", None, 2000)]


async def test_a_hosted_simulation_the_upstream_refuses_fails_with_its_reason(relay_factory, tmp_path, monkeypatch):
    a, b = await start_pair(relay_factory, tmp_path, monkeypatch, upstream_key="not-a-key-of-b",
                            a_simulations={"max_retries": 0})
    async with RelayClient(a.url, API_KEY) as client:
        accepted = await client.simulate([{"timestamp_ms": 0, "start": {"prompt": "a quiet field"}},
                                          {"timestamp_ms": 1000, "end": {}}])

        async def failed() -> bool:
            return (await client.get_simulation(accepted["job_id"]))["status"] in ("failed", "completed")
        await eventually(failed, timeout=30, what="A's simulation settled")
        job = await client.get_simulation(accepted["job_id"])
    assert job["status"] == "failed" and job["streams"] == []
    assert "refused the relay's API key" in job["error_message"], job["error_message"]
    assert a.app[RECORDINGS].list(None)[1] == 0  # nothing half-made is left listed


async def test_a_hosted_relay_needs_its_key_variable_and_an_http_url(tmp_path, monkeypatch):
    """Without the variable, a hosted relay does not start, and the message names the variable."""
    from relay.api.app import create_app
    from relay.config import ConfigError, load_config
    from tests.conftest import make_settings

    monkeypatch.delenv("ODYSSEY_API_KEY", raising=False)
    with pytest.raises(ConfigError, match=r"^world_model\.api_key_env: the environment variable ODYSSEY_API_KEY"):
        load_config(overrides={"world_model": {"kind": "hosted"}})
    with pytest.raises(ConfigError, match="MY_HOSTED_KEY"):
        create_app(make_settings(tmp_path, world_model={"kind": "hosted", "api_key_env": "MY_HOSTED_KEY"}))
    with pytest.raises(ConfigError, match=r"^world_model\.url: expected an http:// or https:// URL"):
        load_config(overrides={"world_model": {"kind": "hosted", "url": "api.odyssey.ml"}},
                    environ={"ODYSSEY_API_KEY": OTHER_KEY})
    settings = load_config(overrides={"world_model": {"kind": "hosted", "url": "http://127.0.0.1:9/odyssey/"}},
                           environ={"ODYSSEY_API_KEY": OTHER_KEY})
    assert settings.world_model.url == "http://127.0.0.1:9/odyssey"  # the SDK concatenates: no trailing slash


def test_the_hosted_shapes():
    """What the client reads from the hosted API, beyond what the twin sends."""
    from multidict import CIMultiDict

    from relay.worldmodel.hosted import socket_url, stream_error, usage_error

    # The SDK's normalizeUrl: http(s) -> ws(s), a bare host -> ws://, the token encoded.
    assert socket_url("https://signalling-x.odyssey.ml/", "s1", "a+b") == \
        "wss://signalling-x.odyssey.ml/client/s1?token=a%2Bb"
    assert socket_url("http://127.0.0.1:8080/odyssey/signalling", "s", "t") == \
        "ws://127.0.0.1:8080/odyssey/signalling/client/s?token=t"
    assert socket_url("wss://w.example/x", "s", "t") == "wss://w.example/x/client/s?token=t"
    assert socket_url("w.example", "s", "t") == "ws://w.example/client/s?token=t"

    # A 429 usage error, with the broker's `error` key, keeps code, message, action, details and its wait.
    err = usage_error({"detail": {"error": "MONTHLY_LIMIT_REACHED", "message": "Monthly limit reached.",
                                  "action": "Upgrade.", "details": {"used_hours": 10, "limit_hours": 10}}},
                      CIMultiDict({"Retry-After": "30"}))
    assert (err.code, err.status, err.message, err.action) == \
        ("MONTHLY_LIMIT_REACHED", 429, "Hosted world model: Monthly limit reached.", "Upgrade.")
    assert err.details == {"used_hours": 10, "limit_hours": 10} and err.headers() == {"Retry-After": "30"}
    err = usage_error({"detail": {"code": "RATE_LIMITED", "message": "Slow down.", "action": "Wait.",
                                  "details": {"retry_after_seconds": 7}}}, CIMultiDict())
    assert err.code == "RATE_LIMITED" and err.retry_after == 7
    err = usage_error({"detail": "Too many requests"}, CIMultiDict())  # no usage shape: the string, as the SDK
    assert (err.code, err.status, err.message) == ("RATE_LIMITED", 429, "Hosted world model: Too many requests")

    # interactive_stream_error: known reasons keep their code and status; others are the upstream's 502.
    err = stream_error({"type": "interactive_stream_error", "reason": "concurrent_limit_reached", "message": "Full."})
    assert (err.code, err.status, err.message) == ("CONCURRENT_LIMIT_REACHED", 429, "Hosted world model: Full.")
    err = stream_error({"type": "interactive_stream_error", "reason": "moderation", "message": "Not allowed."})
    assert (err.code, err.status, err.details) == ("UPSTREAM_ERROR", 502, {"upstream_reason": "moderation"})
    assert stream_error({}).message == "Hosted world model: Stream error occurred"  # the SDK's defaults


async def test_polling_a_hosted_simulation_waits_out_hiccups_and_stops_on_a_4xx(aiohttp_server):
    # A stand-in for the hosted service's job endpoint (the twin never hiccups): 503, a dropped
    # connection, then the job's end; and a job it does not know.
    from aiohttp import web

    from relay.worldmodel.hosted import HostedClient, HostedTimeouts

    answers = {"j1": [503, "drop", 200]}
    deleted = []

    async def token(request):
        return web.json_response({"access_token": "t", "expires_in": 3600})

    async def job(request):
        job_id = request.match_info["job_id"]
        if request.method == "DELETE":
            deleted.append(job_id)
            return web.json_response({"job_id": job_id, "status": "cancelled"})
        if job_id not in answers:
            return web.json_response({"detail": "Simulation job not found"}, status=404)
        answer = answers[job_id].pop(0)
        if answer == "drop":
            request.transport.close()
            return web.Response()
        if answer != 200:
            return web.json_response({"detail": "busy"}, status=answer)
        return web.json_response({"job_id": job_id, "status": "completed", "streams": []})

    app = web.Application()
    app.router.add_post("/auth/token", token)
    app.router.add_route("*", "/simulation-jobs/{job_id}", job)
    server = await aiohttp_server(app)
    client = HostedClient(str(server.make_url("")).rstrip("/"), "key",
                          timeouts=HostedTimeouts(simulation_poll=0.01, simulation=5))
    try:
        assert (await client.finished_simulation("j1"))["status"] == "completed"
        assert answers["j1"] == []  # it read through the 503 and the dropped connection
        with pytest.raises(RelayError) as err:
            await client.finished_simulation("gone")
        assert "lost simulation gone: 404" in err.value.message
        await client.cancel_simulation("j2")
        assert deleted == ["j2"]
    finally:
        await client.close()


async def test_a_hosted_simulation_whose_worker_dies_waits_for_the_same_upstream_job(relay_factory, tmp_path,
                                                                                   monkeypatch):
    # A's worker submits to B, then dies (the OOM killer, a restart). The retry must wait for the
    # job B already has, not pay for a second one.
    import os
    import signal

    from relay.web import SIMULATIONS

    a, b = await start_pair(relay_factory, tmp_path, monkeypatch, a_simulations={"poll_interval_seconds": 0.05})
    script = [{"timestamp_ms": 0, "start": {"prompt": "a quiet harbour"}}, {"timestamp_ms": 2000, "end": {}}]
    async with RelayClient(a.url, API_KEY) as client_a, RelayClient(b.url, API_KEY) as client_b:
        # B's one worker is busy with a longer job first, so A's waits upstream for a while.
        blocker = await client_b.simulate([{"timestamp_ms": 0, "start": {"prompt": "a long desert road"}},
                                           {"timestamp_ms": 90_000, "end": {}}])
        job_id = (await client_a.simulate(script))["job_id"]
        store = a.app[SIMULATIONS].store
        await eventually(lambda: store.upstream_job(job_id) is not None, timeout=20, what="A's job submitted to B")
        upstream = store.upstream_job(job_id)
        assert (await client_b.get_simulation(upstream))["status"] in ("pending", "dispatched")
        (worker,) = a.app[SIMULATIONS]._pool._processes.values()
        os.kill(worker.pid, signal.SIGKILL)

        async def settled() -> bool:
            return (await client_a.get_simulation(job_id))["status"] in ("completed", "failed")
        await eventually(settled, timeout=60, what="A's job settled")
        job = await client_a.get_simulation(job_id)
        assert job["status"] == "completed" and job["retry_count"] == 1, job
        b_jobs = (await client_b.list_simulations())["jobs"]
        assert sorted(j["job_id"] for j in b_jobs) == sorted([blocker["job_id"], upstream])  # no second job
        assert a.app[RECORDINGS].get(job["streams"][0]["stream_id"])["upstream_job_id"] == upstream
