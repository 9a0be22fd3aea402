"""End to end on loopback: a host streams, real aiortc spectators watch over WHEP."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from relay.client import RelayClient, Spectator
from relay.connection import ConnectionState
from tests.conftest import API_KEY, eventually, frames_for, mean_rgb


async def test_three_spectators_watch_prompts_and_consecutive_streams(relay_factory):
    relay = await relay_factory(limits={"stream_max_seconds": 4, "streamers": 1})
    async with RelayClient(relay.url, API_KEY) as client, client.connect() as conn:
        started = await conn.start_stream("a calm ocean at sunset")
        assert started["max_duration_seconds"] == 4
        first_stream = started["stream_id"]
        b = conn.broadcast
        viewers = [Spectator(b["whep_url"], b["spectator_token"]) for _ in range(3)]
        for v in viewers:
            await v.join()
        try:
            # Every spectator gets the promised rate (25 fps; >= 20 allows for loopback jitter),
            # measured from its first decoded frame so joining is not counted against it.
            await asyncio.gather(*(v.track.recv() for v in viewers))
            counts = await asyncio.gather(*(frames_for(v.track, 1.5) for v in viewers))
            for frames in counts:
                assert len(frames) / 1.5 >= 20, f"only {len(frames)} frames in 1.5 s"
                assert (frames[-1].width, frames[-1].height) == (320, 176)

            # A prompt changes the decoded picture, far beyond its natural motion.
            before = mean_rgb(counts[0][-1])
            drift = np.abs(mean_rgb(counts[0][0]) - before).sum()
            assert await conn.interact("neon night over a lava desert") == "neon night over a lava desert"
            changed = 0.0
            for _ in range(75):  # up to 3 s of frames for the ~1 s transition
                changed = np.abs(mean_rgb(await viewers[0].track.recv()) - before).sum()
                if changed > max(30.0, 4 * drift):
                    break
            assert changed > max(30.0, 4 * drift), (changed, drift)
            state = await client.get_stream(first_stream)
            assert state["last_applied_prompt"] == "neon night over a lava desert"
            assert state["spectators"] == 3

            # The stream ends itself at the configured cap.
            await eventually(lambda: not relay.sessions.stream(first_stream).live, timeout=6, what="the stream's end")
            state = await client.get_stream(first_stream)
            assert state["status"] == "ended" and state["end_reason"] == "duration_limit"

            # The next stream reaches the same spectators, same peer connections, no rejoin. (A stream reads
            # ended as soon as it stops; its connection takes another once the world model has let it go.)
            connection = relay.sessions.connections[conn.connection_id]
            await eventually(lambda: connection.state is ConnectionState.CONNECTED, timeout=5,
                             what="the connection ready for the next stream")
            pcs = [v.pc for v in viewers]
            second = await conn.start_stream("snowy mountains at dawn")
            assert second["stream_id"] != first_stream
            counts = await asyncio.gather(*(frames_for(v.track, 1.0) for v in viewers))
            for v, pc, frames in zip(viewers, pcs, counts):
                assert v.pc is pc and pc.connectionState == "connected"
                assert len(frames) >= 15
        finally:
            for v in viewers:
                await v.leave()
        assert relay.sessions.streamers_free == 0
    # Disconnect (leaving the context) frees the streamer at once.
    assert relay.sessions.streamers_free == 1
    assert relay.sessions.connections == {}


async def test_spectator_leave_is_immediate(relay):
    async with RelayClient(relay.url, API_KEY) as client, client.connect() as conn:
        await conn.start_stream("forest")
        broadcast = relay.sessions.broadcast(conn.broadcast["broadcast_id"])
        async with Spectator(conn.broadcast["whep_url"], conn.broadcast["spectator_token"]) as viewer:
            await viewer.track.recv()
            assert len(broadcast.spectators) == 1
            assert broadcast.media.fanout.outputs == 1  # the default path: packetized once, sent by the fan-out
            assert broadcast.spectators[next(iter(broadcast.spectators))].output.packets_sent > 0
        assert len(broadcast.spectators) == 0
        assert broadcast.media.hub.subscribers == 0 and broadcast.media.fanout.outputs == 0


@pytest.mark.parametrize("mode,send_loop", [("encode-once", "auto"), ("encode-once", "python"),
                                            ("encode-once-sender", "auto"), ("per-spectator", "auto")])
async def test_every_media_mode_delivers_across_streams(relay_factory, mode, send_loop):
    # encode-once with "auto" sends through the compiled loop where it was built; "python" never.
    relay = await relay_factory(media={"mode": mode, "send_loop": send_loop}, limits={"stream_max_seconds": 30})
    async with RelayClient(relay.url, API_KEY) as client, client.connect() as conn:
        await conn.start_stream("a green forest")
        b = conn.broadcast
        async with Spectator(b["whep_url"], b["spectator_token"]) as viewer:
            frames = await frames_for(viewer.track, 1.0)
            assert len(frames) >= 18, f"{mode}: {len(frames)} frames in 1 s"
            await conn.end_stream()
            await conn.start_stream("a red desert")
            frames = await frames_for(viewer.track, 1.5)
            assert len(frames) >= 18, f"{mode}: {len(frames)} frames after the next stream began"


async def test_consecutive_streams_and_a_vanished_host_leave_nothing_running(relay_factory):
    """Encoder, render and recorder threads, pipeline tasks, peer connections: all owned and closed."""
    import gc
    import threading
    import weakref

    from aiortc import RTCPeerConnection

    relay = await relay_factory(limits={"stream_max_seconds": 30, "idle_timeout_seconds": 1})
    threads, tasks = threading.active_count(), len(asyncio.all_tasks())
    client = RelayClient(relay.url, API_KEY)
    conn_info = await client.request("POST", "/v1/connections")
    conn_id = conn_info["connection_id"]
    b = conn_info["broadcast"]
    # The relay's own peer connection is watched by weak reference; the viewer's is aiortc's
    # client, which only has to end up closed (see test_whep's join/leave cycles).
    server_pcs: weakref.WeakSet[RTCPeerConnection] = weakref.WeakSet()
    async with Spectator(b["whep_url"], b["spectator_token"]) as viewer:
        client_pc = viewer.pc
        for i in range(4):
            started = await client.request("POST", f"/v1/connections/{conn_id}/streams", json={"prompt": f"scene {i}"})
            await asyncio.wait_for(viewer.track.recv(), 10)
            await client.request("DELETE", f"/v1/streams/{started['stream_id']}")
        await client.request("POST", f"/v1/connections/{conn_id}/streams", json={"prompt": "left running"})
        await asyncio.wait_for(viewer.track.recv(), 10)
        server_pcs.update(s.pc for s in relay.sessions.broadcast(b["broadcast_id"]).spectators.values())
        assert len(server_pcs) == 1
        # The host vanishes without ending the stream or disconnecting: the reaper cleans up.
        await eventually(lambda: conn_id not in relay.sessions.connections, timeout=10, what="the idle reaper")
    await client.close()
    assert client_pc.connectionState == "closed"
    del client_pc

    def leftovers() -> dict:
        gc.collect()
        return {"threads": [t.name for t in threading.enumerate()][threads:],
                "tasks": max(0, len(asyncio.all_tasks()) - tasks),
                "peer connections": len(server_pcs)}

    nothing = {"threads": [], "tasks": 0, "peer connections": 0}
    try:
        await eventually(lambda: leftovers() == nothing, timeout=10)
    except AssertionError:
        raise AssertionError(f"left behind: {leftovers()}") from None
    assert relay.sessions.streamers_free == 4
