"""A live broadcast's thumbnail (the watch page's og:image): a small JPEG of its latest keyframe.

A reader of the hub's packets like the recorder, but it only keeps the last keyframe's bytes (one
copy every GOP). The JPEG is made on request, at most once per ``every_seconds`` however many ask
(link-preview bots, a shared link pasted in a busy chat): one decode of one keyframe on a thread,
then served from memory. Nothing is decoded while nobody asks.
"""

from __future__ import annotations

import asyncio
import fractions
import logging
import math

import av

from ..clock import SYSTEM_CLOCK, Clock

log = logging.getLogger(__name__)

JPEG_QUALITY = 3  # mjpeg quantizer, 2 (best) .. 31


def jpeg_bytes(frame: av.VideoFrame) -> bytes:
    """``frame`` as one baseline JPEG (full-range YUV, what JPEG viewers assume)."""
    ctx = av.CodecContext.create("mjpeg", "w")
    ctx.width, ctx.height = frame.width, frame.height
    ctx.pix_fmt = "yuvj420p"
    ctx.time_base = fractions.Fraction(1, 25)
    ctx.qmin = ctx.qmax = JPEG_QUALITY
    image = frame.reformat(format="yuvj420p")
    image.pts = 0
    return b"".join(bytes(p) for p in ctx.encode(image) + ctx.encode(None))


def even(value: float) -> int:
    return max(2, int(round(value / 2)) * 2)


def keyframe_jpeg(keyframe: bytes, width: int) -> bytes:
    """One H.264 keyframe (Annex B, SPS/PPS in band) decoded and scaled to ``width`` (never larger)."""
    decoder = av.CodecContext.create("h264", "r")
    decoder.thread_count = 1  # one picture: a thread pool would cost more than it saves
    frames = decoder.decode(av.Packet(keyframe)) + decoder.decode(None)
    if not frames:
        raise ValueError("the keyframe gave no picture")
    frame = frames[0]
    out_w = even(min(width, frame.width))
    return jpeg_bytes(frame.reformat(width=out_w, height=even(out_w * frame.height / frame.width)))


class LiveThumbnail:
    def __init__(self, width: int, every_seconds: float, clock: Clock = SYSTEM_CLOCK) -> None:
        self.width = width
        self.every_seconds = every_seconds
        self._clock = clock
        self._keyframe: bytes | None = None
        self._jpeg: bytes | None = None
        self._made_at = -math.inf
        # Bumped by clear(): a decode still in flight when its stream ends belongs to an older
        # generation, and its picture must not become the next stream's.
        self._generation = 0
        self._lock = asyncio.Lock()  # one making at a time: the others wait for it, then share it
        self.made = 0  # JPEGs made (or tried): what the once-per-every_seconds bound is measured by

    def offer(self, item: av.Packet | av.VideoFrame, keyframe: bool) -> None:
        """The hub's sink: remember the latest keyframe (a packet; a frame-carrying hub has none)."""
        if keyframe and isinstance(item, av.Packet):
            self._keyframe = bytes(item)

    def clear(self) -> None:
        """The stream ended: its picture is no longer the broadcast's."""
        self._generation += 1
        self._keyframe = None
        self._jpeg = None
        self._made_at = -math.inf

    async def jpeg(self) -> bytes | None:
        """The latest keyframe as a JPEG, remade at most once per ``every_seconds``; None before any."""
        async with self._lock:
            keyframe = self._keyframe
            now = self._clock.monotonic()
            if keyframe is not None and (self._jpeg is None or now - self._made_at >= self.every_seconds):
                generation = self._generation
                self._made_at = now  # a keyframe that fails to decode is not retried on every request
                self.made += 1
                try:
                    jpeg = await asyncio.to_thread(keyframe_jpeg, keyframe, self.width)
                except (av.FFmpegError, ValueError) as exc:
                    log.warning("live thumbnail failed: %s", exc)
                else:
                    if generation != self._generation:
                        return None  # the stream ended while it decoded: its picture is nobody's now
                    self._jpeg = jpeg
            return self._jpeg
