"""A live HLS rendition of a broadcast, cut from the packets the spectators get (a hub sink).

WebRTC costs the relay a little per spectator; HLS costs it nothing per viewer: the same
H.264 packets, already encoded once, are muxed into MPEG-TS segments cut at keyframes, and a
sliding playlist names the last few: plain HLS v3 that Chromium's <video> and ffmpeg's player
follow (the tests use both), which a CDN in front of the relay can serve to any audience. The price is latency:
about three segments (a few seconds) behind the WebRTC spectators.

- A segment starts on a keyframe (every keyframe carries SPS/PPS) and is cut at the first
  keyframe at least ``target_seconds`` after its start; forced keyframes in between (a WebRTC
  spectator joining) do not make short segments.
- Timestamps are the hub's broadcast clock, continuous across streams; a new stream is still
  marked ``#EXT-X-DISCONTINUITY`` (its size may differ: portrait, another source).
- Memory is bounded: the playlist lists ``window`` segments and a few older ones stay
  fetchable for players that read the playlist just before it moved on.

Muxing is a per-packet append into an in-memory MPEG-TS container (microseconds; no encode), so
it runs on the event loop like the RTP fan-out.
"""

from __future__ import annotations

import asyncio
import io
import math
from collections import deque
from dataclasses import dataclass
from typing import Any

import av

from .encoder import VIDEO_TIME_BASE

CLOCK_RATE = 90000
KEEP_AFTER_WINDOW = 3  # segments that left the playlist but may still be fetched
# The first playlist is held until it lists this many: a live client starts about three target
# durations from the end (RFC 8216 6.3.3), and Chromium's built-in HLS gives up on fewer.
MIN_SEGMENTS = 3


@dataclass(frozen=True)
class Segment:
    sequence: int
    duration: float  # seconds
    data: bytes
    discontinuity: bool


class HlsPublisher:
    def __init__(self, *, target_seconds: float, window: int = 6, fps: int = 25) -> None:
        self.target_ticks = round(max(0.5, target_seconds) * CLOCK_RATE)
        self.window = window
        self._frame_ticks = CLOCK_RATE // max(1, fps)
        self._segments: deque[Segment] = deque()
        self._next_sequence = 0
        self._discontinuities = 0  # before the first listed segment: EXT-X-DISCONTINUITY-SEQUENCE
        self._discontinuity_pending = False
        # The segment being written.
        self._buffer: io.BytesIO | None = None
        self._container: Any = None
        self._stream: Any = None
        self._first_pts = 0
        self._last_pts = 0
        self._size: tuple[int, int] = (0, 0)
        self._startable = asyncio.Event()
        self.closed = False

    # -- hub side ------------------------------------------------------------------------

    def new_stream(self, width: int, height: int, fps: int) -> None:
        """The next stream begins: its first keyframe opens a new segment, marked discontinuous."""
        self._finish_segment()
        self._size = (width, height)
        self._frame_ticks = CLOCK_RATE // max(1, fps)
        self._discontinuity_pending = self._next_sequence > 0

    def end_stream(self) -> None:
        """The stream ended: publish its last (short) segment now rather than when the next starts."""
        self._finish_segment()

    def write(self, packet: Any, keyframe: bool) -> None:
        """A hub sink: takes each published packet; never blocks, never raises into the hub."""
        if self.closed or not isinstance(packet, av.Packet) or packet.pts is None:
            return
        pts = int(packet.pts)
        # A keyframe up to one frame early still cuts: the encoder's GOP is a whole number of frames.
        if self._container is not None and keyframe and pts - self._first_pts >= self.target_ticks - self._frame_ticks:
            self._finish_segment()
        if self._container is None:
            if not keyframe:
                return  # a segment must start where a player can start decoding
            self._open_segment(pts)
        out = av.Packet(bytes(packet))
        out.pts = out.dts = pts
        out.time_base = VIDEO_TIME_BASE
        out.is_keyframe = keyframe
        out.stream = self._stream
        try:
            self._container.mux(out)
        except av.error.FFmpegError:
            self._drop_segment()  # an odd packet loses this segment, never the broadcast
            return
        self._last_pts = pts

    def close(self) -> None:
        self.closed = True
        self._drop_segment()
        self._segments.clear()
        self._startable.set()  # nobody waits on a broadcast that is gone

    # -- HTTP side -----------------------------------------------------------------------

    def playlist(self, segment_query: str = "") -> str:
        """The live media playlist; each segment URI carries ``segment_query`` (the token)."""
        listed = list(self._segments)[-self.window:]
        skipped = list(self._segments)[: len(self._segments) - len(listed)]
        discontinuity_sequence = self._discontinuities + sum(s.discontinuity for s in skipped)
        target = max([math.ceil(s.duration) for s in listed] or [math.ceil(self.target_ticks / CLOCK_RATE)])
        lines = [
            "#EXTM3U",
            "#EXT-X-VERSION:3",
            f"#EXT-X-TARGETDURATION:{target}",
            f"#EXT-X-MEDIA-SEQUENCE:{listed[0].sequence if listed else self._next_sequence}",
            f"#EXT-X-DISCONTINUITY-SEQUENCE:{discontinuity_sequence}",
        ]
        for segment in listed:
            if segment.discontinuity:
                lines.append("#EXT-X-DISCONTINUITY")
            lines.append(f"#EXTINF:{segment.duration:.3f},")
            lines.append(f"{segment.sequence}.ts{segment_query}")
        return "\n".join(lines) + "\n"

    async def wait_for_segments(self, timeout: float) -> None:
        """Until the first MIN_SEGMENTS segments exist (at most ``timeout`` s): a playlist with fewer
        is valid HLS, but players (Chromium's built-in one) give up on it instead of reloading."""
        if not self._startable.is_set() and not self.closed:
            try:
                async with asyncio.timeout(timeout):
                    await self._startable.wait()
            except TimeoutError:
                pass

    def segment(self, sequence: int) -> Segment | None:
        for segment in self._segments:
            if segment.sequence == sequence:
                return segment
        return None

    @property
    def segments(self) -> int:
        return len(self._segments)

    # -- segments ------------------------------------------------------------------------

    def _open_segment(self, pts: int) -> None:
        self._buffer = io.BytesIO()
        self._container = av.open(self._buffer, "w", format="mpegts")
        width, height = self._size
        self._stream = self._container.add_mux_stream("h264", rate=CLOCK_RATE // self._frame_ticks,
                                                      width=width or None, height=height or None)
        self._stream.time_base = VIDEO_TIME_BASE
        self._first_pts = self._last_pts = pts

    def _finish_segment(self) -> None:
        if self._container is None:
            return
        container, buffer = self._container, self._buffer
        self._container = self._stream = self._buffer = None
        try:
            container.close()
        except av.error.FFmpegError:
            return
        duration = (self._last_pts - self._first_pts + self._frame_ticks) / CLOCK_RATE
        self._segments.append(Segment(self._next_sequence, duration, buffer.getvalue(), self._discontinuity_pending))
        self._next_sequence += 1
        self._discontinuity_pending = False
        if len(self._segments) >= MIN_SEGMENTS:
            self._startable.set()
        while len(self._segments) > self.window + KEEP_AFTER_WINDOW:
            if self._segments.popleft().discontinuity:
                self._discontinuities += 1

    def _drop_segment(self) -> None:
        container, self._container, self._stream, self._buffer = self._container, None, None, None
        if container is not None:
            try:
                container.close()
            except av.error.FFmpegError:
                pass
