"""One hosted stream's video as a MediaStreamTrack, re-timed on the relay's clock."""

from __future__ import annotations

import asyncio
from collections import deque

from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from ..base import VIDEO_CLOCK_RATE, VIDEO_TIME_BASE

TRACK_QUEUE_FRAMES = 4  # frames a slow consumer may fall behind before the oldest are dropped


class HostedTrack(MediaStreamTrack):
    """One stream's video: the upstream's decoded frames while the stream is live, pts on our clock."""

    kind = "video"

    def __init__(self, stall_timeout: float = 10.0, source: str = "the hosted world model") -> None:
        super().__init__()
        self._stall = stall_timeout
        self._source = source  # named in the error a stall ends the stream with
        self._frames: deque = deque()
        self._wake = asyncio.Event()
        self.error: str | None = None
        self._start: float | None = None
        self._last_pts = -1
        self.received = 0
        self.dropped = 0

    def push(self, frame) -> None:
        if self.readyState != "live" or self.error is not None:
            return
        if len(self._frames) >= TRACK_QUEUE_FRAMES:
            self._frames.popleft()  # a slow consumer loses the oldest frame, never the newest
            self.dropped += 1
        self._frames.append(frame)
        self.received += 1
        self._wake.set()

    def fail(self, reason: str) -> None:
        """End this track: the consumer's next recv raises MediaStreamError (the stream failed upstream)."""
        if self.error is None:
            self.error = reason
            self._frames.clear()
            self._wake.set()

    async def recv(self):
        while True:
            if self.readyState != "live":
                raise MediaStreamError
            if self.error is not None:
                raise MediaStreamError(self.error)
            if self._frames:
                break
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self._stall)
            except asyncio.TimeoutError:
                self.fail(f"no video from {self._source} for {self._stall:g} s")
        frame = self._frames.popleft()
        now = asyncio.get_running_loop().time()
        if self._start is None:
            self._start = now
        pts = max(round((now - self._start) * VIDEO_CLOCK_RATE), self._last_pts + 1)
        self._last_pts = pts
        frame.pts = pts
        frame.time_base = VIDEO_TIME_BASE
        return frame

    def stop(self) -> None:
        super().stop()
        self._frames.clear()
        self._wake.set()

