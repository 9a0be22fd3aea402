"""The fan-out hub: one per broadcast, outliving the streams that feed it.

The stream's pipeline publishes each encoded ``av.Packet`` once; the hub offers the same
object to every spectator's :class:`SpectatorTrack` through a small bounded queue.  aiortc's
RTCRtpSender then only packetizes it (no encode per spectator).

Rules that keep one spectator from hurting the others:
- a joining spectator starts on a keyframe (and asks for one, coalesced by the pipeline);
- a spectator whose queue is full drops everything up to the next keyframe and asks for one;
  nothing ever waits on a slow spectator, and memory per spectator is bounded;
- timestamps are rebased onto one continuous broadcast clock, so when the host starts the
  next stream the spectators' decoders see time move forward, not jump back to zero.

In ``per-spectator`` mode (kept for the benchmark) the hub carries decoded frames instead and
each RTCRtpSender encodes for itself.  A frame is always a valid starting point, so the same
"skip to the next keyframe" rule simply means "take the next frame".
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Callable, Union

import av
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from ..worldmodel.base import VIDEO_TIME_BASE

log = logging.getLogger(__name__)

Media = Union[av.Packet, av.VideoFrame]


class SpectatorTrack(MediaStreamTrack):
    """One spectator's view of the hub: an aiortc track whose recv() yields the shared media."""

    kind = "video"

    def __init__(self, hub: "FanoutHub", max_queue: int) -> None:
        super().__init__()
        self._hub = hub
        self._queue: deque[Media] = deque()
        self._max_queue = max_queue
        self._ready = asyncio.Event()
        self._waiting_for_keyframe = True
        self.delivered = 0
        self.dropped = 0

    def offer(self, item: Media, keyframe: bool) -> None:
        """Called by the hub for each published item; never blocks."""
        if self._waiting_for_keyframe:
            if not keyframe:
                self.dropped += 1
                return
            self._waiting_for_keyframe = False
        elif len(self._queue) >= self._max_queue:
            # Fallen behind: what is queued is stale and a partial GOP cannot be decoded
            # without its start, so restart cleanly from the next keyframe.
            self.dropped += len(self._queue) + 1
            self._queue.clear()
            self._waiting_for_keyframe = not keyframe
            if not keyframe:
                self._hub.request_keyframe()
                return
        self._queue.append(item)
        self._ready.set()

    def resync(self) -> None:
        """Forget what is queued and start again at the next keyframe (a new stream began)."""
        self._queue.clear()
        self._waiting_for_keyframe = True

    async def recv(self) -> Media:
        while not self._queue:
            if self.readyState != "live":
                raise MediaStreamError
            self._ready.clear()
            await self._ready.wait()
        self.delivered += 1
        return self._queue.popleft()

    def stop(self) -> None:
        if self.readyState == "live":
            super().stop()
            self._hub.unsubscribe(self)
        # Wake a pending recv() so the sender's loop sees the track ended.
        self._ready.set()


class FanoutHub:
    """Hands every published packet (or frame) to each subscribed spectator track."""

    def __init__(self, max_queue: int = 32, clock_of: "FanoutHub | None" = None) -> None:
        # A lower layer's hub takes the main hub's clock offset rather than rebasing by itself:
        # both layers then stamp a frame identically, so a spectator moved between them sees
        # time run on. (The pipeline publishes each frame to the main hub first.)
        self._leader = clock_of
        self._tracks: set[SpectatorTrack] = set()
        self._max_queue = max_queue
        self._keyframe_requester: Callable[[], None] | None = None
        # Broadcast clock: out_pts = offset + in_pts; bumped at each source switch.
        self._offset = 0
        self._last_out_pts = -1
        self._frame_duration = 3600
        self._need_rebase = True
        self._sinks: list[Callable[[Media, bool], None]] = []
        self.published = 0
        self.published_bytes = 0  # encoded bytes (packets only): the host console's bitrate

    @property
    def subscribers(self) -> int:
        return len(self._tracks)

    def subscribe(self) -> SpectatorTrack:
        track = SpectatorTrack(self, self._max_queue)
        self._tracks.add(track)
        self.request_keyframe()
        return track

    def unsubscribe(self, track: SpectatorTrack) -> None:
        self._tracks.discard(track)

    def add_sink(self, sink: Callable[[Media, bool], None]) -> None:
        """A reader that takes every published item synchronously (RTP fan-out, recorder)."""
        self._sinks.append(sink)

    def remove_sink(self, sink: Callable[[Media, bool], None]) -> None:
        if sink in self._sinks:
            self._sinks.remove(sink)

    def attach_source(self, keyframe_requester: Callable[[], None] | None, fps: int) -> None:
        """A new stream feeds the hub from now on; its first item must be a keyframe."""
        self._keyframe_requester = keyframe_requester
        self._frame_duration = 90000 // max(1, fps)
        self._need_rebase = True
        for track in self._tracks:
            track.resync()

    def detach_source(self) -> None:
        self._keyframe_requester = None

    def request_keyframe(self) -> None:
        if self._keyframe_requester is not None:
            self._keyframe_requester()

    def publish(self, item: Media, keyframe: bool) -> None:
        if item.pts is None:
            return
        if self._leader is not None:
            self._offset = self._leader._offset
        elif self._need_rebase:
            # Continue the broadcast clock one frame after the previous stream's last frame.
            self._offset = self._last_out_pts + self._frame_duration - item.pts
            if self._last_out_pts < 0:
                self._offset = -item.pts
            self._need_rebase = False
        item.pts = item.pts + self._offset
        if isinstance(item, av.Packet):
            item.dts = item.pts
        item.time_base = VIDEO_TIME_BASE
        self._last_out_pts = item.pts
        self.published += 1
        if isinstance(item, av.Packet):
            self.published_bytes += item.size
        for sink in self._sinks:
            sink(item, keyframe)
        for track in self._tracks:
            track.offer(item, keyframe)

    def close(self) -> None:
        for track in list(self._tracks):
            track.stop()
        self._tracks.clear()
        self._sinks.clear()
        self._keyframe_requester = None
