"""The WHIP world model: a connection's video comes from a live publisher (OBS, GStreamer, a browser,
a self-hosted world model) that pushes it to the relay over WHIP (RFC 9725).

Opening a connection reserves a *publish slot* (a :class:`WhipStreamer`) with its own publish token;
the publisher POSTs its offer to the connection's ``whip_url`` (relay/api/whip.py) and one
:class:`~relay.media.whip_ingest.Ingest` at a time receives it. A stream the host starts carries what
the publisher sends: H.264 as packets (an :class:`EncodedTrack`, never decoded), VP8 as decoded frames
the stream's pipeline encodes once. The stream's start, the host's and the audience's prompts and its
end reach the publisher on its ``prompts`` data channel as the hosted protocol's messages, so a
self-hosted model is steered as the built-in one is. A publisher silent for ``silence_seconds`` (or
whose peer went away) fails the stream: the reaper ends it ``upstream_error`` and the slot is free
for the publisher's next session, which the next stream carries.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
import time
from typing import Callable

import av
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from ..errors import RelayError, not_found
from ..media.whip_ingest import PASSTHROUGH, Ingest, parse_publish_offer, publisher_conflict
from . import hosted_protocol as protocol
from .base import EncodedTrack
from .hosted.track import HostedTrack

PUBLISHER = "the WHIP publisher"


class PassThroughTrack(EncodedTrack):
    """One stream of a publisher's H.264: its access units go to the graph as they arrive, from the first keyframe."""

    def __init__(self, ingest: Ingest, silence_seconds: float, clock: Callable[[], float]) -> None:
        super().__init__()
        self._ingest = ingest
        self._silence = silence_seconds
        self._clock = clock
        self._started = clock()
        self._publish: Callable[[av.Packet, bool], None] | None = None
        self._keyframe_seen = False

    def attach(self, publish: Callable[[av.Packet, bool], None] | None) -> None:
        self._publish = publish
        if publish is not None:
            self._ingest.request_keyframe()  # the stream starts at the publisher's next keyframe: ask for it now

    def push(self, packet: av.Packet, keyframe: bool) -> None:
        if self._publish is None or self.readyState != "live":
            return
        self._keyframe_seen = self._keyframe_seen or keyframe
        if self._keyframe_seen:  # a stream's packets start at a keyframe: what came before cannot be decoded
            self._publish(packet, keyframe)

    def request_keyframe(self) -> None:
        self._ingest.request_keyframe()

    @property
    def failed(self) -> BaseException | None:
        if self._ingest.gone or self._ingest.closed:
            return MediaStreamError(f"{PUBLISHER} went away")
        silent = self._clock() - max(self._ingest.last_media, self._started)
        if silent >= self._silence:
            return MediaStreamError(f"no video from {PUBLISHER} for {self._silence:g} s")
        return None

    def stop(self) -> None:
        super().stop()
        self._publish = None


def connection_closed() -> RelayError:
    return RelayError("NOT_FOUND", 404, "This connection is closed.", action="Open a new connection.")


class WhipStreamer:
    """One connection's publish slot: its token, its publisher (one at a time) and its live stream."""

    def __init__(self, *, silence_seconds: float, max_candidates: int, connect_seconds: float = 10.0,
                 clock: Callable[[], float] = time.monotonic,
                 on_disconnect: Callable[["WhipStreamer"], None] = lambda _: None) -> None:
        self._on_disconnect = on_disconnect
        self.publish_token = secrets.token_urlsafe(24)
        self._silence = silence_seconds
        # A session that has sent nothing for this long (never connected, or went quiet) holds the slot no
        # more: a publisher that crashed without its DELETE can come back at once.
        self._stale = max(silence_seconds, connect_seconds)
        self._max_candidates = max_candidates
        self._clock = clock
        self.ingest: Ingest | None = None
        self._track: PassThroughTrack | HostedTrack | None = None
        self._stream_ingest: Ingest | None = None  # the session the live stream carries (a later one never)
        self._disconnected = False
        self._drops: set[asyncio.Task] = set()  # sessions whose publisher went, being closed

    def check_token(self, token: str | None) -> bool:
        return token is not None and hmac.compare_digest(token.encode(), self.publish_token.encode())

    # -- publishing (the WHIP resource) ----------------------------------------------------

    async def publish(self, offer_sdp: str) -> tuple[str, str]:
        """(session id, answer SDP) for a publisher's offer; 409 while another one is publishing."""
        if self._disconnected:
            raise connection_closed()
        current = self.ingest
        if current is not None:
            if not (current.gone or current.closed or self._clock() - current.last_media >= self._stale):
                raise publisher_conflict(current.session_id)
            await self._drop(current)  # a dead session's slot is free for the publisher's next one
            if self._disconnected:
                raise connection_closed()
            if self.ingest is not None:  # another POST took the slot while the dead session closed
                raise publisher_conflict(self.ingest.session_id)
        codec = parse_publish_offer(offer_sdp, self._max_candidates)
        ingest = self.ingest = Ingest(on_packet=self._on_packet, on_frame=self._on_frame,
                                      on_gone=self._on_gone, max_candidates=self._max_candidates,
                                      clock=self._clock)  # reserved before awaiting
        try:
            answer = await ingest.answer(offer_sdp, codec)
        except BaseException as exc:
            # Closed under it (the connection closed, or DELETE): whatever answer() raised came of that.
            ended = self.ingest is not ingest or ingest.closed or self._disconnected
            if self.ingest is ingest:
                self.ingest = None
            await ingest.close()
            if ended and isinstance(exc, Exception):
                raise connection_closed() from exc
            raise
        if self.ingest is not ingest or self._disconnected:  # closed while answering: nothing may outlive it
            await ingest.close()
            raise connection_closed()
        return ingest.session_id, answer

    def session(self, session_id: str) -> Ingest:
        ingest = self.ingest
        if ingest is None or not hmac.compare_digest(ingest.session_id.encode(), session_id.encode()):
            raise not_found("session", session_id)
        return ingest

    async def unpublish(self, session_id: str) -> None:
        """DELETE: the publisher leaves; a live stream it fed fails and ends upstream_error."""
        await self._drop(self.session(session_id))

    async def _drop(self, ingest: Ingest) -> None:
        if self.ingest is ingest:
            self.ingest = None
        self._on_gone_of(ingest)
        await ingest.close()

    # Only the current session is open to call these; it feeds the live stream only if that stream is its own
    # (a publisher back before its old stream ended waits for the next stream).
    def _on_packet(self, packet: av.Packet, keyframe: bool) -> None:
        if isinstance(self._track, PassThroughTrack) and self._stream_ingest is self.ingest:
            self._track.push(packet, keyframe)

    def _on_frame(self, frame: av.VideoFrame) -> None:
        if isinstance(self._track, HostedTrack) and self._stream_ingest is self.ingest:
            self._track.push(frame)

    def _on_gone(self) -> None:
        ingest = self.ingest
        if ingest is None:
            return
        self._on_gone_of(ingest)
        # Its peer, tasks, decoder thread and gauge go now, not when a next POST or the stream's end finds it.
        drop = asyncio.get_running_loop().create_task(self._drop(ingest), name="relay-whip-drop")
        self._drops.add(drop)
        drop.add_done_callback(self._drops.discard)

    def _on_gone_of(self, ingest: Ingest) -> None:
        if isinstance(self._track, HostedTrack) and self._stream_ingest is ingest:
            self._track.fail(f"{PUBLISHER} went away")
        # a PassThroughTrack reads the ingest's state itself (failed)

    # -- the world-model protocol ----------------------------------------------------------

    async def start_stream(self, prompt: str, image: bytes | None = None, portrait: bool = False) -> MediaStreamTrack:
        """The publisher's video from now on; 409 PUBLISHER_NOT_CONNECTED if none is publishing."""
        if self._disconnected:
            raise RuntimeError("streamer is disconnected")
        ingest = self.ingest
        if ingest is not None and not ingest.ready.is_set():  # its first keyframe tells how it will be carried
            try:
                await asyncio.wait_for(ingest.ready.wait(), self._stale)
            except asyncio.TimeoutError:
                pass
        if ingest is None or ingest is not self.ingest or ingest.gone or ingest.closed or ingest.path is None:
            raise RelayError("PUBLISHER_NOT_CONNECTED", 409, "No publisher is sending video to this connection.",
                             action="POST a WHIP offer to the connection's whip_url with its publish_token, "
                                    "then start the stream.")
        self._stream_ingest = ingest
        if ingest.path == PASSTHROUGH:
            track = self._track = PassThroughTrack(ingest, self._silence, self._clock)
        else:
            track = self._track = HostedTrack(stall_timeout=self._silence, source=PUBLISHER)
        ingest.send_prompt({"type": protocol.STREAM_START, "prompt": prompt.strip(), "portrait": portrait})
        return track

    async def interact(self, prompt: str) -> str:
        track = self._track
        if track is None or track.readyState != "live":
            raise RuntimeError("no stream is running")
        prompt = prompt.strip()
        if self._stream_ingest is not None:  # the stream's own publisher steers it
            self._stream_ingest.send_prompt({"type": protocol.UPDATE, "prompt": prompt})
        return prompt

    async def end_stream(self) -> None:
        track, self._track = self._track, None
        ingest, self._stream_ingest = self._stream_ingest, None
        if track is None:
            return
        track.stop()
        if ingest is None or ingest is not self.ingest:
            return  # its session is gone already, perhaps replaced by the publisher's next one: not ours to drop
        failed = track.failed if isinstance(track, PassThroughTrack) else track.error
        if failed:  # silent or gone: its slot is freed for the publisher's next session
            await self._drop(ingest)
        else:
            ingest.send_prompt({"type": protocol.STREAM_END})

    async def disconnect(self) -> None:
        """The connection closed: the stream ends and the publisher's peer closes (safe to call twice)."""
        self._disconnected = True
        self._on_disconnect(self)
        await self.end_stream()
        if self.ingest is not None:
            await self._drop(self.ingest)
        await asyncio.gather(*self._drops, return_exceptions=True)


class WhipWorldModel:
    """Unlimited publish slots (the [limits] streamers pool bounds them); each closes with its connection."""

    def __init__(self, *, silence_seconds: float, max_candidates: int, connect_seconds: float = 10.0) -> None:
        self._silence = silence_seconds
        self._max_candidates = max_candidates
        self._connect = connect_seconds
        self._streamers: set[WhipStreamer] = set()

    async def connect(self) -> WhipStreamer:
        streamer = WhipStreamer(silence_seconds=self._silence, max_candidates=self._max_candidates,
                                connect_seconds=self._connect, on_disconnect=self._streamers.discard)
        self._streamers.add(streamer)
        return streamer

    async def close(self) -> None:
        streamers, self._streamers = list(self._streamers), set()
        for streamer in streamers:
            await streamer.disconnect()
