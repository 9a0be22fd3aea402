"""The built-in synthetic world model: pictures, prompts, pacing and lifecycle."""

from __future__ import annotations

import asyncio
import fractions
import threading
import time

import numpy as np
import pytest
from aiortc.mediastreams import MediaStreamError

from relay.worldmodel.base import Streamer, WorldModel
from relay.worldmodel.look import look_for_prompt
from relay.worldmodel.painter import Painter
from relay.worldmodel.synthetic import (
    TRANSITION_S,
    SceneRenderer,
    SyntheticStreamer,
    SyntheticTrack,
    SyntheticWorldModel,
)

# Small frames keep the picture tests fast; the size/format tests use the real sizes.
W, H = 320, 176


def planes(frame) -> list[np.ndarray]:
    """Y, U, V as 2-D arrays (dropping any line padding)."""
    out = []
    for p in frame.planes:
        out.append(np.frombuffer(p, np.uint8).reshape(p.height, p.line_size)[:, : p.width].copy())
    return out


def mean_yuv(frame) -> np.ndarray:
    return np.array([p.mean() for p in planes(frame)])


def settled(prompt: str, t: float = 2.0) -> np.ndarray:
    """Mean Y/U/V of ``prompt`` reached by a transition from the default look."""
    r = SceneRenderer(W, H)
    r.render(0.0)  # start from the default look ...
    r.set_prompt(prompt)  # ... so this is a real ~1 s transition, anchored at t=0.04
    r.render(0.04)
    return mean_yuv(r.render(0.04 + TRANSITION_S + t))


# -- picture -------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(1280, 704), (704, 1280)])
def test_renderer_frame_size_and_format(size):
    frame = SceneRenderer(*size).render(0.0)
    assert (frame.width, frame.height) == size
    assert frame.format.name == "yuv420p"
    y, u, v = planes(frame)
    assert y.shape == (size[1], size[0])
    assert u.shape == v.shape == (size[1] // 2, size[0] // 2)
    # Studio-range values (what an untagged H.264 stream is assumed to carry).
    assert 16 <= y.min() and y.max() <= 235
    assert 16 <= min(u.min(), v.min()) and max(u.max(), v.max()) <= 240


def test_odd_size_rejected():
    with pytest.raises(ValueError):
        SceneRenderer(321, 176)


def test_deterministic_for_same_prompt_sequence_and_times():
    def run() -> list[list[np.ndarray]]:
        r = SceneRenderer(W, H)
        r.set_prompt("snowy mountains at dawn")
        frames = [planes(r.render(0.0)), planes(r.render(0.5))]
        r.set_prompt("a purple cat, neon")
        frames += [planes(r.render(t)) for t in (0.7, 1.2, 3.0)]
        return frames

    for a, b in zip(run(), run()):
        for pa, pb in zip(a, b):
            assert np.array_equal(pa, pb)


def test_painter_keeps_no_state_between_frames():
    """The renderer's seam: the same look, time and camera give the same pixels, whatever was painted
    before (in-place blends must never write to the shared textures)."""
    painter = Painter(W, H)
    storm = look_for_prompt("lava storm neon night fly")  # clouds, veins, grid, moon, rain in place
    first = planes(painter.paint(storm, 1.3, 0.4))
    for prompt in ("snow forest", "sunset ocean", "a purple cat"):
        painter.paint(look_for_prompt(prompt), 2.0, 1.0)
    again = planes(Painter(W, H).paint(storm, 1.3, 0.4)), planes(painter.paint(storm, 1.3, 0.4))
    for other in again:
        for pa, pb in zip(first, other):
            assert np.array_equal(pa, pb)


def test_picture_keeps_moving_without_prompts():
    r = SceneRenderer(W, H)
    r.set_prompt("hills")
    y0, y1 = planes(r.render(0.0))[0], planes(r.render(1.0))[0]
    assert np.abs(y0.astype(int) - y1.astype(int)).mean() > 0.5


@pytest.mark.parametrize(
    "a, b",
    [
        ("", "night"),
        ("day", "sunset"),
        ("desert", "ocean"),
        ("forest", "snow"),
        ("hills", "lava"),
        ("mountains", "neon"),
        ("night forest", "sunny desert"),
    ],
)
def test_different_prompts_look_measurably_different(a, b):
    diff = np.abs(settled(a) - settled(b))
    assert diff.max() > 3.0, diff


def test_unknown_words_still_change_the_picture():
    base = settled("")
    for prompt in ("zebra", "a quiet xylophone"):
        assert np.abs(settled(prompt) - base).max() > 2.0, prompt
    # ... also alongside keywords, and different unknown words differ from each other.
    assert np.abs(settled("desert cat") - settled("desert")).max() > 2.0
    assert np.abs(settled("desert cat") - settled("desert dog")).max() > 2.0


def test_unknown_word_look_is_stable_across_renderers():
    assert np.array_equal(settled("a lighthouse"), settled("a lighthouse"))


def test_transition_is_gradual():
    """Half-way through, the picture is between the old look and the new one."""
    r = SceneRenderer(W, H)
    r.set_prompt("day")
    before = mean_yuv(r.render(0.0))
    r.set_prompt("night")
    r.render(0.04)  # the blend starts here
    mid = mean_yuv(r.render(0.04 + TRANSITION_S / 2))
    after = mean_yuv(r.render(0.04 + TRANSITION_S + 0.5))
    assert after[0] < mid[0] - 3 and mid[0] < before[0] - 3


# -- track ---------------------------------------------------------------------------


async def test_track_frames_pts_and_time_base():
    track = SyntheticTrack(W, H, fps=25, prompt="ocean")
    try:
        frames = [await track.recv() for _ in range(4)]
    finally:
        track.stop()
    assert track.kind == "video"
    assert all(f.time_base == fractions.Fraction(1, 90000) for f in frames)
    pts = [f.pts for f in frames]
    assert pts[0] == 0
    assert all(b > a for a, b in zip(pts, pts[1:]))
    assert all(p % 3600 == 0 for p in pts)  # 90000 / 25 per frame, frames dropped if late


async def test_track_paces_to_real_time():
    track = SyntheticTrack(1280, 704, fps=25)
    try:
        await track.recv()  # the clock starts at the first frame
        start = time.monotonic()
        n = 0
        while time.monotonic() - start < 1.0:
            await track.recv()
            n += 1
    finally:
        track.stop()
    assert 22 <= n <= 28, n


async def test_track_does_not_burst_after_a_stall():
    track = SyntheticTrack(W, H, fps=25)
    try:
        await track.recv()
        time.sleep(0.3)  # block the loop: ~7 frames late
        start = time.monotonic()
        quick = 0
        for _ in range(5):
            await track.recv()
            if time.monotonic() - start < 0.02:
                quick += 1
        assert quick <= 3
    finally:
        track.stop()


async def test_track_set_prompt_changes_frames():
    track = SyntheticTrack(W, H, fps=25, prompt="day")
    try:
        before = mean_yuv(await track.recv())
        track.set_prompt("night")
        frame = None
        for _ in range(int(25 * TRANSITION_S) + 3):
            frame = await track.recv()
        assert mean_yuv(frame)[0] < before[0] - 10
    finally:
        track.stop()


async def test_track_stop_leaves_no_threads_and_ends_recv():
    baseline = threading.active_count()
    track = SyntheticTrack(W, H, fps=25)
    await track.recv()
    assert threading.active_count() == baseline + 1  # its one render thread
    track.stop()
    assert threading.active_count() == baseline
    with pytest.raises(MediaStreamError):
        await track.recv()
    track.stop()  # idempotent


async def test_stop_during_recv_ends_that_recv():
    track = SyntheticTrack(W, H, fps=25)
    await track.recv()
    pending = asyncio.ensure_future(track.recv())
    await asyncio.sleep(0)
    track.stop()
    with pytest.raises(MediaStreamError):
        await pending


# -- streamer and world model -----------------------------------------------------------


async def test_world_model_and_streamer_speak_the_protocol():
    model = SyntheticWorldModel()
    assert isinstance(model, WorldModel)
    streamer = await model.connect()
    assert isinstance(streamer, Streamer)
    assert isinstance(streamer, SyntheticStreamer)
    await model.close()
    await model.close()


@pytest.mark.parametrize("portrait, size", [(False, (1280, 704)), (True, (704, 1280))])
async def test_start_stream_sizes(portrait, size):
    streamer = await SyntheticWorldModel().connect()
    track = await streamer.start_stream("  hills ", portrait=portrait)
    try:
        frame = await track.recv()
        assert (frame.width, frame.height) == size
        assert frame.format.name == "yuv420p"
    finally:
        await streamer.disconnect()


async def test_streamer_lifecycle():
    baseline = threading.active_count()
    streamer = SyntheticStreamer(W, H, 25)
    with pytest.raises(RuntimeError):
        await streamer.interact("night")  # nothing running
    track = await streamer.start_stream("hills")
    with pytest.raises(RuntimeError):
        await streamer.start_stream("again")
    assert await streamer.interact("  stormy ocean \n") == "stormy ocean"
    await track.recv()

    await streamer.end_stream()
    assert track.readyState == "ended"
    await streamer.end_stream()  # idempotent
    assert threading.active_count() == baseline

    # A new stream may start once the previous one ended.
    track2 = await streamer.start_stream("desert", image=b"ignored")
    assert track2 is not track and track2.readyState == "live"
    await streamer.disconnect()
    await streamer.disconnect()  # idempotent
    assert track2.readyState == "ended"
    with pytest.raises(RuntimeError):
        await streamer.start_stream("after disconnect")


async def test_close_ends_streams():
    model = SyntheticWorldModel(W, H, 25)
    streamer = await model.connect()
    track = await streamer.start_stream("forest")
    await model.close()
    assert track.readyState == "ended"
