"""The live thumbnail (the watch page's og:image) on real H.264 keyframes from the real encoder."""

from __future__ import annotations

import asyncio
import fractions
import io
import threading

import av
import numpy as np

from relay.media import thumbnail as thumbnail_module
from relay.media.encoder import H264Encoder
from relay.media.thumbnail import LiveThumbnail


def keyframe(grey: int, size: tuple[int, int] = (64, 48)) -> av.Packet:
    """One real H.264 keyframe (SPS/PPS in band) of a flat ``grey`` picture."""
    width, height = size
    encoder = H264Encoder(width, height, 25, 300, keyframe_interval_seconds=2.0)
    frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), grey, np.uint8), format="rgb24")
    frame.pts, frame.time_base = 0, fractions.Fraction(1, 90000)
    packets = encoder.encode(frame, force_keyframe=True)
    encoder.close()
    assert packets and packets[0].is_keyframe
    return packets[0]


def brightness(jpeg: bytes) -> float:
    with av.open(io.BytesIO(jpeg)) as image:
        return float(next(image.decode(video=0)).to_ndarray(format="gray").mean())


async def test_a_decode_in_flight_when_the_stream_ends_never_becomes_the_next_streams_picture(monkeypatch):
    # A gate around the real decode holds it in flight while the stream ends: the race made certain.
    entered, release = threading.Event(), threading.Event()
    real = thumbnail_module.keyframe_jpeg

    def gated(data: bytes, width: int) -> bytes:
        entered.set()
        release.wait(5)
        return real(data, width)

    monkeypatch.setattr(thumbnail_module, "keyframe_jpeg", gated)
    thumb = LiveThumbnail(width=32, every_seconds=60)  # a long period: a stale picture would stay
    thumb.offer(keyframe(20), True)  # the ended stream's dark picture
    in_flight = asyncio.create_task(thumb.jpeg())
    assert await asyncio.to_thread(entered.wait, 5)

    thumb.clear()  # the stream ends while its picture decodes
    release.set()
    assert await in_flight is None  # the ended stream's picture goes to nobody
    assert await thumb.jpeg() is None  # nothing live yet: no picture, not the old one

    monkeypatch.setattr(thumbnail_module, "keyframe_jpeg", real)
    thumb.offer(keyframe(235), True)  # the next stream's first keyframe, a bright picture
    assert brightness(await thumb.jpeg()) > 150
    assert thumb.made == 2


async def test_the_picture_is_made_once_per_period_and_dropped_when_the_stream_ends():
    thumb = LiveThumbnail(width=32, every_seconds=60)
    assert await thumb.jpeg() is None
    thumb.offer(keyframe(235), True)
    first = await thumb.jpeg()
    assert first[:3] == b"\xff\xd8\xff" and brightness(first) > 150
    thumb.offer(keyframe(20), True)
    assert await thumb.jpeg() == first and thumb.made == 1  # within the period: the same picture
    thumb.clear()
    assert await thumb.jpeg() is None
