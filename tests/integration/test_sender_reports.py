"""A fan-out spectator's RTCP sender reports: the relay's send loop writes them with the media (aiortc's
per-peer RTCP task only says BYE), so a real receiver must still get them about once a second, with
the counters of what it was sent, and answer them so that the relay can measure the round trip."""

from __future__ import annotations

import asyncio

import pytest

from relay.client import RelayClient, Spectator
from tests.conftest import API_KEY, eventually


async def stats_of(pc, kind: str) -> list:
    return [s for s in (await pc.getStats()).values() if s.type == kind]


@pytest.mark.parametrize("send_loop", ["auto", "python"])  # the compiled loop where built, and the fallback
async def test_a_spectator_gets_sender_reports_of_what_it_was_sent_and_the_relay_measures_the_round_trip(
        relay_factory, send_loop):
    relay = await relay_factory(media={"send_loop": send_loop}, limits={"stream_max_seconds": 60})
    async with RelayClient(relay.url, API_KEY) as client, client.connect() as conn:
        await conn.start_stream("a calm ocean")
        b = conn.broadcast
        broadcast = relay.sessions.broadcast(b["broadcast_id"])
        async with Spectator(b["whep_url"], b["spectator_token"], audio=False) as viewer:
            await viewer.track.recv()
            reading = asyncio.create_task(drain(viewer))
            try:
                spectator = next(iter(broadcast.spectators.values()))
                output = spectator.feed.output
                await eventually(lambda: stats_of(viewer.pc, "remote-outbound-rtp"), 5, "a first sender report")
                first = (await stats_of(viewer.pc, "remote-outbound-rtp"))[0]
                assert first.ssrc == output.ssrc and 0 < first.packetsSent <= output.packets_sent
                assert 0 < first.bytesSent <= output.bytes_sent

                async def a_later_report() -> bool:
                    report = (await stats_of(viewer.pc, "remote-outbound-rtp"))[0]
                    return report.packetsSent > first.packetsSent and report.remoteTimestamp > first.remoteTimestamp

                await eventually(a_later_report, 4, "the next sender report (0.5-1.5 s later) with larger counters")
                # The receiver's reports answer ours (LSR/DLSR): the relay's sender estimates the round trip.
                sender = spectator.pc.getSenders()[0]

                async def round_trip() -> bool:
                    remote = await stats_of(sender, "remote-inbound-rtp")
                    return bool(remote) and remote[0].roundTripTime is not None and remote[0].packetsLost == 0

                await eventually(round_trip, 5, "a round-trip time from the receiver's reports")
            finally:
                reading.cancel()
    # The spectator's peer connection closed cleanly: its sender's RTCP task ended (stop() waits for it).
    await eventually(lambda: spectator.pc.connectionState == "closed", 5, "the relay's side to close")


async def drain(viewer: Spectator) -> None:
    while True:
        await viewer.track.recv()
