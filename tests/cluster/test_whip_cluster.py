"""WHIP ingest across nodes: a real aiortc publisher at the origin (`[world_model] kind = "whip"`), real
aiortc spectators at another `relay serve` node of the same cluster (the edge pulls the broadcast over WHEP
like any other)."""

from __future__ import annotations

import asyncio
import time

from aiortc.rtp import RTCP_PSFB_APP, RTCP_PSFB_PLI, RtcpPsfbPacket

from relay.client import Publisher, Spectator
from relay.media.rtp_fanout import JOIN_REPLAY_MAX_AGE
from relay.worldmodel.synthetic import SyntheticTrack
from tests.cluster.conftest import CLUSTER_KEY
from tests.cluster.test_cluster_core import all_joined, open_connection
from tests.conftest import eventually, frames_for

AUTH = {"Authorization": f"Bearer {CLUSTER_KEY}"}


class CountingPublisher(Publisher):
    """The real client Publisher, counting the PLIs it receives and the keyframes it sends. REMB is not
    acted on: aiortc restarts its encoder on a 10 % bitrate change, a keyframe nobody asked for, which
    would serve a joiner whose own request was lost."""

    plis = 0
    keyframes = 0
    keyframe_at = 0.0  # time.monotonic() of the last

    async def publish(self) -> None:
        await super().publish()
        sender = self.pc.getSenders()[0]
        handle_rtcp, next_frame = sender._handle_rtcp_packet, sender._next_encoded_frame

        async def rtcp(packet) -> None:
            if isinstance(packet, RtcpPsfbPacket) and packet.fmt == RTCP_PSFB_APP:
                return
            if isinstance(packet, RtcpPsfbPacket) and packet.fmt == RTCP_PSFB_PLI:
                self.plis += 1
            await handle_rtcp(packet)

        async def watched(codec):
            frame = await next_frame(codec)
            if frame is not None and any(_starts_idr(payload) for payload in frame.payloads):
                self.keyframes += 1
                self.keyframe_at = time.monotonic()
            return frame
        sender._handle_rtcp_packet, sender._next_encoded_frame = rtcp, watched

    async def mark(self) -> tuple[int, int]:
        """A point to count from, once the last keyframe is too old for a joiner to start from its replay."""
        await eventually(lambda: time.monotonic() - self.keyframe_at > 2 * JOIN_REPLAY_MAX_AGE,
                         what="a keyframe-free moment")
        return self.plis, self.keyframes

    def since(self, mark: tuple[int, int]) -> tuple[int, int]:
        """(PLIs received, keyframes sent) since `mark`."""
        return self.plis - mark[0], self.keyframes - mark[1]


class StillTrack(SyntheticTrack):
    """The synthetic world held still: x264 sees no scene cut (and its next periodic keyframe is 250 frames
    away), so with REMB ignored its keyframes are the ones asked for."""

    def _render(self, t: float, prompt: str | None):
        return super()._render(0.0, prompt)


def _starts_idr(payload: bytes) -> bool:
    """An RTP payload (RFC 6184) that carries an SPS or starts an IDR slice: a single NAL, STAP-A, FU-A."""
    kind = payload[0] & 0x1F
    if kind == 28:  # FU-A: the fragmented NAL's type, at its start
        return bool(payload[1] & 0x80) and payload[1] & 0x1F in (5, 7)
    if kind == 24:  # STAP-A: the first aggregated NAL (SPS first, as aiortc packs a keyframe)
        return len(payload) > 3 and payload[3] & 0x1F in (5, 7)
    return kind in (5, 7)


async def test_a_whip_broadcast_plays_at_an_edge_and_its_joiners_cost_the_publisher_one_pli(cluster, http):
    origin, edge = await cluster(2, world_model={"kind": "whip", "publisher_silence_seconds": 5})
    await all_joined(http, [origin, edge])
    conn = await open_connection(http, origin)
    broadcast = conn["broadcast"]
    track = StillTrack(320, 176, 25)
    async with CountingPublisher(conn["whip_url"], conn["publish_token"], track, session=http) as publisher:
        async with http.post(f"{origin.url}/v1/connections/{conn['connection_id']}/streams", headers=AUTH,
                             json={"prompt": "the publisher's camera"}) as r:
            assert r.status == 201, await r.text()
        await eventually(lambda: publisher.plis >= 1, what="the stream start's PLI at the publisher")
        mark = await publisher.mark()  # past the start's PLI window too (KEYFRAME_MIN_INTERVAL)
        whep = f"{edge.url}/v1/broadcasts/{broadcast['broadcast_id']}/whep"
        viewers = [Spectator(whep, broadcast["spectator_token"]) for _ in range(3)]
        try:
            await asyncio.gather(*(v.join() for v in viewers))  # three joiners at once, at the edge
            await asyncio.gather(*(asyncio.wait_for(v.track.recv(), 10) for v in viewers))
            counts = await asyncio.gather(*(frames_for(v.track, 2.0) for v in viewers))
            for frames in counts:  # 25 fps sent; the publisher's encoder and 3 decoders share this test's core
                assert len(frames) / 2.0 >= 15, f"only {len(frames)} frames in 2 s through the edge"
                assert (frames[-1].width, frames[-1].height) == (320, 176)  # the publisher's own picture
            # The edge's one feed asked the origin once for its joiners; the origin asked the publisher once
            # (none when the encoder had just made a keyframe of its own: the edge's joiners start from it).
            assert publisher.since(mark) == (1, 1)
            # A late joiner at the edge, its feed already flowing: its keyframe request crosses both hops too.
            mark = await publisher.mark()
            late = Spectator(whep, broadcast["spectator_token"])
            viewers.append(late)
            await late.join()
            await asyncio.wait_for(late.track.recv(), 5)
            assert publisher.since(mark) == (1, 1)
        finally:
            await asyncio.gather(*(v.leave() for v in viewers))
    track.stop()
