"""WHIP ingest on a real server: a real aiortc publisher, real aiortc spectators and participants."""

from __future__ import annotations

import asyncio
import base64
import fractions
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import aiohttp
import av
import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack

from relay import metrics
from relay.client import RelayClient, Spectator
from relay.errors import RelayError
from relay.media.aiortc_hooks import receive_rtp_undecoded
from relay.media.depacketizer import H264Depacketizer
from relay.media.h264_sps import nal_units
from relay.media.webrtc import h264_preferences
from relay.media.whip_ingest import DECODE_BACKLOG, Ingest
from relay.web import RECORDINGS
from relay.worldmodel.base import VIDEO_TIME_BASE
from relay.worldmodel.synthetic import SyntheticTrack
from tests.conftest import API_KEY, eventually, frames_for
from tests.integration.test_orchestration_api import join, set_mode
from tests.integration.test_recordings_api import finished_recording
from tests.unit.test_h264_sps import crafted_sps

SILENCE = 1.0


class PausableTrack(MediaStreamTrack):
    """The publisher's camera: the synthetic world, until paused (then it sends nothing at all)."""

    kind = "video"

    def __init__(self, width: int = 320, height: int = 176) -> None:
        super().__init__()
        self.source = SyntheticTrack(width, height, 25)
        self.running = asyncio.Event()
        self.running.set()

    async def recv(self):
        await self.running.wait()
        return await self.source.recv()

    def stop(self) -> None:
        super().stop()
        self.source.stop()


class ProfileTrack(MediaStreamTrack):
    """H.264 of a given profile as packets, encoded here (aiortc's own encoder only makes baseline): what
    OBS sends under the SDP's 42e01f label."""

    kind = "video"

    def __init__(self, profile: str, *, aud: bool = False, parameter_sets: str = "every") -> None:
        super().__init__()
        self.source = SyntheticTrack(320, 176, 25)
        # With every keyframe (x264's way), with the "first" only, or "never" in band (the SDP's sprop only).
        self.aud, self.parameter_sets, self.keyframes = aud, parameter_sets, 0
        self.profile = profile
        self.change(profile)
        self.pending: list[av.Packet] = []

    def _encoder(self, profile: str) -> av.CodecContext:
        ctx = av.CodecContext.create("libx264", "w")
        ctx.width, ctx.height, ctx.pix_fmt, ctx.profile = 320, 176, "yuv420p", profile
        ctx.time_base, ctx.framerate = VIDEO_TIME_BASE, fractions.Fraction(25, 1)
        aud = ":aud=1" if self.aud else ""  # each access unit opens with an access unit delimiter, as OBS's do
        ctx.options = {"preset": "veryfast", "tune": "zerolatency", "x264-params": f"keyint=25:bframes=0{aud}"}
        return ctx

    def change(self, profile: str) -> None:
        """From the next frame on, a new encoder of this profile (its first access unit a keyframe with its SPS)."""
        self.ctx = self._encoder(profile)

    def sprop(self) -> str:
        """sprop-parameter-sets for this track's SDP: the SPS and PPS its encoder makes (x264's are the same
        for the same settings), base64."""
        ctx = self._encoder(self.profile)
        frame = av.VideoFrame.from_ndarray(np.zeros((176, 320, 3), np.uint8), format="rgb24")
        first = bytes((ctx.encode(frame) + ctx.encode(None))[0])
        return ",".join(base64.b64encode(nal).decode() for kind in (7, 8)
                        for nal in nal_units(first) if nal and nal[0] & 0x1F == kind)

    def _without_parameter_sets(self, packet: av.Packet) -> av.Packet:
        """A keyframe without its SPS and PPS (but the first, if they come with the first only)."""
        if not packet.is_keyframe:
            return packet
        self.keyframes += 1
        if self.keyframes == 1 and self.parameter_sets == "first":
            return packet
        stripped = av.Packet(b"".join(b"\x00\x00\x00\x01" + nal for nal in nal_units(bytes(packet))
                                      if nal and nal[0] & 0x1F not in (7, 8)))
        stripped.pts, stripped.dts, stripped.time_base = packet.pts, packet.dts, packet.time_base
        return stripped

    async def recv(self):
        while not self.pending:
            for packet in self.ctx.encode(await self.source.recv()):
                packet.time_base = VIDEO_TIME_BASE
                self.pending.append(self._without_parameter_sets(packet) if self.parameter_sets != "every" else packet)
        return self.pending.pop(0)

    def stop(self) -> None:
        super().stop()
        self.source.stop()


class Publisher:
    """A minimal WHIP publisher (aiortc): its encoder's access units are kept for comparison."""

    def __init__(self, whip_url: str, token: str, codec: str = "video/H264", prompts: bool = False,
                 size: tuple[int, int] = (320, 176), track: MediaStreamTrack | None = None,
                 edit_offer: Callable[[str], str] = lambda sdp: sdp) -> None:
        self.whip_url, self.token, self.codec, self.edit_offer = whip_url, token, codec, edit_offer
        self.track = track or PausableTrack(*size)
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.channel = self.pc.createDataChannel("prompts") if prompts else None
        self.messages: list[dict] = []
        self.sent: set[bytes] = set()  # the publisher's access units, reassembled from its own RTP payloads
        self.location: str | None = None
        if self.channel is not None:
            self.channel.on("message", lambda m: self.messages.append(json.loads(m)))

    def _keep_access_units(self, sender: RTCRtpSender) -> None:
        unpack = H264Depacketizer(lambda packet, _kf: self.sent.add(bytes(packet)), lambda: None, clock=time.monotonic)
        next_frame, seq = sender._next_encoded_frame, [0]

        async def recorded(codec):
            frame = await next_frame(codec)
            if frame is not None:
                for i, payload in enumerate(frame.payloads):
                    seq[0] += 1
                    unpack.add(seq[0] & 0xFFFF, frame.timestamp, i == len(frame.payloads) - 1, payload)
            return frame

        sender._next_encoded_frame = recorded

    async def post(self, http: aiohttp.ClientSession) -> aiohttp.ClientResponse:
        transceiver = self.pc.addTransceiver(self.track, direction="sendonly")
        codecs = RTCRtpSender.getCapabilities("video").codecs
        transceiver.setCodecPreferences([c for mime in self.codec.split(",") for c in codecs if c.mimeType == mime])
        if "video/H264" in self.codec:
            self._keep_access_units(transceiver.sender)
        await self.pc.setLocalDescription(await self.pc.createOffer())
        response = await http.post(self.whip_url, data=self.edit_offer(self.pc.localDescription.sdp),
                                   headers={"Content-Type": "application/sdp", "Authorization": f"Bearer {self.token}"})
        if response.status == 201:
            self.location = response.headers["Location"]
            await self.pc.setRemoteDescription(RTCSessionDescription(await response.text(), "answer"))
        return response

    async def close(self) -> None:
        await self.pc.close()
        self.track.stop()


class RawSpectator:
    """A WHEP viewer that keeps the access units it reassembles (it never decodes)."""

    def __init__(self, whep_url: str, token: str) -> None:
        self.whep_url, self.token = whep_url, token
        self.received: list[bytes] = []
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))

    async def join(self, http: aiohttp.ClientSession) -> None:
        transceiver = self.pc.addTransceiver("video", direction="recvonly")
        transceiver.setCodecPreferences(h264_preferences())
        unpack = H264Depacketizer(lambda packet, _kf: self.received.append(bytes(packet)), lambda: None,
                                  clock=time.monotonic)
        receive_rtp_undecoded(transceiver.receiver, lambda p: unpack.add(p.sequence_number, p.timestamp,
                                                                          p.marker, p.payload))
        await self.pc.setLocalDescription(await self.pc.createOffer())
        async with http.post(self.whep_url, data=self.pc.localDescription.sdp,
                             headers={"Content-Type": "application/sdp",
                                      "Authorization": f"Bearer {self.token}"}) as r:
            assert r.status == 201, await r.text()
            answer = await r.text()
        await self.pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))


@pytest.fixture
async def whip(relay_factory):
    """A WHIP relay and one open connection: (relay, client, connection)."""
    relay = await relay_factory(world_model={"kind": "whip", "publisher_silence_seconds": SILENCE},
                                limits={"stream_max_seconds": 60, "idle_timeout_seconds": 60},
                                orchestration={"cooldown_seconds": 0})
    client = RelayClient(relay.url, API_KEY)
    async with client.connect() as conn:
        yield relay, client, conn
    await client.close()


def whip_relay_peers(relay) -> int:
    return sum(1 for c in relay.sessions.connections.values()
               if c.streamer.ingest is not None and not c.streamer.ingest.closed)


def gauge(path: str) -> float:
    return metrics.WHIP_PUBLISHERS.labels(path=path)._value.get()


async def test_connection_answer_carries_the_publish_slot(whip):
    relay, _, conn = whip
    assert conn.info["whip_url"] == f"{relay.url}/v1/connections/{conn.connection_id}/whip"
    assert conn.info["publish_token"] and conn.info["publish_token"] != API_KEY


async def test_h264_is_passed_through_byte_for_byte(whip, http):
    relay, _, conn = whip
    # Not the configured 320x176: a passed-through stream keeps the publisher's own size. VP8 offered
    # first, as Chrome does: the relay still picks H.264, which it need not encode again.
    publisher = Publisher(conn.info["whip_url"], conn.info["publish_token"], codec="video/VP8,video/H264",
                          size=(384, 216))
    viewer = None
    before = gauge("passthrough")
    try:
        r = await publisher.post(http)
        assert r.status == 201 and r.headers["Location"].startswith(f"/v1/connections/{conn.connection_id}/whip/")
        # No RTX: a resent packet keeps the media payload type, which is all the depacketizer reads.
        assert "rtx/90000" not in publisher.pc.remoteDescription.sdp
        await eventually(lambda: gauge("passthrough") == before + 1, what="the path decided at the first keyframe")
        async with http.get(f"{relay.url}/metrics") as m:
            assert f'relay_whip_publishers{{path="passthrough"}} {before + 1}' in await m.text()
        await conn.start_stream("whatever the publisher shows")
        broadcast = relay.sessions.broadcast(conn.broadcast["broadcast_id"])
        assert broadcast.media._pipeline is None  # no encoder: the publisher's packets are the source
        viewer = RawSpectator(conn.broadcast["whep_url"], conn.broadcast["spectator_token"])
        await viewer.join(http)
        await eventually(lambda: len(viewer.received) >= 25, timeout=10, what="25 access units at the spectator")
        # Every access unit the spectator reassembled is one the publisher's encoder made, unchanged.
        assert all(au in publisher.sent for au in viewer.received), "an access unit changed on its way"
        # What the relay adds to each passed-through frame is measured (publisher's packet in -> spectators' out).
        assert metrics.REGISTRY.get_sample_value("relay_whip_frame_latency_seconds_count") >= 25
        # The stream's start asked the publisher for a keyframe (a PLI), coalesced with the joiner's.
        ingest = relay.sessions.connection(conn.connection_id).streamer.ingest
        assert 1 <= ingest.plis_sent <= 2 and ingest._depacketizer.dropped == 0
        # The recorder muxed the same packets, at the size the publisher's SPS declares.
        await conn.end_stream()
        rec = await finished_recording(http, relay.url, conn.stream_id)
        assert rec["status"] == "complete" and (rec["width"], rec["height"]) == (384, 216), rec
        with av.open(str(relay.app[RECORDINGS].path(conn.stream_id, "video.mp4"))) as container:
            frames = list(container.decode(video=0))
        assert len(frames) >= 25 and (frames[0].width, frames[0].height) == (384, 216)
        events = relay.app[RECORDINGS].path(conn.stream_id, "events.jsonl").read_text().splitlines()
        assert json.loads(events[0])["type"] == "stream_started"  # logged before the recorder's first keyframe
    finally:
        if viewer is not None:
            await viewer.pc.close()
        await publisher.close()


async def test_vp8_is_transcoded_once(whip, http):
    relay, _, conn = whip
    publisher = Publisher(conn.info["whip_url"], conn.info["publish_token"], codec="video/VP8")
    before = gauge("transcode")
    try:
        assert (await publisher.post(http)).status == 201
        assert gauge("transcode") == before + 1
        await conn.start_stream("a browser's camera")
        assert relay.sessions.broadcast(conn.broadcast["broadcast_id"]).media._pipeline is not None
        async with Spectator(conn.broadcast["whep_url"], conn.broadcast["spectator_token"]) as viewer:
            await asyncio.wait_for(viewer.track.recv(), 10)
            frames = await frames_for(viewer.track, 2.0)
            assert len(frames) >= 40, f"only {len(frames)} frames in 2 s"
            assert (frames[-1].width, frames[-1].height) == (320, 176)
            # A publisher without a prompts channel simply broadcasts: the host's prompt is still acknowledged.
            assert await conn.interact("snow on the lens") == "snow on the lens"
    finally:
        await publisher.close()
    await eventually(lambda: gauge("transcode") == before, timeout=5, what="the transcode gauge back")


@pytest.mark.parametrize("profile,path", [("High", "transcode"), ("Main", "passthrough")])
async def test_h264_high_profile_is_transcoded_once_and_main_without_b_frames_passes(whip, http, profile, path):
    relay, _, conn = whip
    publisher = Publisher(conn.info["whip_url"], conn.info["publish_token"], track=ProfileTrack(profile))
    before = gauge(path)
    try:
        assert (await publisher.post(http)).status == 201
        await conn.start_stream(f"OBS's {profile} profile")  # waits for the first keyframe: its SPS decides
        assert gauge(path) == before + 1
        pipeline = relay.sessions.broadcast(conn.broadcast["broadcast_id"]).media._pipeline
        assert (pipeline is not None) is (path == "transcode")
        async with Spectator(conn.broadcast["whep_url"], conn.broadcast["spectator_token"]) as viewer:
            await asyncio.wait_for(viewer.track.recv(), 10)
            frames = await frames_for(viewer.track, 2.0)
            assert len(frames) >= 40, f"only {len(frames)} frames in 2 s"
        # Transcoded or not, the relay's own depacketizer and decoder need the publisher's keyframes: a PLI
        # after a lost packet (the depacketizer's call), and when the decoder fell a GOP behind.
        ingest = relay.sessions.connection(conn.connection_id).streamer.ingest
        sent = ingest.plis_sent
        ingest.request_keyframe()
        await eventually(lambda: ingest.plis_sent == sent + 1, what="a PLI after loss")
        if path == "transcode":
            ingest._backlog += DECODE_BACKLOG  # the decoder thread a GOP behind: the next access unit is skipped
            await eventually(lambda: ingest.plis_sent == sent + 2, what="a PLI when the decoder skips to a keyframe")
            ingest._backlog -= DECODE_BACKLOG
        stream = relay.sessions.stream(conn.stream_id)
        await publisher.close()  # gone: the stream ends, and the decoder thread goes with the session
        await eventually(lambda: not stream.live, what="the stream ended")
        assert stream.end_reason == "upstream_error"
        assert not [t for t in threading.enumerate() if t.name.startswith("relay-whip-decode")]
    finally:
        await publisher.close()


async def test_keyframes_that_open_with_an_aud_and_lack_parameter_sets_pass_through(whip, http):
    relay, _, conn = whip
    track = ProfileTrack("Baseline", aud=True, parameter_sets="first")
    publisher = Publisher(conn.info["whip_url"], conn.info["publish_token"], track=track)
    before = gauge("passthrough")
    try:
        assert (await publisher.post(http)).status == 201
        await conn.start_stream("OBS's access units")  # its first keyframe (AUD first) is found
        assert gauge("passthrough") == before + 1
        await eventually(lambda: track.keyframes >= 2, what="a keyframe sent without its SPS and PPS")
        # A spectator joining now starts from such a keyframe: the relay gave it the SPS and PPS seen before.
        async with Spectator(conn.broadcast["whep_url"], conn.broadcast["spectator_token"]) as viewer:
            await asyncio.wait_for(viewer.track.recv(), 10)
            frames = await frames_for(viewer.track, 1.0)
            assert len(frames) >= 15, f"only {len(frames)} frames in 1 s"
        ingest = relay.sessions.connection(conn.connection_id).streamer.ingest
        assert ingest._depacketizer.keyframes >= 2 and not ingest.gone
    finally:
        await publisher.close()


async def test_parameter_sets_given_only_in_the_offers_sprop_complete_its_keyframes(whip, http):
    relay, _, conn = whip
    track = ProfileTrack("Baseline", parameter_sets="never")
    sprop = track.sprop()

    def with_sprop(sdp: str) -> str:  # on the H.264 fmtp line, as GStreamer's rtph264pay puts it
        return re.sub(r"(a=fmtp:\d+ [^\r\n]*packetization-mode=1[^\r\n]*)", rf"\1;sprop-parameter-sets={sprop}", sdp)

    # A sprop that is no base64 (or no SPS) is as if absent: the offer is still answered.
    junk = Publisher(conn.info["whip_url"], conn.info["publish_token"],
                     edit_offer=lambda sdp: with_sprop(sdp).replace(sprop, "!!," + "A" * 4000))
    try:
        assert (await junk.post(http)).status == 201
        async with http.delete(relay.url + junk.location,
                               headers={"Authorization": f"Bearer {conn.info['publish_token']}"}) as r:
            assert r.status == 200
    finally:
        await junk.close()
    publisher = Publisher(conn.info["whip_url"], conn.info["publish_token"], track=track, edit_offer=with_sprop)
    before = gauge("passthrough")
    try:
        assert (await publisher.post(http)).status == 201
        await conn.start_stream("no SPS in band")  # the first keyframe's SPS comes from the offer
        assert gauge("passthrough") == before + 1
        async with Spectator(conn.broadcast["whep_url"], conn.broadcast["spectator_token"]) as viewer:
            await asyncio.wait_for(viewer.track.recv(), 10)
            frames = await frames_for(viewer.track, 1.0)
            assert len(frames) >= 15, f"only {len(frames)} frames in 1 s"
    finally:
        await publisher.close()


async def test_a_publisher_whose_sps_changes_mid_session_is_ended(whip, http):
    relay, _, conn = whip
    track = ProfileTrack("Baseline")
    publisher = Publisher(conn.info["whip_url"], conn.info["publish_token"], track=track)
    try:
        assert (await publisher.post(http)).status == 201
        await conn.start_stream("OBS, until its settings change")
        stream = relay.sessions.stream(conn.stream_id)
        async with Spectator(conn.broadcast["whep_url"], conn.broadcast["spectator_token"]) as viewer:
            await asyncio.wait_for(viewer.track.recv(), 10)
            track.change("High")  # passed through so far: a high-profile SPS may not follow it to the spectators
            await eventually(lambda: not stream.live, what="the stream ended")
            assert stream.end_reason == "upstream_error"
            assert viewer.pc.connectionState == "connected"  # the spectator stays for the next stream
    finally:
        await publisher.close()


async def test_a_picture_beyond_4k_ends_the_session_before_anything_decodes_it():
    gone = []
    ingest = Ingest(on_packet=lambda *_: None, on_frame=lambda _: None, on_gone=lambda: gone.append(True),
                    max_candidates=64)
    ingest._on_access_unit(av.Packet(crafted_sps(66, 20001, 20001)), True)  # a 320016x320016 baseline SPS
    assert ingest.gone and gone == [True] and ingest.path is None and ingest.ready.is_set()
    await ingest.close()


async def test_closing_a_session_waits_for_its_decoder_off_the_loop():
    ingest = Ingest(on_packet=lambda *_: None, on_frame=lambda _: None, on_gone=lambda: None, max_candidates=64)
    ingest._decoding = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-whip-decode")
    release = threading.Event()
    ingest._decoding.submit(release.wait, 3)  # a decode in flight, done when the loop says so
    asyncio.get_running_loop().call_soon(release.set)  # runs only if close() lets the loop run
    started = time.monotonic()
    await ingest.close()
    assert time.monotonic() - started < 1.5, "close() held the event loop until the decode timed out"


async def test_prompts_reach_the_publishers_channel(whip, http):
    relay, _, conn = whip
    publisher = Publisher(conn.info["whip_url"], conn.info["publish_token"], prompts=True)
    try:
        assert (await publisher.post(http)).status == 201
        await eventually(lambda: publisher.channel.readyState == "open", what="the prompts channel open")
        await eventually(lambda: relay.sessions.connection(conn.connection_id).streamer.ingest._prompts is not None,
                         what="the relay holding the prompts channel")
        await conn.start_stream("a quiet harbour")
        await eventually(lambda: publisher.messages, what="the stream's start at the publisher")
        assert publisher.messages[0] == {"type": "interactive_stream_start", "prompt": "a quiet harbour",
                                         "portrait": False}
        await conn.interact("a storm rolls in")
        await eventually(lambda: len(publisher.messages) >= 2, what="the host's prompt")
        assert publisher.messages[1] == {"type": "update", "prompt": "a storm rolls in"}
        # A participant's prompt, let through by the queue, reaches the publisher the same way.
        await set_mode(http, conn, mode="queue")
        participant = await join(http, conn, name="ada")
        await participant.send(type="input", prompt="fireworks over the water")
        await eventually(lambda: {"type": "update", "prompt": "fireworks over the water"} in publisher.messages,
                         what="the participant's prompt at the publisher")
        await participant.ws.close()
    finally:
        await publisher.close()


async def test_a_silent_publisher_ends_the_stream_and_a_new_session_continues(whip, http):
    relay, _, conn = whip
    publisher = Publisher(conn.info["whip_url"], conn.info["publish_token"])
    assert (await publisher.post(http)).status == 201
    await conn.start_stream("first")
    first_stream = conn.stream_id
    async with Spectator(conn.broadcast["whep_url"], conn.broadcast["spectator_token"]) as viewer:
        await asyncio.wait_for(viewer.track.recv(), 10)
        publisher.track.running.clear()  # the publisher stops sending (its peer stays up)
        stream = relay.sessions.stream(first_stream)
        await eventually(lambda: not stream.live, timeout=SILENCE + 3, what="the stream ended")
        assert stream.end_reason == "upstream_error"
        assert viewer.pc.connectionState == "connected"  # the spectator stays for the next stream
        await eventually(lambda: whip_relay_peers(relay) == 0, what="the silent publisher's peer closed")
        await publisher.close()

        again = Publisher(conn.info["whip_url"], conn.info["publish_token"])
        try:
            assert (await again.post(http)).status == 201
            await conn.start_stream("second")
            assert conn.stream_id != first_stream
            await eventually(lambda: relay.sessions.broadcast(conn.broadcast["broadcast_id"]).media.hub.published > 5,
                             what="the new session's packets")
            frames = await frames_for(viewer.track, 1.0)
            assert len(frames) >= 15, f"only {len(frames)} frames of the next stream"
        finally:
            await again.close()


async def test_a_publisher_back_before_its_old_stream_ended_keeps_its_new_session(whip, http):
    relay, _, conn = whip
    token = {"Authorization": f"Bearer {conn.info['publish_token']}"}
    first = Publisher(conn.info["whip_url"], conn.info["publish_token"])
    second = Publisher(conn.info["whip_url"], conn.info["publish_token"])
    try:
        assert (await first.post(http)).status == 201
        await conn.start_stream("first")
        stream = relay.sessions.stream(conn.stream_id)
        async with http.delete(relay.url + first.location, headers=token) as r:
            assert r.status == 200
        assert (await second.post(http)).status == 201  # back at once, before the reaper ends the old stream
        await eventually(lambda: not stream.live, what="the old stream ended")
        assert stream.end_reason == "upstream_error"
        streamer = relay.sessions.connection(conn.connection_id).streamer
        assert streamer.ingest is not None and not streamer.ingest.closed  # the old stream's end left it alone
        await conn.start_stream("second")
        hub = relay.sessions.broadcast(conn.broadcast["broadcast_id"]).media.hub
        published = hub.published
        await eventually(lambda: hub.published > published + 10, what="the new session's packets")
    finally:
        await first.close()
        await second.close()


async def test_delete_and_closing_the_connection_leave_no_peer(relay_factory, http):
    relay = await relay_factory(world_model={"kind": "whip"})
    client = RelayClient(relay.url, API_KEY)
    peers = metrics.open_peers()
    async with client.connect() as conn:
        publisher = Publisher(conn.info["whip_url"], conn.info["publish_token"])
        assert (await publisher.post(http)).status == 201
        token = {"Authorization": f"Bearer {conn.info['publish_token']}"}
        async with http.delete(relay.url + publisher.location, headers=token) as r:
            assert r.status == 200
        assert whip_relay_peers(relay) == 0
        async with http.delete(relay.url + publisher.location, headers=token) as r:
            assert r.status == 404  # gone already
        await publisher.close()
        second = Publisher(conn.info["whip_url"], conn.info["publish_token"])
        assert (await second.post(http)).status == 201  # the slot is free again
    await second.close()  # the connection closed first: its publisher's peer went with it
    assert not relay.sessions.connections
    await client.close()
    await eventually(lambda: metrics.open_peers() <= peers, what="every peer closed")
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("relay-whip")]


async def test_a_publisher_that_goes_away_leaves_no_session_open(whip, http):
    relay, _, conn = whip
    publisher = Publisher(conn.info["whip_url"], conn.info["publish_token"], track=ProfileTrack("High"))
    before = gauge("transcode")
    try:
        assert (await publisher.post(http)).status == 201
        await eventually(lambda: gauge("transcode") == before + 1, what="the path decided (a decoder thread)")
    finally:
        await publisher.close()  # no DELETE, no stream, no next POST: nothing but its peer's end tells the relay
    await eventually(lambda: whip_relay_peers(relay) == 0, what="the gone publisher's peer closed")
    assert gauge("transcode") == before and relay.sessions.connection(conn.connection_id).streamer.ingest is None
    await eventually(lambda: not [t for t in threading.enumerate() if t.name.startswith("relay-whip-decode")],
                     what="the decoder thread ended")


async def test_a_publisher_that_never_connects_frees_the_slot(relay_factory, http):
    relay = await relay_factory(world_model={"kind": "whip", "publisher_silence_seconds": SILENCE},
                                limits={"whep_connect_seconds": 1})
    async with RelayClient(relay.url, API_KEY) as client, client.connect() as conn:
        vanished = RTCPeerConnection()  # offers, then never applies the answer: no ICE, no media
        vanished.addTransceiver("video", direction="sendonly")
        try:
            status, _ = await sdp_post(http, conn.info["whip_url"], conn.info["publish_token"],
                                       await offer_of(vanished))
            assert status == 201
        finally:
            await vanished.close()
        publisher = Publisher(conn.info["whip_url"], conn.info["publish_token"])
        try:
            assert (await publisher.post(http)).status == 409  # still within its chance to connect
            # A stream cannot start on a session that sends nothing: refused once its window passes.
            async with http.post(f"{relay.url}/v1/connections/{conn.connection_id}/streams", json={"prompt": "x"},
                                 headers={"Authorization": f"Bearer {API_KEY}"}) as r:
                assert r.status == 409 and (await r.json())["error"]["code"] == "PUBLISHER_NOT_CONNECTED"
            streamer = relay.sessions.connection(conn.connection_id).streamer
            stale = streamer.ingest.last_media + 1.0
            await eventually(lambda: time.monotonic() > stale, what="the silent session's window passed")
            again = Publisher(conn.info["whip_url"], conn.info["publish_token"])
            assert (await again.post(http)).status == 201
            await again.close()
        finally:
            await publisher.close()


async def test_racing_publishers_get_one_slot_and_a_closed_connection_answers_404(relay_factory, http):
    relay = await relay_factory(world_model={"kind": "whip", "publisher_silence_seconds": SILENCE},
                                limits={"whep_connect_seconds": 1})
    async with RelayClient(relay.url, API_KEY) as client, client.connect() as conn:
        url, token = conn.info["whip_url"], conn.info["publish_token"]
        streamer = relay.sessions.connection(conn.connection_id).streamer
        vanished = RTCPeerConnection()  # a session that never connects: its slot is free once its window passes
        vanished.addTransceiver("video", direction="sendonly")
        publishers = [Publisher(url, token) for _ in range(2)]
        try:
            assert (await sdp_post(http, url, token, await offer_of(vanished)))[0] == 201
            stale = streamer.ingest.last_media + 1.0
            await eventually(lambda: time.monotonic() > stale, what="the silent session's window passed")
            # Both arrive while the dead session closes: one takes the slot, the other is told it is taken.
            responses = await asyncio.gather(*(p.post(http) for p in publishers))
            assert sorted(r.status for r in responses) == [201, 409], [r.status for r in responses]
        finally:
            await vanished.close()
            for publisher in publishers:
                await publisher.close()
        # The connection closes while a publisher's offer is being answered: 404, as for any closed connection.
        await streamer.unpublish(streamer.ingest.session_id)
        late = RTCPeerConnection()
        late.addTransceiver("video", direction="sendonly")
        try:
            publishing = asyncio.ensure_future(streamer.publish(await offer_of(late)))
            while streamer.ingest is None:
                await asyncio.sleep(0)
            await streamer.disconnect()
            with pytest.raises(RelayError) as refused:
                await publishing
            assert refused.value.status == 404
        finally:
            await late.close()


async def sdp_post(http, url: str, token: str, body: str, content_type: str = "application/sdp"):
    async with http.post(url, data=body, headers={"Content-Type": content_type,
                                                  "Authorization": f"Bearer {token}"}) as r:
        return r.status, (await r.text() if r.status == 201 else await r.json(content_type=None))


async def offer_of(pc: RTCPeerConnection) -> str:
    await pc.setLocalDescription(await pc.createOffer())
    return pc.localDescription.sdp


async def test_bad_publishers_are_refused_in_the_error_shape(whip, http):
    relay, _, conn = whip
    url, token = conn.info["whip_url"], conn.info["publish_token"]
    pcs = [RTCPeerConnection() for _ in range(2)]
    try:
        pcs[0].addTransceiver("audio", direction="sendonly")
        audio_only = await offer_of(pcs[0])
        pcs[1].addTransceiver("video", direction="sendonly")
        video = await offer_of(pcs[1])

        for bad in ("", "not-the-token", API_KEY):  # the API key is not a publish token
            status, body = await sdp_post(http, url, bad, video)
            assert status == 401 and body["error"]["code"] == "UNAUTHORIZED"
        async with http.post(f"{url}?token={token}", data=video, headers={"Content-Type": "application/sdp"}) as r:
            assert r.status == 401  # the publish token is read from the Authorization header alone
            assert (await r.json())["error"]["code"] == "UNAUTHORIZED"
        status, body = await sdp_post(http, f"{relay.url}/v1/connections/nope/whip", token, video)
        assert status == 401  # an unknown connection answers as a wrong token does
        status, body = await sdp_post(http, url, token, audio_only)
        assert status == 422 and "no video" in body["error"]["message"]
        vp9_only = "\n".join(line.replace("VP8/90000", "VP9/90000").replace("H264/90000", "H265/90000")
                             for line in video.splitlines())
        status, body = await sdp_post(http, url, token, vp9_only)
        assert status == 422 and body["error"]["details"]["offered"]
        status, body = await sdp_post(http, url, token, video + "a=x:" + "y" * 40000 + "\r\n")
        assert status == 413 and body["error"]["code"] == "INVALID_REQUEST"
        status, body = await sdp_post(http, url, token, video, content_type="text/plain")
        assert status == 415
        status, body = await sdp_post(http, url, token, "hello")
        assert status == 400
        many = video + "".join(f"a=candidate:{i} 1 udp 1 127.0.0.1 {9000 + i} typ host\r\n" for i in range(65))
        status, body = await sdp_post(http, url, token, many)
        assert status == 422 and body["error"]["details"]["limit"] == 64
        async with http.post(f"{relay.url}/v1/connections/{conn.connection_id}/streams",
                             json={"prompt": "x"}, headers={"Authorization": f"Bearer {API_KEY}"}) as r:
            body = await r.json()
            assert r.status == 409 and body["error"]["code"] == "PUBLISHER_NOT_CONNECTED"

        first = Publisher(url, token)
        try:
            assert (await first.post(http)).status == 201
            second = Publisher(url, token)
            r = await second.post(http)
            body = await r.json()
            assert r.status == 409 and body["error"]["code"] == "PUBLISHER_CONNECTED"
            await second.close()
            async with http.patch(relay.url + first.location, data="a=end-of-candidates\r\n",
                                  headers={"Content-Type": "application/trickle-ice-sdpfrag",
                                           "Authorization": f"Bearer {token}"}) as r:
                assert r.status == 204
            # The offer's bound holds for the session: PATCHes add up, each refused once the total passes it.
            trickle = "".join(f"a=candidate:{i} 1 udp 1 127.0.0.1 {9000 + i} typ host\r\n" for i in range(40))
            statuses = []
            for _ in range(2):
                async with http.patch(relay.url + first.location, data=trickle,
                                      headers={"Content-Type": "application/trickle-ice-sdpfrag",
                                               "Authorization": f"Bearer {token}"}) as r:
                    statuses.append((r.status, await r.json() if r.status != 204 else None))
            assert statuses[0][0] == 204 and statuses[1][0] == 422, statuses
            assert statuses[1][1]["error"]["details"]["limit"] == 64
            async with http.patch(relay.url + first.location, data="a=end-of-candidates\r\n",
                                  headers={"Content-Type": "application/trickle-ice-sdpfrag",
                                           "Authorization": "Bearer wrong"}) as r:
                assert r.status == 401
            for unknown in ("nope", "%C3%A9t%C3%A9"):  # a session id that is not ASCII is just as unknown
                async with http.delete(f"{url}/{unknown}", headers={"Authorization": f"Bearer {token}"}) as r:
                    assert r.status == 404 and (await r.json())["error"]["code"] == "NOT_FOUND"
        finally:
            await first.close()
        assert whip_relay_peers(relay) <= 1
    finally:
        for pc in pcs:
            await pc.close()
