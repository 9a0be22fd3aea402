"""A stream's media pipeline: world-model frames -> shared encoder -> the broadcast's hub.

One pipeline per stream: the source of the broadcast's media graph (graph.py) while that stream
is live. The encoder runs in the pipeline's own single thread so the event loop only moves packets.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import av
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from .encoder import H264Encoder
from .hub import FanoutHub

log = logging.getLogger(__name__)

# A crowd joining at once must cost one keyframe, not one each: requests arriving within
# this long after a forced keyframe are served by the next one scheduled at the window's end.
KEYFRAME_MIN_INTERVAL = 0.6  # at most two forced keyframes in any second


class _KeyframeGate:
    """One layer's forced-keyframe requests, coalesced (see KEYFRAME_MIN_INTERVAL)."""

    def __init__(self) -> None:
        self.pending = False
        self.last_forced = -1e9

    def take(self, now: float) -> bool:
        if not self.pending or now - self.last_forced < KEYFRAME_MIN_INTERVAL:
            return False  # stays pending: served once the window has passed
        self.pending = False
        self.last_forced = now
        return True


def low_layer_size(width: int, height: int) -> tuple[int, int]:
    """Half size, rounded down to even (4:2:0 needs even dimensions)."""
    return max(2, width // 2 & ~1), max(2, height // 2 & ~1)


class StreamPipeline:
    def __init__(
        self,
        source: MediaStreamTrack,
        hub: FanoutHub,
        *,
        width: int,
        height: int,
        fps: int,
        encode: bool = True,  # False only in the per-spectator comparison mode: frames go to the hub as they are
        bitrate_kbps: int = 2000,
        keyframe_interval_seconds: float = 2.0,
        preset: str = "veryfast",
        on_frame: Callable[[], None] | None = None,
        on_keyframe_forced: Callable[[], None] | None = None,
        on_latency: Callable[[float], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        low_hub: FanoutHub | None = None,
        low_bitrate_kbps: int = 500,
    ) -> None:
        self._source = source
        self._hub = hub
        self._fps = fps
        self._clock = clock
        self._on_frame = on_frame
        self._on_keyframe_forced = on_keyframe_forced
        self._on_latency = on_latency
        self._encoder: H264Encoder | None = None
        self._executor: ThreadPoolExecutor | None = None
        # The optional lower layer: same frames, same pts, half size, its own keyframes.
        self._low_hub = low_hub
        self._low_encoder: H264Encoder | None = None
        if encode:
            self._encoder = H264Encoder(width, height, fps, bitrate_kbps, keyframe_interval_seconds, preset=preset)
            if self._low_hub is not None:
                low_w, low_h = low_layer_size(width, height)
                self._low_encoder = H264Encoder(
                    low_w, low_h, fps, low_bitrate_kbps, keyframe_interval_seconds, preset=preset
                )
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="relay-encoder")
        # The lower layer's own thread: both layers encode side by side, so it adds CPU, not latency.
        self._low_executor = (
            ThreadPoolExecutor(1, thread_name_prefix="relay-encoder-low") if self._low_encoder is not None else None
        )
        self._keyframes = _KeyframeGate()
        self._low_keyframes = _KeyframeGate()
        self._task: asyncio.Task | None = None
        self.failed: BaseException | None = None
        self.frames = 0
        self.keyframes_forced = 0

    def start(self) -> None:
        self._hub.attach_source(self.request_keyframe, self._fps)
        if self._low_hub is not None:
            self._low_hub.attach_source(self.request_low_keyframe, self._fps)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="relay-pipeline")

    def request_keyframe(self) -> None:
        self._keyframes.pending = True

    def request_low_keyframe(self) -> None:
        self._low_keyframes.pending = True

    def _take_keyframe_request(self, gate: _KeyframeGate | None = None) -> bool:
        if not (gate or self._keyframes).take(self._clock()):
            return False
        self.keyframes_forced += 1
        if self._on_keyframe_forced:
            self._on_keyframe_forced()
        return True

    def _encode_low(self, frame: av.VideoFrame, keyframe: bool) -> list[av.Packet]:
        """On an encoder thread: the lower layer from the same frame (scaled once, here, so the
        event loop never touches pixels)."""
        low = self._low_encoder
        return low.encode(frame.reformat(width=low.width, height=low.height, format="yuv420p"), keyframe)

    async def _run(self) -> None:
        # Two stages joined by a short queue: while the loop fans frame N out to every
        # spectator, the source renders and the encoder encodes frame N+1 on their threads.
        queue: asyncio.Queue = asyncio.Queue(maxsize=2)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._produce(queue), name="relay-pipeline-produce")
                group.create_task(self._publish(queue), name="relay-pipeline-publish")
        except* MediaStreamError:
            # The source ended by itself: if we did not ask for it, the upstream failed.
            self.failed = self.failed or MediaStreamError("world-model track ended")
        except* Exception as group:  # an encoder or source bug must end this stream, not the relay
            log.error("pipeline failed", exc_info=group.exceptions[0])
            self.failed = group.exceptions[0]

    async def _produce(self, queue: asyncio.Queue) -> None:
        loop = asyncio.get_running_loop()
        while True:
            frame = await self._source.recv()
            received = time.perf_counter()
            self.frames += 1
            if self._on_frame:
                self._on_frame()
            if self._encoder is None:
                await queue.put(([frame], received, []))
                continue
            encoding = loop.run_in_executor(
                self._executor, self._encoder.encode, frame, self._take_keyframe_request()
            )
            if self._low_encoder is None:
                packets, low_packets = await encoding, []
            else:
                packets, low_packets = await asyncio.gather(encoding, loop.run_in_executor(
                    self._low_executor, self._encode_low, frame, self._take_keyframe_request(self._low_keyframes)
                ))
            if packets or low_packets:
                await queue.put((packets, received, low_packets))

    async def _publish(self, queue: asyncio.Queue) -> None:
        while True:
            items, received, low_items = await queue.get()
            for item in items:
                # A decoded frame (per-spectator mode) is always a valid place to start.
                self._hub.publish(item, keyframe=item.is_keyframe if isinstance(item, av.Packet) else True)
            # After the main layer: the lower hub takes the main hub's clock offset for this stream.
            for item in low_items:
                self._low_hub.publish(item, keyframe=item.is_keyframe)
            if self._on_latency is not None:
                # Encode plus the synchronous fan-out: what the relay adds to each frame.
                self._on_latency(time.perf_counter() - received)

    @property
    def done(self) -> bool:
        return self._task is not None and self._task.done()

    async def close(self) -> None:
        """Stop the source and the encoder; safe to call twice."""
        self._hub.detach_source()
        if self._low_hub is not None:
            self._low_hub.detach_source()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._source.stop()
        layers = [(self._executor, self._encoder), (self._low_executor, self._low_encoder)]
        self._executor = self._low_executor = None
        self._encoder = self._low_encoder = None
        for executor, encoder in layers:
            if executor is None:
                continue
            # Flush on the encoder's own thread (it may be mid-encode), then end that thread.
            await asyncio.get_running_loop().run_in_executor(executor, encoder.close)
            executor.shutdown(wait=True)  # the thread is idle now: this only joins it
