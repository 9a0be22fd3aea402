"""The optional lower layer: a spectator moves between layers by its bandwidth estimate, on the
same peer connection, and a real receiver's REMB reaches the server."""

from __future__ import annotations

import asyncio
import threading
import time

from relay.client import RelayClient, Spectator
from relay.media import layers
from relay.media.layers import LOW, MAIN
from tests.conftest import API_KEY, eventually
from tests.integration.test_whip import SILENCE, Publisher


async def frames_until(viewer: Spectator, output, estimate: int, size: tuple[int, int], timeout: float) -> list:
    """Report `estimate` as the REMB hook would, a few times a second, until a decoded frame
    of `size` arrives; returns every frame received meanwhile."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    frames = []
    while loop.time() < deadline:
        output.update_estimate(estimate)
        try:
            frame = await asyncio.wait_for(viewer.track.recv(), 0.25)
        except asyncio.TimeoutError:
            continue
        frames.append(frame)
        if (frame.width, frame.height) == size:
            return frames
    raise AssertionError(f"no {size} frame within {timeout} s (got {frames[-1:] and (frames[-1].width, frames[-1].height)})")


async def test_a_weak_spectator_moves_to_the_low_layer_and_back_without_rejoining(relay_factory, monkeypatch):
    # The policy's waits shortened (tests/unit/test_layers.py holds their own lengths): this test is
    # about the switches on one peer connection, and waiting 2 s down plus 5 s up proves no more.
    monkeypatch.setattr(layers, "DOWN_AFTER", 1.0)
    monkeypatch.setattr(layers, "UP_AFTER", 2.0)
    relay = await relay_factory(media={"low_layer": True}, limits={"stream_max_seconds": 60})
    async with RelayClient(relay.url, API_KEY) as client, client.connect() as conn:
        await conn.start_stream("a calm ocean")
        b = conn.broadcast
        broadcast = relay.sessions.broadcast(b["broadcast_id"])
        async with Spectator(b["whep_url"], b["spectator_token"]) as viewer:
            # This test plays the receiver's estimator itself: silence the real one's REMBs.
            for receiver in viewer.pc.getReceivers():
                receiver._RTCRtpReceiver__remote_bitrate_estimator = None
            pc = viewer.pc
            first = await viewer.track.recv()
            assert (first.width, first.height) == (320, 176)
            output = next(iter(broadcast.spectators.values())).output
            await eventually(lambda: broadcast.media.fanout.bitrate and broadcast.media.low_fanout.bitrate, 5,
                             "both layers' measured rates")
            down = await frames_until(viewer, output, 1000, (160, 88), timeout=6)
            assert output.layer == LOW and broadcast.media.low_fanout.outputs == 1 and broadcast.media.fanout.outputs == 0
            up = await frames_until(viewer, output, 50_000_000, (320, 176), timeout=9)
            assert output.layer == MAIN and broadcast.media.fanout.outputs == 1
            assert viewer.pc is pc and len(broadcast.spectators) == 1  # the same peer connection
            # One clock across both layers: time only moves forward.
            pts = [f.pts for f in [first, *down, *up]]
            assert pts == sorted(pts) and len(set(pts)) == len(pts)
            assert output.policy.switches == 2
            # Sequence numbers stayed gapless across both switches: the receiver saw no loss.
            stats = await viewer.pc.getStats()
            inbound = [s for s in stats.values() if s.type == "inbound-rtp" and s.kind == "video"]
            assert inbound and inbound[0].packetsLost == 0
    # Both layers' encoder threads end with the stream.
    await eventually(lambda: not [t for t in threading.enumerate() if t.name.startswith("relay-encoder")], 5,
                     "the encoder threads to end")


async def test_a_real_receiver_sends_remb_when_the_layers_are_on(relay_factory):
    relay = await relay_factory(media={"low_layer": True}, limits={"stream_max_seconds": 60})
    async with RelayClient(relay.url, API_KEY) as client, client.connect() as conn:
        await conn.start_stream("a calm ocean")
        b = conn.broadcast
        broadcast = relay.sessions.broadcast(b["broadcast_id"])
        async with Spectator(b["whep_url"], b["spectator_token"]) as viewer:
            await viewer.track.recv()
            output = next(iter(broadcast.spectators.values())).output
            assert output._abs_send_time_word is not None  # negotiated, so written
            reading = asyncio.create_task(drain(viewer))
            try:
                await eventually(lambda: output.estimated_bitrate is not None, 10, "a REMB from the receiver")
            finally:
                reading.cancel()
            assert output.estimated_bitrate > 0


async def drain(viewer: Spectator) -> None:
    while True:
        await viewer.track.recv()


async def test_a_passed_through_whip_stream_keeps_every_spectator_on_the_main_layer(relay_factory, http, monkeypatch):
    monkeypatch.setattr(layers, "DOWN_AFTER", 1.0)  # the wait this test outlasts, shortened as above
    relay = await relay_factory(world_model={"kind": "whip", "publisher_silence_seconds": SILENCE},
                                media={"low_layer": True}, limits={"stream_max_seconds": 60})
    async with RelayClient(relay.url, API_KEY) as client, client.connect() as conn:
        publisher = Publisher(conn.info["whip_url"], conn.info["publish_token"])
        try:
            assert (await publisher.post(http)).status == 201
            await conn.start_stream("a publisher's own packets")
            broadcast = relay.sessions.broadcast(conn.broadcast["broadcast_id"])
            async with Spectator(conn.broadcast["whep_url"], conn.broadcast["spectator_token"]) as viewer:
                for receiver in viewer.pc.getReceivers():  # the test plays the receiver's estimator
                    receiver._RTCRtpReceiver__remote_bitrate_estimator = None
                await asyncio.wait_for(viewer.track.recv(), 10)
                output = next(iter(broadcast.spectators.values())).output
                await eventually(lambda: broadcast.media.fanout.bitrate, what="the main layer's measured rate")
                # A weak link's estimate, past the time that would move it down: there is no lower layer to go to.
                window = layers.DOWN_AFTER + 0.5
                deadline = time.monotonic() + window
                frames = 0
                while time.monotonic() < deadline:
                    output.update_estimate(1000)
                    await asyncio.wait_for(viewer.track.recv(), 2)
                    frames += 1
                assert output.layer == MAIN and broadcast.media.fanout.outputs == 1 and frames >= 16 * window
        finally:
            await publisher.close()
