"""The one protocol every world-model source speaks.

A *world model* hands out *streamers* (one per host connection, from a fixed pool).
A streamer runs one *stream* at a time: ``start_stream`` returns a video track that
yields ``av.VideoFrame``s at the source's own pace; ``interact`` steers it;
``end_stream`` stops the track; ``disconnect`` gives the streamer back.

Sources: ``synthetic`` (built in, numpy) and ``hosted`` (the hosted API, as its client).  The rest
of the relay only ever sees this protocol, so a new source is one new module or package.
"""

from __future__ import annotations

import fractions
from typing import Protocol, runtime_checkable

from aiortc.mediastreams import MediaStreamTrack

# Every frame and packet on the media path is timed on the RTP video clock.
VIDEO_CLOCK_RATE = 90000
VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK_RATE)


@runtime_checkable
class Streamer(Protocol):
    async def start_stream(
        self, prompt: str, image: bytes | None = None, portrait: bool = False
    ) -> MediaStreamTrack:
        """Begin a stream; the returned track yields av.VideoFrames with pts in 1/90000."""

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
