"""A media graph with no pipeline: what a broadcast needs of media/graph.py, and no thread at all.

Pass the class where a media factory goes (``Broadcast(..., media=FakeMedia)``,
``SessionManager(..., media=FakeMedia)``): the source track is held, never read (so a synthetic
track never starts its render thread), and a test decides when the upstream fails.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiortc.mediastreams import MediaStreamTrack

from relay.clock import Clock
from relay.config import Settings
from relay.media.graph import MediaFeed, RecorderFactory
from relay.media.rtp_fanout import IdleVideoTrack


@dataclass
class FakeHub:
    """What a broadcast reads of its hub: how much was published (a test moves the counts)."""
    published: int = 0
    published_bytes: int = 0

    def add_sink(self, sink) -> None:  # nothing is published: a sink (the live thumbnail) never hears
        pass


class FakeMedia:
    hls = None
    recorder = None  # the live stream's: none here
    keyframes_forced = 0

    def __init__(self, settings: Settings, clock: Clock, recorder: RecorderFactory | None = None) -> None:
        self.source: MediaStreamTrack | None = None
        self.source_failed: BaseException | None = None  # set by a test: the upstream died
        self.sources: list[tuple[str, int, int, int]] = []  # (stream_id, width, height, fps) attached
        self.detached: list[str] = []  # the reasons, in order
        self.recorded: list[dict[str, Any]] = []  # what the live stream's recording would log
        self.feeds: list[MediaFeed] = []
        self.hub = FakeHub()
        self.closed = False

    @property
    def live(self) -> bool:
        return self.source is not None

    def attach_source(self, stream_id: str, track: MediaStreamTrack, width: int, height: int, fps: int) -> None:
        self.source = track
        self.sources.append((stream_id, width, height, fps))

    async def detach_source(self, reason: str) -> bool:
        track, self.source, self.source_failed = self.source, None, None
        if track is None:
            return False
        track.stop()
        self.detached.append(reason)
        return True

    def record_event(self, event: dict[str, Any]) -> None:
        if self.live:
            self.recorded.append(event)

    def feed(self) -> MediaFeed:
        feed = MediaFeed(IdleVideoTrack(), None, None)
        self.feeds.append(feed)
        return feed

    async def close(self) -> None:
        self.closed = True
