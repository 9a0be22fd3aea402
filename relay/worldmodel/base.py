"""The one protocol every world-model source speaks.

A *world model* hands out *streamers* (one per host connection, from a fixed pool).
A streamer runs one *stream* at a time: ``start_stream`` returns a video track that
yields ``av.VideoFrame``s at the source's own pace; ``interact`` steers it;
``end_stream`` stops the track; ``disconnect`` gives the streamer back.

Sources: ``synthetic`` (built in, numpy), ``hosted`` (the hosted API, as its client) and ``whip`` (a live
publisher's video, pushed to the relay over WHIP).  The rest
of the relay only ever sees this protocol, so a new source is one new module or package.
"""

from __future__ import annotations

import fractions
from typing import Protocol, runtime_checkable

from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

# Every frame and packet on the media path is timed on the RTP video clock.
VIDEO_CLOCK_RATE = 90000
VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK_RATE)


class EncodedTrack(MediaStreamTrack):
    """A stream's video as ready-made H.264 access units rather than frames (a WHIP publisher's, passed
    through): the broadcast feeds them to its graph as packets (MediaGraph.attach_packets), with no encode.
    ``attach`` hands it the graph's publish function (None: detached); ``request_keyframe`` asks the
    source for one; ``failed`` says the source stopped (the reaper ends the stream upstream_error)."""

    kind = "video"

    def attach(self, publish) -> None:
        raise NotImplementedError

    def request_keyframe(self) -> None:
        raise NotImplementedError

    @property
    def failed(self) -> BaseException | None:
        raise NotImplementedError

    async def recv(self):
        raise MediaStreamError("an encoded track is never read as frames")


@runtime_checkable
class Streamer(Protocol):
    async def start_stream(
        self, prompt: str, image: bytes | None = None, portrait: bool = False
    ) -> MediaStreamTrack:
        """Begin a stream; the returned track yields av.VideoFrames with pts in 1/90000 (or is an
        EncodedTrack, whose packets pass through)."""

    async def interact(self, prompt: str) -> str:
        """Steer the running stream; returns the prompt as acknowledged by the model."""

    async def end_stream(self) -> None:
        """Stop the running stream (safe to call with none running)."""

    async def disconnect(self) -> None:
        """Release the streamer (safe to call twice)."""


@runtime_checkable
class WorldModel(Protocol):
    async def connect(self) -> Streamer:
        """Reserve an upstream streamer."""

    async def close(self) -> None:
        """Release everything the source holds (safe to call twice)."""
