"""A stream's media pipeline: world-model frames -> shared encoder -> the broadcast's hub.

One pipeline per stream, owned by the broadcast while that stream is live.  The encoder
runs in the pipeline's own single thread so the event loop only moves packets.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from .encoder import H264Encoder
from .hub import FanoutHub

log = logging.getLogger(__name__)

# A crowd joining at once must cost one keyframe, not one each: requests arriving within
# this long after a forced keyframe are served by the next one scheduled at the window's end.
KEYFRAME_MIN_INTERVAL = 0.5


class StreamPipeline:
    def __init__(
        self,
        source: MediaStreamTrack,
        hub: FanoutHub,
        *,
        width: int,
        height: int,
        fps: int,
        mode: str = "encode-once",
        bitrate_kbps: int = 2000,
        keyframe_interval_seconds: float = 2.0,
        on_frame: Callable[[], None] | None = None,
        on_keyframe_forced: Callable[[], None] | None = None,
        on_latency: Callable[[float], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._source = source
        self._hub = hub
        self._mode = mode
        self._fps = fps
        self._clock = clock
        self._on_frame = on_frame
        self._on_keyframe_forced = on_keyframe_forced
        self._on_latency = on_latency
        self._encoder: H264Encoder | None = None
        self._executor: ThreadPoolExecutor | None = None
        if mode != "per-spectator":
            self._encoder = H264Encoder(width, height, fps, bitrate_kbps, keyframe_interval_seconds)
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="relay-encoder")
        self._force_keyframe = False
        self._last_forced = -1e9
        self._task: asyncio.Task | None = None
        self.failed: BaseException | None = None
        self.frames = 0
        self.keyframes_forced = 0

    def start(self) -> None:
        self._hub.attach_source(self.request_keyframe, self._fps)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="relay-pipeline")

    def request_keyframe(self) -> None:
        self._force_keyframe = True

    def _take_keyframe_request(self) -> bool:
        if not self._force_keyframe:
            return False
        now = self._clock()
        if now - self._last_forced < KEYFRAME_MIN_INTERVAL:
            return False  # stays pending: served once the window has passed
        self._force_keyframe = False
        self._last_forced = now
        self.keyframes_forced += 1
        if self._on_keyframe_forced:
            self._on_keyframe_forced()
        return True

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                frame = await self._source.recv()
                received = time.perf_counter()
                self.frames += 1
                if self._on_frame:
                    self._on_frame()
                if self._encoder is None:
                    self._hub.publish(frame, keyframe=True)
                    continue
                packets = await loop.run_in_executor(
                    self._executor, self._encoder.encode, frame, self._take_keyframe_request()
                )
                for packet in packets:
                    self._hub.publish(packet, keyframe=packet.is_keyframe)
                if self._on_latency is not None and packets:
                    # Encode plus the synchronous fan-out: what the relay adds to each frame.
                    self._on_latency(time.perf_counter() - received)
        except MediaStreamError:
            # The source ended by itself: if we did not ask for it, the upstream failed.
            self.failed = self.failed or MediaStreamError("world-model track ended")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # an encoder or source bug must end this stream, not the relay
            log.exception("pipeline failed")
            self.failed = exc

    @property
    def done(self) -> bool:
        return self._task is not None and self._task.done()

    async def close(self) -> None:
        """Stop the source and the encoder; safe to call twice."""
        self._hub.detach_source()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._source.stop()
        if self._executor is not None:
            executor, self._executor = self._executor, None
            encoder, self._encoder = self._encoder, None
            # Flush on the encoder's own thread (it may be mid-encode), then end that thread.
            await asyncio.get_running_loop().run_in_executor(executor, encoder.close)
            executor.shutdown(wait=True)  # the thread is idle now: this only joins it
