"""A cluster edge's one feed from a broadcast's origin: a WHEP client that never decodes.

The edge POSTs a recvonly WHEP offer to the origin (as a node: the origin counts it nowhere), and
the origin sends it the broadcast's RTP like any spectator's. The receiver is hooked
(aiortc_hooks.receive_rtp_undecoded): each RTP packet goes to an :class:`H264Depacketizer`, and each
access unit it completes is published as an ``av.Packet`` into the edge's media graph, whose
fan-out serves the edge's spectators (NACKs from its own history). aiortc's receiver still sends
the origin receiver reports (the origin's sign of life) and NACKs for gaps. The edge's spectators'
keyframe requests arrive here through the graph and go upstream as one PLI at most every
KEYFRAME_MIN_INTERVAL (pli.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable
from urllib.parse import urljoin

import aiohttp
import av
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.rtp import RtpPacket
from aiortc.sdp import SessionDescription

from .. import metrics
from ..errors import RelayError, not_found
from .aiortc_hooks import receive_rtp_undecoded, send_picture_loss
from .depacketizer import H264Depacketizer
from .pli import PliCoalescer
from .webrtc import h264_preferences

log = logging.getLogger(__name__)

DELETE_SECONDS = 2.0  # telling the origin we left is a courtesy: its own timeout drops us anyway


class EdgeFeed:
    def __init__(
        self,
        whep_url: str,
        authorization: str,
        http: aiohttp.ClientSession,
        *,
        publish: Callable[[av.Packet, bool], None],
        on_lost: Callable[[], None],
        timeout: float,
        on_latency: Callable[[float], None] | None = None,
    ) -> None:
        self._url = whep_url
        self._authorization = authorization
        self._http = http
        self._publish = publish
        self._on_lost = on_lost  # the origin's peer went away (failed or closed) without us closing it
        self._timeout = timeout
        self._on_latency = on_latency  # first packet of a frame in -> the frame sent to every local spectator
        self._frame_started: float | None = None
        self._pc: RTCPeerConnection | None = None
        self._receiver = None
        self._location: str | None = None
        self._payload_type: int | None = None
        self._depacketizer = H264Depacketizer(self._on_frame, self.request_keyframe, clock=time.monotonic)
        # The receiver exists before the first packet names the SSRC, so before any PLI is sent.
        self._pli = PliCoalescer(lambda ssrc: send_picture_loss(self._receiver, ssrc), name="relay-edge-pli")
        self.packets = 0
        self.closed = False

    @property
    def frames(self) -> int:
        return self._depacketizer.frames

    @property
    def plis_sent(self) -> int:
        return self._pli.sent

    async def open(self) -> None:
        """Offer, POST to the origin, apply its answer (ICE and DTLS then complete on their own)."""
        pc = self._pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        metrics.track_peer(pc)
        transceiver = pc.addTransceiver("video", direction="recvonly")
        transceiver.setCodecPreferences(h264_preferences())
        self._receiver = transceiver.receiver
        receive_rtp_undecoded(self._receiver, self._on_rtp)  # before the answer starts the receiver

        @pc.on("connectionstatechange")
        def on_state() -> None:
            if pc.connectionState in ("failed", "closed") and not self.closed:
                log.info("edge feed lost its origin", extra={"url": self._url})
                self._on_lost()

        await pc.setLocalDescription(await pc.createOffer())  # aiortc gathers before returning
        headers = {"Content-Type": "application/sdp", "Authorization": self._authorization}
        try:
            async with self._http.post(self._url, data=pc.localDescription.sdp, headers=headers,
                                       timeout=aiohttp.ClientTimeout(total=self._timeout)) as response:
                body = await response.text()
                if response.status == 404:
                    raise not_found("broadcast", self._url.rsplit("/", 2)[-2])
                if response.status != 201:
                    raise RelayError("ORIGIN_UNAVAILABLE", 502, f"The broadcast's origin refused this node's feed "
                                     f"({response.status}).", action="Retry, or join at the origin.",
                                     details={"origin_status": response.status})
                self._location = urljoin(self._url, response.headers.get("Location", ""))
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise RelayError("ORIGIN_UNAVAILABLE", 503, "The broadcast's origin cannot be reached.",
                             action="Retry in a moment.", retry_after=2) from exc
        answer = SessionDescription.parse(body)
        h264 = [c.payloadType for m in answer.media if m.kind == "video"
                for c in m.rtp.codecs if c.mimeType.lower() == "video/h264"]
        self._payload_type = h264[0] if h264 else None
        await pc.setRemoteDescription(RTCSessionDescription(body, "answer"))

    def _on_rtp(self, packet: RtpPacket) -> None:
        if packet.payload_type != self._payload_type or self.closed:
            return  # not the H.264 stream (the origin sends no RTX: it resends with the original type)
        self._pli.media(packet.ssrc)
        self.packets += 1
        if self._frame_started is None:
            self._frame_started = time.perf_counter()
        frames = self._depacketizer.frames
        # A frame completes (and is fanned out, synchronously) inside this call, at its marker.
        self._depacketizer.add(packet.sequence_number, packet.timestamp, packet.marker, packet.payload)
        if self._depacketizer.frames != frames:
            if self._on_latency is not None:
                self._on_latency(time.perf_counter() - self._frame_started)
            self._frame_started = None

    def _on_frame(self, packet: av.Packet, keyframe: bool) -> None:
        self._publish(packet, keyframe)

    def request_keyframe(self) -> None:
        """A keyframe for the edge's spectators: one PLI upstream, coalesced with others in the window."""
        self._pli.request()

    async def close(self) -> None:
        """Leave the origin (DELETE, bounded) and close the peer; safe to call twice."""
        if self.closed:
            return
        self.closed = True
        await self._pli.close()
        if self._location is not None:
            try:
                async with self._http.delete(self._location, headers={"Authorization": self._authorization},
                                             timeout=aiohttp.ClientTimeout(total=DELETE_SECONDS)) as response:
                    await response.read()
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
        if self._pc is not None:
            await self._pc.close()
