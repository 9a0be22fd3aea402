"""The relay as the SDK's *streamer*: one WebRTC peer per signalling session, and the relay offers.

The SDK is always the answerer (it never calls createOffer): the streamer sends one offer with a
sendonly video track and the two data channels, created before the offer (in-band, so the SDK's
``ondatachannel`` fires). The video is the connection's broadcast, taken the way a spectator takes
it (the owner is a spectator that also controls): in the default ``encode-once`` mode an idle track
on aiortc's sender while the broadcast's RtpFanout writes the shared packets; in the other modes a
track from the broadcast's hub. Either way no encode happens here, and the owner is not one of the
broadcast's spectators (it is not counted, nor capped).

aiortc gathers every candidate into the offer's SDP, which the SDK accepts as is; the SDK trickles its
own (its answer has none) and never signals their end, so the caller keeps its own connect deadline.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.rtcconfiguration import RTCBundlePolicy
from aiortc.rtcdatachannel import RTCDataChannel

from ..broadcast import Broadcast, MediaFeed
from ..errors import RelayError
from ..inputs import parse_json
from ..media.webrtc import h264_preferences
from ..worldmodel import hosted_protocol as protocol

log = logging.getLogger(__name__)

PENDING_MESSAGES_MAX = 64  # what waits for streamerToClient to open; the SDK opens it within a second


class OwnerPeer:
    """The streamer side of one SDK session: offer, answer, candidates, data channels, teardown."""

    def __init__(
        self,
        broadcast: Broadcast,
        *,
        on_message: Callable[[dict[str, Any]], None],
        on_state: Callable[[str], None],
        max_json_depth: int,  # [server] max_json_depth: the data channel is parsed as the socket is
    ) -> None:
        self._broadcast = broadcast
        self._max_json_depth = max_json_depth
        self._on_message = on_message
        # max-bundle: one ICE transport for video and data, and one gathering for the offer.
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[], bundlePolicy=RTCBundlePolicy.MAX_BUNDLE))
        self._feed: MediaFeed | None = None
        self._pending: list[str] = []
        self.answered = False
        self.closed = False
        self.to_client: RTCDataChannel | None = None
        self.from_client: RTCDataChannel | None = None

        @self.pc.on("connectionstatechange")
        def state_changed() -> None:
            on_state(self.pc.connectionState)

    async def create_offer(self) -> str:
        """Video first (its m-line carries the bundle), then both channels; returns the offer's SDP."""
        feed = self._feed = self._broadcast.media_feed()
        transceiver = self.pc.addTransceiver(feed.track, direction="sendonly")
        transceiver.setCodecPreferences(h264_preferences())  # the shared encoder's H.264, nothing else
        # PLI/FIR from the SDK's browser reach the shared encoder, as a spectator's do.
        feed.attach(transceiver.sender)

        self.from_client = self.pc.createDataChannel(protocol.CLIENT_TO_STREAMER)
        self.to_client = self.pc.createDataChannel(protocol.STREAMER_TO_CLIENT)
        self.from_client.on("message", self._received)

        @self.to_client.on("open")
        def flush() -> None:
            pending, self._pending = self._pending, []
            for data in pending:
                self._send_now(data)

        await self.pc.setLocalDescription(await self.pc.createOffer())  # gathers every candidate
        return self.pc.localDescription.sdp

    async def accept_answer(self, sdp: str) -> None:
        if self.answered:
            raise ValueError("an answer was already applied")
        self.answered = True
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp, "answer"))

    async def add_candidate(self, message: dict[str, Any]) -> None:
        """A trickled `ice_candidate` from the SDK (ignored before the answer and when empty)."""
        candidate = protocol.parse_candidate(message)
        if candidate is None or self.pc.remoteDescription is None:
            return
        await self.pc.addIceCandidate(candidate)

    def send(self, message: dict[str, Any]) -> None:
        """One JSON text message on streamerToClient; held until the channel opens (bounded)."""
        data = json.dumps(message)
        channel = self.to_client
        if channel is not None and channel.readyState == "open":
            self._send_now(data)
        elif channel is not None and channel.readyState == "connecting" and len(self._pending) < PENDING_MESSAGES_MAX:
            self._pending.append(data)
        else:
            log.info("odyssey: dropped %s, streamerToClient is not open", message.get("type"))

    def _send_now(self, data: str) -> None:
        try:
            self.to_client.send(data)  # type: ignore[union-attr]
        except Exception:  # closed under us: the session is ending anyway
            log.info("odyssey: streamerToClient refused a message", exc_info=True)

    def _received(self, data: Any) -> None:
        if not isinstance(data, str):
            return
        try:
            message = parse_json(data, self._max_json_depth)
        except RelayError as err:  # answered where the SDK shows refusals; the channel stays open
            self.send(protocol.stream_error_from(err))
            return
        if isinstance(message, dict):
            self._on_message(message)

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._pending.clear()
        if self._feed is not None:
            self._feed.close()
        await self.pc.close()
