"""Recording a script: one record loop over (packet, time) sources, so a script rendered here and a
video rendered elsewhere become the same kind of standard recording.

* ``record_script``: the script rendered against a virtual clock and encoded once. No real-time
  waiting: frame i is rendered for t = i / fps as fast as the core allows; a prompt is applied before
  the first frame at or after its timestamp (the start prompt before frame 0), and the stream ends at
  the end entry's timestamp: a script of T ms has ceil(T * fps / 1000) frames.
* ``import_video``: a video rendered elsewhere (a hosted simulation's output), its H.264 packets copied
  when the recorder can take them as they are, else decoded and encoded once.

Either way the recorder is handed a FakeClock that the loop moves to each packet's time, so the events'
``offset_ms`` and the recording's ``started_at``/``ended_at`` follow the video, not the wall clock, and
the script's prompts are logged as the video reaches them. Times are exact fractions of a second, so a
prompt at a frame's very millisecond is that frame's, whatever the frame rate.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import closing
from dataclasses import replace
from fractions import Fraction
from typing import Any

import av
from av.bitstream import BitStreamFilterContext

from ..clock import FakeClock
from ..media.encoder import H264Encoder
from ..media.recorder import RecordingResult, StreamRecorder
from ..recordings import RecordingStore
from ..worldmodel.base import VIDEO_CLOCK_RATE, VIDEO_TIME_BASE
from ..worldmodel.scene import SceneRenderer
from .script import Script
from .spec import VideoSpec

__all__ = ["frame_count", "import_video", "record_script"]

# A source: the video's packets in decode order, each with its presentation time in seconds.
Packets = Iterator[tuple[av.Packet, Fraction]]


def frame_count(duration_ms: int, fps: int) -> int:
    """Frames of a stream of ``duration_ms``: those with i / fps < duration."""
    return -(-duration_ms * fps // 1000)


def record_script(script: Script, video: VideoSpec, *, store_dir: str, stream_id: str,
                  owner: str, extra: Mapping[str, Any] | None = None) -> RecordingResult:
    """Render one validated script into the recording ``stream_id`` under ``store_dir``; blocks until written."""
    frames = frame_count(script[-1]["timestamp_ms"], video.fps)
    return _record(script, _rendered(script, video, frames), video, frames + len(script),
                   store_dir=store_dir, stream_id=stream_id, owner=owner, extra=extra)


def import_video(video_path: str, script: Script, video: VideoSpec, *, store_dir: str,
                 stream_id: str, owner: str, extra: Mapping[str, Any] | None = None) -> RecordingResult:
    """A video rendered elsewhere (a hosted simulation's output) as the recording ``stream_id``.

    It keeps its own size and frame rate; ``video`` gives the encoder's settings (if it has to be
    encoded) and the recording's. The events log is the script's, on the video's own clock, as a local
    simulation's would be.
    """
    with av.open(video_path) as container:
        stream = container.streams.video[0]
        codec = stream.codec_context
        fps = round(float(stream.average_rate)) if stream.average_rate else 25
        own = replace(video, width=codec.width, height=codec.height, fps=fps)
        # Copied only when it is what the recorder (and every spectator path) takes: H.264 without
        # B-frames, so decode order is presentation order. Else encoded once more.
        if codec.name == "h264" and not codec.has_b_frames:
            packets = _annex_b(container, stream)
        else:
            packets = _encoded(container, stream, own)
        return _record(script, packets, own, (stream.frames or fps * 3600) + len(script),
                       store_dir=store_dir, stream_id=stream_id, owner=owner, extra=extra)


# ------------------------------------------------------------------------------------- the loop

def _record(script: Script, packets: Packets, video: VideoSpec, items: int, *,
            store_dir: str, stream_id: str, owner: str, extra: Mapping[str, Any] | None) -> RecordingResult:
    """Write ``packets`` as the recording ``stream_id``, the clock following their times from the first
    one's, and log the script's prompts as the video reaches them (those after its last frame at its end:
    taken, with nothing left to show them). Closes the source, then the recording, whatever happens."""
    clock = FakeClock(start=0.0, wall=time.time())
    recorder = _recorder(store_dir, stream_id, owner, video, items, clock, extra)
    prompts = _prompts(script)
    reason = "upstream_error"  # the source (world model, decoder or encoder) failed under us
    try:
        recorder.log_event({"type": "stream_started", "stream_id": stream_id, "prompt": script[0]["start"]["prompt"],
                            "source": "simulation"})
        with closing(packets):
            first: Fraction | None = None
            end = Fraction(0)
            for packet, at in packets:
                first = at if first is None else first
                t = max(Fraction(0), at - first)
                clock.advance(max(0.0, float(t) - clock.monotonic()))
                for timestamp_ms, prompt in _due(prompts, t):
                    _log_prompt(recorder, timestamp_ms, prompt)
                recorder.write(packet, packet.is_keyframe)
                end = t + Fraction(1, video.fps)
        clock.advance(max(0.0, float(end) - clock.monotonic()))
        for timestamp_ms, prompt in prompts:
            _log_prompt(recorder, timestamp_ms, prompt)
        reason = "ended"
    finally:
        result = recorder.close(reason)  # blocks until video, events, thumbnail, preview and metadata are written
    return result


def _prompts(script: Script) -> list[tuple[int, str]]:
    """The script's interacts, in order: (timestamp_ms, prompt)."""
    return [(e["timestamp_ms"], e["interact"]["prompt"]) for e in script if "interact" in e]


def _due(prompts: list[tuple[int, str]], t: Fraction) -> list[tuple[int, str]]:
    """Takes from ``prompts`` those at or before ``t`` seconds."""
    n = 0
    while n < len(prompts) and prompts[n][0] <= t * 1000:
        n += 1
    due, prompts[:n] = prompts[:n], []
    return due


def _recorder(store_dir: str, stream_id: str, owner: str, video: VideoSpec, items: int, clock: FakeClock,
              extra: Mapping[str, Any] | None) -> StreamRecorder:
    """The recording a script writes, on the script's virtual clock. Offline, the writer only ever
    falls behind by what the caller produces: let it hold all ``items`` (packets and events, bounded by
    max_seconds) rather than fail the recording for a slow disk."""
    store = RecordingStore(store_dir, preview_seconds=video.preview_seconds, preview_width=video.preview_width,
                           writer_queue_packets=max(video.writer_queue_packets, items + 64), clock=clock)
    return store.recorder(stream_id, width=video.width, height=video.height, fps=video.fps, owner=owner,
                          extra={"source": "simulation", **(extra or {})})


def _log_prompt(recorder: StreamRecorder, timestamp_ms: int, prompt: str) -> None:
    recorder.log_event({"type": "prompt_applied", "prompt": prompt, "source": "simulation",
                        "timestamp_ms": timestamp_ms})


# ----------------------------------------------------------------------------------- the sources

def _encoder(video: VideoSpec) -> H264Encoder:
    return H264Encoder(video.width, video.height, video.fps, video.bitrate_kbps, video.keyframe_interval_seconds,
                       preset=video.preset)


def _encode(encoder: H264Encoder, frame: av.VideoFrame, index: int, fps: int) -> Packets:
    """Frame ``index`` of a stream at ``fps``, encoded (zerolatency: a frame in is a packet out; the first
    a keyframe), its packets at the frame's time."""
    at = Fraction(index, fps)
    frame.pts, frame.time_base = round(at * VIDEO_CLOCK_RATE), VIDEO_TIME_BASE
    for packet in encoder.encode(frame, force_keyframe=index == 0):
        yield packet, at


def _rendered(script: Script, video: VideoSpec, frames: int) -> Packets:
    """The script rendered by the scene renderer, each prompt applied before the first frame at or after it."""
    renderer = SceneRenderer(video.width, video.height)
    encoder = _encoder(video)
    try:
        renderer.set_prompt(script[0]["start"]["prompt"])
        prompts = _prompts(script)
        for i in range(frames):
            for _, prompt in _due(prompts, Fraction(i, video.fps)):
                renderer.set_prompt(prompt)
            yield from _encode(encoder, renderer.render(i / video.fps), i, video.fps)
    finally:
        encoder.close()


def _annex_b(container: Any, stream: Any) -> Packets:
    """The stream's packets in Annex B with SPS/PPS before each keyframe (MP4's length-prefixed NAL units
    turned back into what the recorder takes, as the live path's encoder emits)."""
    bsf = BitStreamFilterContext("h264_mp4toannexb", stream)
    for packet in container.demux(stream):
        for out in bsf.filter(packet if packet.size else None):
            if out.pts is not None:
                yield out, out.pts * stream.time_base


def _encoded(container: Any, stream: Any, video: VideoSpec) -> Packets:
    """Any other codec (or H.264 with B-frames), decoded and encoded once."""
    encoder = _encoder(video)
    try:
        for i, frame in enumerate(container.decode(stream)):
            yield from _encode(encoder, frame, i, video.fps)
    finally:
        encoder.close()
