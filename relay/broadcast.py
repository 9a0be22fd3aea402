"""A broadcast: one per connection, the watchable side of it.

A thin composition of three parts that each do one job: the media graph (media/graph.py: hubs,
fan-out, low layer, HLS, the live stream's recorder), the spectators (spectators.py: WHEP sessions)
and the audience (audience.py: participants' channels and the orchestrator). It outlives streams:
when the host ends one stream and starts the next, spectators keep their peer connections and simply
receive the new stream's packets, keyframe first. What spans the parts lives here: the events a
stream's start and end announce, the viewer count, and the order things close in.
"""

from __future__ import annotations

import secrets
from functools import partial
from typing import Any, Callable

from aiortc.mediastreams import MediaStreamTrack

from .audience import Audience
from .clock import SYSTEM_CLOCK, Clock
from .config import Settings
from .media.graph import MediaFeed, MediaGraph, RecorderFactory
from .media.hls import HlsPublisher
from .orchestration import Orchestrator
from .recordings import RecordingStore
from .spectators import Spectators

# What the recording's events log keeps (stream_ended is the recorder's own; viewers are logged
# exactly on each join and leave, not from the coalesced pushes).
RECORDED_EVENTS = frozenset({"stream_started", "prompt_applied"})

# How a broadcast gets its media graph: MediaGraph in the server; a test may pass a graph with no
# pipeline (no render or encoder thread).
MediaFactory = Callable[[Settings, Clock, RecorderFactory | None], MediaGraph]


class Broadcast:
    def __init__(
        self,
        connection_id: str,
        settings: Settings,
        clock: Clock = SYSTEM_CLOCK,
        *,
        recordings: RecordingStore | None = None,
        owner: str = "",
        media: MediaFactory = MediaGraph,
    ) -> None:
        self.broadcast_id = secrets.token_urlsafe(12)
        self.spectator_token = secrets.token_urlsafe(24)
        self.connection_id = connection_id
        recorder: RecorderFactory | None = None
        if recordings is not None and settings.recordings.enabled:  # each stream's, filed under this broadcast
            recorder = partial(recordings.recorder, owner=owner, connection_id=connection_id,
                               broadcast_id=self.broadcast_id)
        self.media = media(settings, clock, recorder)
        self.spectators = Spectators(self.broadcast_id, settings.limits, clock,
                                     feed=self.media.feed, on_viewers=self._record_viewers)
        self.audience = Audience(self.broadcast_id, settings, clock, live=lambda: self.live)
        self.stream_id: str | None = None
        self.prompt: str | None = None
        self._viewers_sent = -1
        self.closed = False

    @property
    def live(self) -> bool:
        return self.media.live

    @property
    def viewers(self) -> int:
        return self.spectators.viewers

    @property
    def peak_spectators(self) -> int:
        return self.spectators.peak

    @property
    def hls(self) -> HlsPublisher | None:
        return self.media.hls

    @property
    def orchestrator(self) -> Orchestrator:
        return self.audience.orchestrator

    @property
    def orchestration(self) -> dict[str, Any]:
        return self.orchestrator.state()

    def state(self) -> dict[str, Any]:
        return {
            "broadcast_id": self.broadcast_id,
            "live": self.live,
            "stream_id": self.stream_id,
            "spectators": self.viewers,
            "prompt": self.prompt,
            "orchestration": self.orchestration,
        }

    def hello(self, participant_id: str, resumed: bool) -> dict[str, Any]:
        """A participant's first event on its events socket (at this node or, clustered, at another)."""
        return {"type": "hello", "participant_id": participant_id,
                "resume_token": self.audience.resume_token(participant_id), "resumed": resumed,
                "invited": self.orchestrator.is_invited(participant_id), "orchestration": self.orchestration,
                "live": self.live, "stream_id": self.stream_id, "prompt": self.prompt, "viewers": self.viewers}

    def media_feed(self) -> MediaFeed:
        """A peer that takes this broadcast's media without being one of its spectators (the
        hosted-API owner peer): not counted, nor capped."""
        return self.media.feed()

    # -- the stream side -------------------------------------------------------------

    def attach_stream(
        self, stream_id: str, prompt: str, track: MediaStreamTrack, width: int, height: int, fps: int
    ) -> None:
        self.stream_id = stream_id
        self.prompt = prompt
        self.media.attach_source(stream_id, track, width, height, fps)
        self.emit({"type": "stream_started", "stream_id": stream_id, "prompt": prompt})

    async def detach_stream(self, reason: str) -> None:
        if await self.media.detach_source(reason):
            self.emit({"type": "stream_ended", "stream_id": self.stream_id, "reason": reason})

    @property
    def upstream_failed(self) -> BaseException | None:
        return self.media.source_failed

    def prompt_applied(self, prompt: str, source: str, participant_id: str | None = None) -> None:
        self.prompt = prompt
        event = {"type": "prompt_applied", "prompt": prompt, "source": source, "mode": self.orchestrator.mode}
        if participant_id is not None:
            event["participant_id"] = participant_id
            event["name"] = self.orchestrator.participants.get(participant_id)
        self.emit(event)

    def emit(self, event: dict[str, Any]) -> None:
        """To every participant, and into the live stream's recording when it is worth keeping."""
        self.audience.send(event)
        if event["type"] in RECORDED_EVENTS:
            self.media.record_event(event)

    def _record_viewers(self, count: int) -> None:
        self.media.record_event({"type": "viewers", "count": count})

    # -- housekeeping ----------------------------------------------------------------

    async def tick(self) -> None:
        """Drop silent spectators; publish the viewer count when it changed; run the orchestration."""
        await self.spectators.tick()
        if self.viewers != self._viewers_sent:
            self._viewers_sent = self.viewers
            self.emit({"type": "viewers", "count": self._viewers_sent})
        await self.audience.tick()

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.spectators.refuse_joins()
        await self.detach_stream("disconnected")
        await self.spectators.close()
        self.audience.close()
        await self.media.close()
