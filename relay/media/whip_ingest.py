"""One WHIP publisher's peer connection: the relay receives a live source's video.

The publisher offers (sendonly video, optionally a data channel labelled ``prompts``); the relay
answers with the codec the offer put first among those it can take:

- H.264 (packetization-mode 1) is received as at a cluster edge (edge_feed.py): the receiver is
  hooked (aiortc_hooks.receive_rtp_undecoded) and each RTP packet goes to an
  :class:`H264Depacketizer`. What the bitstream is, not what the SDP says (OBS labels any profile
  42e01f), decides the path at the first keyframe: a progressive baseline SPS (no B-frames) is *passed
  through* (so is main whose VUI declares no reordering: no B-frames), each access unit handed on as
  an ``av.Packet`` for the broadcast's graph, never decoded or encoded again; keyframe requests go
  back to the publisher as one PLI at most every KEYFRAME_MIN_INTERVAL. The rest (B-frames, which a
  spectator's WebRTC decoder does not take, or high profile's tools) are *transcoded*: decoded here
  on one thread, encoded once by the stream. Every later keyframe's SPS is read too: one that would
  change the path (or a passed-through picture's size), or a picture beyond 4K, ends the session.
- VP8 is *transcoded*: aiortc decodes it and the frames go to the stream's pipeline, which encodes
  them once, like any world model's.

RTX is not offered: the depacketizer reads packets by their media payload type, so a publisher
resends NACKed packets with it. Audio and further video m-lines are answered inactive: nothing reads them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import av
from aiortc import (RTCConfiguration, RTCPeerConnection, RTCRtpCodecCapability, RTCRtpReceiver,
                    RTCSessionDescription)
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtcpeerconnection import is_codec_compatible
from aiortc.rtp import RtpPacket
from aiortc.sdp import SessionDescription

from .. import metrics
from ..errors import RelayError, unprocessable
from .aiortc_hooks import receive_rtp_undecoded, send_picture_loss
from .depacketizer import H264Depacketizer, begins_idr
from .h264_sps import MAX_SAMPLES, MAX_SIDE, MAX_SPS_BYTES, NAL_PPS, NAL_SPS, Sps, nal_units, read_sps
from .pli import PliCoalescer
from .webrtc import add_trickled_candidates, checked_offer, count_candidates, too_many_candidates

log = logging.getLogger(__name__)

PASSTHROUGH = "passthrough"
TRANSCODE = "transcode"
H264, VP8 = "video/h264", "video/vp8"
CODECS = (H264, VP8)
PROMPTS_LABEL = "prompts"
DECODE_BACKLOG = 8  # access units waiting for the decoder thread before it skips to the next keyframe


def parse_publish_offer(sdp: str, max_candidates: int) -> RTCRtpCodecCapability:
    """The one codec the relay will answer with (H.264 if offered, else VP8); 400 for text that is not
    SDP, 422 for an offer that sends no video the relay can take."""
    parsed = checked_offer(sdp, max_candidates)
    video = [m for m in parsed.media if m.kind == "video"]
    if not video:
        raise unprocessable("The offer has no video m-line: a publisher must send video.")
    first = video[0]
    if first.port == 0 or first.direction not in (None, "sendrecv", "sendonly"):
        raise unprocessable(f"The offer's video m-line is {first.direction or 'rejected'}: a publisher must send "
                            "video (sendonly).", direction=first.direction)
    if first.dtls is None or not first.dtls.fingerprints:
        raise unprocessable(
            "The offer has no DTLS fingerprint and setup role (a=fingerprint, a=setup): media cannot be secured.")
    for local in ingest_preferences():
        if any(is_codec_compatible(local, offered) for offered in first.rtp.codecs):
            return local
    raise unprocessable("No codec in common: the relay takes H.264 (constrained baseline or baseline, "
                        "packetization-mode 1) or VP8.", offered=sorted({c.mimeType for c in first.rtp.codecs}))


def ingest_preferences() -> list[RTCRtpCodecCapability]:
    """H.264 before VP8 whatever the offer's order: a browser offering both (VP8 first, as Chrome does)
    is then passed through rather than transcoded."""
    codecs = RTCRtpReceiver.getCapabilities("video").codecs
    return sorted((c for c in codecs if c.mimeType.lower() in CODECS
                   and (c.parameters or {}).get("packetization-mode", "1") == "1"),
                  key=lambda c: CODECS.index(c.mimeType.lower()))


class Ingest:
    """The publisher's peer: ``on_packet`` gets its access units (pass-through), ``on_frame`` its decoded
    frames (transcode), ``on_gone`` is called once if its peer fails or closes without us closing it."""

    def __init__(
        self,
        *,
        on_packet: Callable[[av.Packet, bool], None],
        on_frame: Callable[[av.VideoFrame], None],
        on_gone: Callable[[], None],
        max_candidates: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.session_id = secrets.token_urlsafe(12)
        self._max_candidates = max_candidates
        self._candidates = 0  # signalled so far, offer and trickles: the offer's bound holds for the session
        self._on_packet = on_packet
        self._on_frame = on_frame
        self._on_gone = on_gone
        self._clock = clock
        self.path: str | None = None  # VP8: transcode, at once; H.264: by its first keyframe's SPS
        self.ready = asyncio.Event()  # the path is known (a stream can start), or the session ended
        self.last_media = clock()  # the publisher's last packet or frame
        self.gone = False
        self.closed = False
        self._pc: RTCPeerConnection | None = None
        self._receiver: RTCRtpReceiver | None = None
        self._payload_type: int | None = None
        self._sps: Sps | None = None  # the first keyframe's, which decided the path
        self._depacketizer = H264Depacketizer(self._on_access_unit, self.request_keyframe, clock=clock,
                                              keyframe_start=begins_idr)
        self._parameter_sets: dict[int, bytes] = {}  # the last SPS and PPS NAL units seen, by type
        self._decoding: ThreadPoolExecutor | None = None  # H.264 that cannot pass through: one decoder thread
        self._decoder: av.CodecContext | None = None
        self._backlog = 0
        self._skip_to_keyframe = False
        self._reader: asyncio.Task | None = None
        self._prompts = None  # the publisher's data channel labelled "prompts", if it opened one
        self._frame_started: float | None = None  # perf_counter at the current frame's first packet
        # Owed until media flows: a stream (and its spectators' requests) may start before the first packet.
        self._pli = PliCoalescer(lambda ssrc: send_picture_loss(self._receiver, ssrc), name="relay-whip-pli",
                                 owed_until_media=True)

    @property
    def plis_sent(self) -> int:
        return self._pli.sent

    async def answer(self, offer_sdp: str, codec: RTCRtpCodecCapability) -> str:
        """Apply the (checked) offer and return the answer with ``codec`` alone (parse_publish_offer's
        choice): a publisher then sends that codec whatever its own preference; 422 if it cannot be agreed."""
        self._candidates = count_candidates(offer_sdp)
        pc = self._pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        metrics.track_peer(pc)

        @pc.on("datachannel")
        def on_datachannel(channel: Any) -> None:
            if channel.label == PROMPTS_LABEL and self._prompts is None:
                self._prompts = channel  # written to only: what the publisher sends on it is not read

        @pc.on("connectionstatechange")
        def on_state() -> None:
            if pc.connectionState in ("failed", "closed"):
                self._end(f"its peer {pc.connectionState}")

        # aiortc picks the answer's codecs in setRemoteDescription: the video transceiver and its
        # preference (one codec, no RTX) must exist before the offer is applied.
        video = pc.addTransceiver("video", direction="recvonly")
        video.setCodecPreferences([codec])
        try:
            await pc.setRemoteDescription(RTCSessionDescription(offer_sdp, "offer"))
        except Exception as exc:  # aiortc refuses m-lines it shares no codec with
            raise unprocessable("No codec in common: the relay takes H.264 (constrained baseline or baseline, "
                                f"packetization-mode 1) or VP8 ({str(exc) or type(exc).__name__}).") from exc
        for transceiver in pc.getTransceivers():
            if transceiver is not video:  # audio, or a second video: answered inactive, nothing reads it
                transceiver.direction = "inactive"
        answer = await pc.createAnswer()
        negotiated = [c for m in SessionDescription.parse(answer.sdp).media if m.kind == "video"
                      for c in m.rtp.codecs if c.mimeType.lower() in CODECS]
        if not negotiated:
            raise unprocessable("No codec in common: the relay takes H.264 (constrained baseline or baseline, "
                                "packetization-mode 1) or VP8.")
        mime = negotiated[0].mimeType
        self._payload_type = negotiated[0].payloadType
        self._keep_sprop(offer_sdp)
        self._receiver = video.receiver
        h264 = mime.lower() == H264
        if h264:
            receive_rtp_undecoded(self._receiver, self._on_rtp)  # before the receiver starts (connect, below)
        await pc.setLocalDescription(answer)
        if not h264:
            self._reader = asyncio.get_running_loop().create_task(self._read_frames(video.receiver.track),
                                                                  name="relay-whip-frames")
            self._decide(TRANSCODE, mime)
        log.info("WHIP publisher answered with %s", mime, extra={"session_id": self.session_id})
        return pc.localDescription.sdp

    def _keep_sprop(self, offer_sdp: str) -> None:
        """The SPS and PPS an offer's H.264 fmtp carries (sprop-parameter-sets, RFC 6184): a publisher may send
        them there only, never in band; kept as if seen with a keyframe, so its keyframes can be completed."""
        for media in SessionDescription.parse(offer_sdp).media:
            for codec in media.rtp.codecs if media.kind == "video" else ():
                if codec.payloadType != self._payload_type:
                    continue
                for part in str((codec.parameters or {}).get("sprop-parameter-sets") or "").split(",")[:2]:
                    try:
                        nal = base64.b64decode(part, validate=True)
                    except ValueError:
                        continue  # not base64: as if absent
                    if nal and len(nal) <= MAX_SPS_BYTES and nal[0] & 0x1F in (NAL_SPS, NAL_PPS):
                        self._parameter_sets[nal[0] & 0x1F] = nal
                return

    def _end(self, why: str) -> None:
        """The session is over from the publisher's side (its peer went, or its stream became one the
        relay cannot carry): nothing more is read from it and its stream fails (upstream_error)."""
        if self.closed or self.gone:
            return
        self.gone = True
        self.ready.set()  # a stream waiting for its first keyframe learns at once that none will come
        log.info("WHIP publisher gone: %s", why, extra={"session_id": self.session_id})
        self._on_gone()

    def _decide(self, path: str, what: str) -> None:
        self.path = path
        metrics.WHIP_PUBLISHERS.labels(path=path).inc()
        log.info("WHIP publisher's %s: %s", what,
                 "passed through as packets" if path == PASSTHROUGH else "decoded and encoded once",
                 extra={"session_id": self.session_id, "path": path})
        self.ready.set()

    async def trickle(self, fragment: str) -> None:
        """PATCH: trickled candidates, 422 past the session's bound (each costs more than the last in aioice)."""
        total = self._candidates + count_candidates(fragment)
        if total > self._max_candidates:
            raise too_many_candidates(self._max_candidates, total)
        self._candidates = total
        if self._pc is not None:
            await add_trickled_candidates(self._pc, fragment)

    def _on_rtp(self, packet: RtpPacket) -> None:
        if packet.payload_type != self._payload_type or self.closed or self.gone:
            return
        self.last_media = self._clock()
        self._pli.media(packet.ssrc)
        if self._frame_started is None:
            self._frame_started = time.perf_counter()
        frames = self._depacketizer.frames
        # A frame completes (and, passed through, is fanned out, synchronously) inside this call, at its marker.
        self._depacketizer.add(packet.sequence_number, packet.timestamp, packet.marker, packet.payload)
        if self._depacketizer.frames != frames:
            if self.path == PASSTHROUGH:
                metrics.WHIP_LATENCY.observe(time.perf_counter() - self._frame_started)
            self._frame_started = None

    def _on_access_unit(self, packet: av.Packet, keyframe: bool) -> None:
        if keyframe:
            packet = self._with_parameter_sets(packet)
            if not self._check_sps(read_sps(bytes(packet))):
                return
        if self.path is None:
            return  # the first keyframe decides
        if self.path == PASSTHROUGH:
            self._on_packet(packet, keyframe)
        else:
            self._decode(packet, keyframe)

    def _with_parameter_sets(self, packet: av.Packet) -> av.Packet:
        """The keyframe with the SPS and PPS it lacks from the last ones seen: a publisher may send them only
        with its first keyframe, and every keyframe must start a spectator's, the recorder's or HLS's decoding."""
        data = bytes(packet)
        present = {nal[0] & 0x1F: nal for nal in nal_units(data) if nal and nal[0] & 0x1F in (NAL_SPS, NAL_PPS)}
        self._parameter_sets.update(present)
        missing = [self._parameter_sets[kind] for kind in (NAL_SPS, NAL_PPS)
                   if kind not in present and kind in self._parameter_sets]
        if not missing:
            return packet
        whole = av.Packet(b"".join(b"\x00\x00\x00\x01" + nal for nal in missing) + data)
        whole.pts, whole.dts, whole.time_base = packet.pts, packet.dts, packet.time_base
        return whole

    def _check_sps(self, sps: Sps | None) -> bool:
        """Every keyframe's SPS: the first decides the path; a later one that would decide otherwise (B-frames
        now, say), or that changes a passed-through picture's size, ends the session, as does a picture too
        large. A keyframe without a readable SPS keeps the path (the first: transcoded, decoding is the safe way)."""
        if sps is not None and not sps.fits:
            self._end(f"its SPS declares {sps.width}x{sps.height}, beyond {MAX_SIDE} a side or {MAX_SAMPLES} samples")
            return False
        path = PASSTHROUGH if sps is not None and sps.passes_through else TRANSCODE
        if self.path is None:
            self._sps = sps
            self._decide(path, f"H.264 (profile_idc {sps.profile_idc if sps else '?'})")
            return True
        if sps is None or self._sps is None:
            return True
        resized = (sps.width, sps.height) != (self._sps.width, self._sps.height)
        if path != self.path or (path == PASSTHROUGH and resized):
            self._end(f"its SPS changed mid-session ({self._sps} -> {sps})")
            return False
        return True

    def _decode(self, packet: av.Packet, keyframe: bool) -> None:
        if self._backlog >= DECODE_BACKLOG and not self._skip_to_keyframe:
            self._skip_to_keyframe = True  # the decoder fell behind: lose a GOP, never the memory
            self.request_keyframe()  # and ask for the next GOP now rather than waiting for the publisher's
        if self._skip_to_keyframe and not keyframe:
            return
        self._skip_to_keyframe = False
        if self._decoding is None:
            self._decoding = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-whip-decode")
            self._decoder = av.CodecContext.create("h264", "r")
        self._backlog += 1
        future = self._decoding.submit(self._decoder.decode, packet)
        loop = asyncio.get_running_loop()
        future.add_done_callback(lambda done: loop.call_soon_threadsafe(self._decoded, done))

    def _decoded(self, future: Future) -> None:
        self._backlog -= 1
        if self.closed or future.cancelled():
            return
        if future.exception() is not None:
            log.debug("WHIP decode failed", exc_info=future.exception())
            return
        for frame in future.result():
            self._on_frame(frame)

    async def _read_frames(self, track: MediaStreamTrack) -> None:
        try:
            while True:
                frame = await track.recv()
                self.last_media = self._clock()
                self._on_frame(frame)
        except MediaStreamError:
            pass  # the peer closed: connectionstatechange tells the streamer

    def send_prompt(self, message: dict[str, Any]) -> bool:
        """To the publisher's ``prompts`` channel, if it opened one (False: it simply broadcasts)."""
        channel = self._prompts
        if channel is None or channel.readyState != "open" or self.closed:
            return False
        channel.send(json.dumps(message))
        return True

    def request_keyframe(self) -> None:
        """A keyframe from the publisher (for the spectators, or after loss or a skipped GOP for the relay's
        decoder): one PLI, coalesced with others in the window."""
        if self._payload_type is None or self._reader is not None:
            return  # VP8: aiortc's own decoder asks the publisher after loss; spectators get the relay's keyframes
        self._pli.request()

    async def close(self) -> None:
        """Close the publisher's peer and every task of it; safe to call twice."""
        if self.closed:
            return
        self.closed = True
        self.ready.set()  # as when gone: no waiting stream start outlives the session
        if self.path is not None:
            metrics.WHIP_PUBLISHERS.labels(path=self.path).dec()
        await self._pli.close()
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        if self._decoding is not None:  # waits for the decode in flight, off the loop (a big picture's takes long)
            await asyncio.to_thread(self._decoding.shutdown, wait=True, cancel_futures=True)
        if self._pc is not None:
            await self._pc.close()


def publisher_conflict(session_id: str) -> RelayError:
    return RelayError("PUBLISHER_CONNECTED", 409, "This connection already has a publisher: one at a time.",
                      action="DELETE the publishing session first (its Location), or wait for it to time out.",
                      details={"session_id": session_id})
