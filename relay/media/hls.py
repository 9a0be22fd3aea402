"""A live HLS rendition of a broadcast, cut from the packets the spectators get (a hub sink).

WebRTC costs the relay a little per spectator; HLS costs it nothing per viewer: the same
H.264 packets, already encoded once, are muxed into MPEG-TS segments cut at keyframes, and a
sliding playlist names the last few: plain HLS v3 that Chromium's <video> and ffmpeg's player
follow (the tests use both), which a CDN in front of the relay can serve to any audience. The price is latency:
about three segments (a few seconds) behind the WebRTC spectators.

- A segment starts on a keyframe (every keyframe carries SPS/PPS) and is cut at the first
  keyframe at least half of ``target_seconds`` (the keyframe interval) after its start. The
  periodic keyframes cut every interval; a forced one (a WebRTC spectator joining) cuts only
  if the segment is already half long, else the next periodic one (an interval after the
  forced keyframe: x264 restarts its count) does. So a segment never exceeds 1.5 intervals,
  and ``#EXT-X-TARGETDURATION`` is that bound, fixed, as RFC 8216 requires.
- Timestamps are the hub's broadcast clock, continuous across streams; a new stream is still
  marked ``#EXT-X-DISCONTINUITY`` (its size may differ: portrait, another source).
- Memory is bounded: the playlist lists at least ``window`` segments and at least three target
  durations of them (RFC 8216 6.2.2), and a few older ones stay fetchable for players that read
  the playlist just before it moved on.

Muxing is a per-packet append into an in-memory MPEG-TS container (microseconds; no encode), so
it runs on the event loop like the RTP fan-out.
"""

from __future__ import annotations

import asyncio
import io
import logging
import math
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Callable

import av

from ..worldmodel.base import VIDEO_TIME_BASE

HLS_READERS_KEPT = 10_000     # addresses remembered as HLS viewers, at most
READER_TARGET_DURATIONS = 3   # a player that has not re-read the playlist in this many is gone

log = logging.getLogger(__name__)

CLOCK_RATE = 90000
KEEP_AFTER_WINDOW = 3  # segments that left the playlist but may still be fetched
MAX_LISTED = 60  # however short forced keyframes make segments, the playlist stops here
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
    def __init__(self, *, target_seconds: float, window: int = 6, fps: int = 25,
                 on_segment: Callable[[], None] = lambda: None) -> None:
        self.target_ticks = round(max(0.5, target_seconds) * CLOCK_RATE)
        # Fixed for the playlist's life: the longest a segment can be (see the module notes).
        self.target_duration = max(1, math.ceil(1.5 * self.target_ticks / CLOCK_RATE))
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
        self._on_segment = on_segment
        # Who read the playlist lately (address -> when), oldest first: the host's count of HLS
        # viewers. A CDN in front counts as one; bounded so a crowd of addresses costs little.
        self._readers: OrderedDict[str, float] = OrderedDict()
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

    def write(self, packet: av.Packet, keyframe: bool) -> None:
        """A hub sink: takes each published packet; never blocks, never raises into the hub (which
        feeds every spectator): anything wrong loses this segment, never the broadcast. (The media
        graph attaches it only where the hub carries packets, not the frames of per-spectator mode.)"""
        if self.closed or packet.pts is None:
            return
        try:
            self._write(packet, int(packet.pts), keyframe)
        except Exception:
            log.exception("HLS: a segment was dropped")
            self._drop_segment()

    def _write(self, packet: av.Packet, pts: int, keyframe: bool) -> None:
        if self._container is not None and keyframe and 2 * (pts - self._first_pts) >= self.target_ticks:
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
        self._container.mux(out)
        self._last_pts = pts

    def close(self) -> None:
        self.closed = True
        self._drop_segment()
        self._segments.clear()
        self._startable.set()  # nobody waits on a broadcast that is gone

    # -- HTTP side -----------------------------------------------------------------------

    def playlist(self, segment_query: str = "") -> str:
        """The live media playlist; each segment URI carries ``segment_query`` (the token)."""
        stored = list(self._segments)
        count = self._listed()
        listed = stored[len(stored) - count:]
        skipped = stored[: len(stored) - count]
        discontinuity_sequence = self._discontinuities + sum(s.discontinuity for s in skipped)
        lines = [
            "#EXTM3U",
            "#EXT-X-VERSION:3",
            f"#EXT-X-TARGETDURATION:{self.target_duration}",
            f"#EXT-X-MEDIA-SEQUENCE:{listed[0].sequence if listed else self._next_sequence}",
            f"#EXT-X-DISCONTINUITY-SEQUENCE:{discontinuity_sequence}",
        ]
        for segment in listed:
            if segment.discontinuity:
                lines.append("#EXT-X-DISCONTINUITY")
            lines.append(f"#EXTINF:{segment.duration:.3f},")
            lines.append(f"{segment.sequence}.ts{segment_query}")
        return "\n".join(lines) + "\n"

    def note_reader(self, address: str, now: float) -> None:
        """A player read the playlist (players re-read it every target duration while they play)."""
        self._readers[address] = now
        self._readers.move_to_end(address)
        while len(self._readers) > HLS_READERS_KEPT:
            self._readers.popitem(last=False)

    def readers(self, now: float) -> int:
        """Addresses that read the playlist within the last few target durations: HLS viewers now."""
        horizon = now - READER_TARGET_DURATIONS * self.target_duration
        while self._readers and next(iter(self._readers.values())) < horizon:
            self._readers.popitem(last=False)
        return len(self._readers)

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
        # A size unknown here (a cluster edge forwards packets it never decodes) is left out: MPEG-TS
        # carries none, players read it from the stream's SPS.
        size = {"width": width, "height": height} if width and height else {}
        self._stream = self._container.add_mux_stream("h264", rate=CLOCK_RATE // self._frame_ticks, **size)
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
        self._on_segment()
        if len(self._segments) >= MIN_SEGMENTS:
            self._startable.set()
        while len(self._segments) > self._keep():
            if self._segments.popleft().discontinuity:
                self._discontinuities += 1

    def _listed(self) -> int:
        """How many of the newest segments the playlist lists: at least ``window`` of them and at
        least three target durations' worth (RFC 8216 6.2.2), at most MAX_LISTED."""
        count, seconds = 0, 0.0
        for segment in reversed(self._segments):
            if count >= MAX_LISTED or (count >= self.window and seconds >= 3 * self.target_duration):
                break
            count += 1
            seconds += segment.duration
        return count

    def _keep(self) -> int:
        return self._listed() + KEEP_AFTER_WINDOW

    def _drop_segment(self) -> None:
        container, self._container, self._stream, self._buffer = self._container, None, None, None
        if container is not None:
            try:
                container.close()
            except av.error.FFmpegError:
                pass
