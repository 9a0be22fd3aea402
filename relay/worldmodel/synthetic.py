"""The built-in synthetic world model: the world-model protocol around ``scene.SceneRenderer``.

It stands in for a real (GPU) world model so the relay can be run, tested and load-tested
anywhere, with no GPU and no network: a streamer hands out a video track paced in real time,
and a prompt steers the look (see ``scene.py`` for how a prompt becomes a picture).
"""

from __future__ import annotations

import asyncio
import concurrent.futures

import av
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from .base import VIDEO_CLOCK_RATE, VIDEO_TIME_BASE
from .scene import TRANSITION_S, SceneRenderer, prepare

__all__ = ["SceneRenderer", "SyntheticTrack", "SyntheticStreamer", "SyntheticWorldModel", "TRANSITION_S", "prepare"]




# ---------------------------------------------------------------------------------------
# Track, streamer, world model
# ---------------------------------------------------------------------------------------


class SyntheticTrack(MediaStreamTrack):
    """A live video track of the synthetic world, paced to ``fps`` in real time.

    Frames are rendered on one dedicated thread owned by the track (numpy releases the GIL
    for its heavy loops, so the event loop keeps serving while a frame renders), starting
    as soon as ``recv`` is called and overlapping the wait until the frame is due.
    """

    kind = "video"

    def __init__(self, width: int = 1280, height: int = 704, fps: int = 25, prompt: str = "") -> None:
        super().__init__()
        if fps <= 0:
            raise ValueError("fps must be positive")
        if width <= 0 or height <= 0 or width % 2 or height % 2:
            raise ValueError(f"width and height must be positive and even, got {width}x{height}")
        self.width, self.height, self.fps = width, height, fps
        # Built lazily on the render thread: the first renderer of a size builds its noise
        # textures (tens of ms), which must not stall the event loop.
        self._renderer: SceneRenderer | None = None
        self._initial_prompt = prompt
        self.prompt = prompt
        self._pending: str | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="synthetic-render")
        self._start: float | None = None
        self._index = -1

    def set_prompt(self, prompt: str) -> None:
        """Blend towards ``prompt`` over ~1 s, starting with the next frame rendered."""
        # Handed to the render thread with the next frame rather than touching the renderer
        # here, so the renderer only ever runs on one thread.
        self._pending = prompt
        self.prompt = prompt

    def _render(self, t: float, prompt: str | None) -> av.VideoFrame:
        if self._renderer is None:
            self._renderer = SceneRenderer(self.width, self.height)
            self._renderer.set_prompt(self._initial_prompt)
        if prompt is not None:
            self._renderer.set_prompt(prompt)
        return self._renderer.render(t)

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._start is None:
            self._start, index = now, 0
        else:
            index = self._index + 1
            # Behind by more than two frames (a slow consumer, a stalled loop): skip to the
            # present instead of bursting out the backlog, so pts keeps tracking wall time.
            behind = int((now - self._start) * self.fps)
            if behind - index > 2:
                index = behind
        self._index = index
        due = self._start + index / self.fps
        pending, self._pending = self._pending, None
        try:
            fut = loop.run_in_executor(self._executor, self._render, index / self.fps, pending)
        except RuntimeError:  # executor shut down by stop() in the meantime
            raise MediaStreamError from None
        try:
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            frame = await fut
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self.readyState != "live" and not (task and task.cancelling()):
                raise MediaStreamError from None  # our queued render was cancelled by stop()
            raise
        if self.readyState != "live":
            raise MediaStreamError
        frame.pts = round(index * VIDEO_CLOCK_RATE / self.fps)
        frame.time_base = VIDEO_TIME_BASE
        return frame

    def stop(self) -> None:
        super().stop()
        # Waits for at most one in-flight render (a few ms), so the thread is really gone
        # when stop() returns.
        self._executor.shutdown(wait=True, cancel_futures=True)


class SyntheticStreamer:
    """One streamer: at most one running :class:`SyntheticTrack` at a time."""

    def __init__(self, width: int = 1280, height: int = 704, fps: int = 25) -> None:
        self.width, self.height, self.fps = width, height, fps
        self._track: SyntheticTrack | None = None
        self._disconnected = False

    @property
    def track(self) -> SyntheticTrack | None:
        return self._track

    def _live(self) -> SyntheticTrack | None:
        t = self._track
        return t if t is not None and t.readyState == "live" else None

    async def start_stream(self, prompt: str, image: bytes | None = None, portrait: bool = False) -> SyntheticTrack:
        """Start a stream; ``image`` is accepted for protocol compatibility and ignored."""
        if self._disconnected:
            raise RuntimeError("streamer is disconnected")
        if self._live() is not None:
            raise RuntimeError("a stream is already running on this streamer")
        long_side, short_side = max(self.width, self.height), min(self.width, self.height)
        w, h = (short_side, long_side) if portrait else (long_side, short_side)
        self._track = SyntheticTrack(w, h, self.fps, prompt.strip())
        return self._track

    async def interact(self, prompt: str) -> str:
        track = self._live()
        if track is None:
            raise RuntimeError("no stream is running")
        prompt = prompt.strip()
        track.set_prompt(prompt)
        return prompt

    async def end_stream(self) -> None:
        track, self._track = self._track, None
        if track is not None:
            track.stop()

    async def disconnect(self) -> None:
        await self.end_stream()
        self._disconnected = True


class SyntheticWorldModel:
    """The built-in world model: unlimited streamers, all rendered locally."""

    def __init__(self, width: int = 1280, height: int = 704, fps: int = 25) -> None:
        self.width, self.height, self.fps = width, height, fps
        self._streamers: list[SyntheticStreamer] = []

    async def connect(self) -> SyntheticStreamer:
        streamer = SyntheticStreamer(self.width, self.height, self.fps)
        self._streamers.append(streamer)
        return streamer

    async def close(self) -> None:
        streamers, self._streamers = self._streamers, []
        for s in streamers:
            await s.disconnect()
