"""What a simulation worker process runs: each script of a job rendered against a virtual clock, encoded
once, recorded as a standard recording.

No real-time waiting: frame i is rendered for t = i / fps as fast as the core allows. A prompt is applied
before the first frame at or after its timestamp (the start prompt before frame 0), and the stream ends at
the end entry's timestamp: a script of T ms has ceil(T * fps / 1000) frames. The recorder is handed a
FakeClock that the loop moves to each frame's time, so the events' ``offset_ms`` and the recording's
``started_at``/``ended_at`` follow the video, not the wall clock.

With ``[world_model] kind = "hosted"`` a job is the hosted model's to render: the worker submits its
scripts to the hosted API's /simulation-jobs, waits for the result, and imports each video as a standard
recording (its H.264 packets copied, not re-encoded; the script's prompts logged at their timestamps), so
the output is the real model's, never the synthetic one's.

Runs in a worker process (``relay.simulations`` hands ``run_job`` to a spawn-context process pool); also
callable in-process (tests, bench/simulations.py).
"""

from __future__ import annotations

import asyncio
import os
import signal
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import av
from av.bitstream import BitStreamFilterContext

from .clock import FakeClock
from .media.encoder import VIDEO_TIME_BASE, H264Encoder
from .media.recorder import STATUS_COMPLETE, RecordingResult, StreamRecorder
from .recordings import RecordingStore
from .worldmodel.scene import SceneRenderer

__all__ = ["init_worker", "run_job", "record_script", "import_video", "frame_count"]

_PARENT_CHECK_SECONDS = 0.2
HOSTED_SCRATCH_DIR = "simulations-downloads"  # under data_dir: hosted videos while they are imported


WORKER_NICENESS = 10


def init_worker() -> None:
    """Pool initializer: yield the CPU to the live relay, leave Ctrl-C to it, and die with it.

    Offline jobs have no deadline and live streams do: at a lower priority, a busy worker takes only
    the CPU the relay's event loop, encoders and render threads leave. A relay killed with -9 cannot
    stop its workers; one left running would go on writing a recording the next run has already taken
    back. So each worker watches its parent and exits when it is gone.
    """
    try:
        os.nice(WORKER_NICENESS)
    except OSError:  # not permitted here: run at the relay's priority
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(_PARENT_CHECK_SECONDS)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watch, name="relay-sim-parent-watch", daemon=True).start()


def frame_count(duration_ms: int, fps: int) -> int:
    """Frames of a stream of ``duration_ms``: those with i / fps < duration."""
    return -(-duration_ms * fps // 1000)


def _first_frame(timestamp_ms: int, fps: int) -> int:
    """The first frame at or after ``timestamp_ms``."""
    return -(-timestamp_ms * fps // 1000)


def record_script(
    script: Sequence[Mapping[str, Any]],
    *,
    store_dir: str,
    stream_id: str,
    owner: str,
    width: int,
    height: int,
    fps: int,
    bitrate_kbps: int,
    keyframe_interval_seconds: float,
    preset: str = "superfast",
    preview_seconds: float = 5.0,
    preview_width: int = 320,
    writer_queue_packets: int = 512,
    extra: Mapping[str, Any] | None = None,
) -> RecordingResult:
    """Render one validated script into the recording ``stream_id`` under ``store_dir``; blocks until written."""
    frames = frame_count(script[-1]["timestamp_ms"], fps)
    start = script[0]["start"]
    interacts = [(_first_frame(e["timestamp_ms"], fps), e["timestamp_ms"], e["interact"]["prompt"])
                 for e in script if "interact" in e]
    clock = FakeClock(start=0.0, wall=time.time())
    recorder = _script_recorder(store_dir, stream_id, owner, width, height, fps, frames + len(script), clock,
                                preview_seconds, preview_width, writer_queue_packets, extra)
    encoder = None
    reason = "upstream_error"  # the world model or the encoder failed under us
    try:
        renderer = SceneRenderer(width, height)
        encoder = H264Encoder(width, height, fps, bitrate_kbps, keyframe_interval_seconds, preset=preset)
        renderer.set_prompt(start["prompt"])
        recorder.log_event({"type": "stream_started", "stream_id": stream_id, "prompt": start["prompt"],
                            "source": "simulation"})
        k = 0
        for i in range(frames):
            t = i / fps
            clock.advance(t - clock.monotonic())
            while k < len(interacts) and interacts[k][0] <= i:
                _, ts, prompt = interacts[k]
                renderer.set_prompt(prompt)
                _log_prompt(recorder, ts, prompt)
                k += 1
            frame = renderer.render(t)
            frame.pts = round(i * 90000 / fps)
            frame.time_base = VIDEO_TIME_BASE
            for packet in encoder.encode(frame, force_keyframe=i == 0):
                recorder.write(packet, packet.is_keyframe)
        clock.advance(frames / fps - clock.monotonic())
        for _, ts, prompt in interacts[k:]:  # after the last frame: taken, with nothing left to show it
            _log_prompt(recorder, ts, prompt)
        reason = "ended"
    finally:
        if encoder is not None:
            encoder.close()
        result = recorder.close(reason)  # blocks until video, events, thumbnail, preview and metadata are written
    return result


def _script_recorder(store_dir: str, stream_id: str, owner: str, width: int, height: int, fps: int,
                     items: int, clock: FakeClock, preview_seconds: float, preview_width: int,
                     writer_queue_packets: int, extra: Mapping[str, Any] | None) -> StreamRecorder:
    """The recording a script writes, on the script's virtual clock. Offline, the writer only ever
    falls behind by what the caller produces: let it hold all ``items`` (packets and events, bounded by
    max_seconds) rather than fail the recording for a slow disk."""
    store = RecordingStore(store_dir, preview_seconds=preview_seconds, preview_width=preview_width,
                           writer_queue_packets=max(writer_queue_packets, items + 64), clock=clock)
    return store.recorder(stream_id, width=width, height=height, fps=fps, owner=owner,
                          extra={"source": "simulation", **(extra or {})})


def _log_prompt(recorder: StreamRecorder, timestamp_ms: int, prompt: str) -> None:
    recorder.log_event({"type": "prompt_applied", "prompt": prompt, "source": "simulation",
                        "timestamp_ms": timestamp_ms})


def import_video(
    video_path: str,
    script: Sequence[Mapping[str, Any]],
    *,
    store_dir: str,
    stream_id: str,
    owner: str,
    bitrate_kbps: int,
    keyframe_interval_seconds: float,
    preset: str = "superfast",
    preview_seconds: float = 5.0,
    preview_width: int = 320,
    writer_queue_packets: int = 512,
    extra: Mapping[str, Any] | None = None,
) -> RecordingResult:
    """A video rendered elsewhere (a hosted simulation's output) as the recording ``stream_id``.

    H.264 without B-frames is copied packet for packet (MP4's length-prefixed NAL units turned back
    into the Annex B the recorder takes, as the live path's encoder emits); anything else (another
    codec, or B-frames, whose decode order is not presentation order) is decoded and encoded once.
    The events log is the script's, on the video's own clock, as a local simulation's would be.
    """
    interacts = [(e["timestamp_ms"], e["interact"]["prompt"]) for e in script if "interact" in e]
    with av.open(video_path) as container:
        stream = container.streams.video[0]
        codec = stream.codec_context
        fps = round(float(stream.average_rate)) if stream.average_rate else 25
        clock = FakeClock(start=0.0, wall=time.time())
        recorder = _script_recorder(store_dir, stream_id, owner, codec.width, codec.height, fps,
                                    (stream.frames or fps * 3600) + len(script), clock,
                                    preview_seconds, preview_width, writer_queue_packets, extra)
        recorder.log_event({"type": "stream_started", "stream_id": stream_id, "prompt": script[0]["start"]["prompt"],
                            "source": "simulation"})
        reason = "upstream_error"
        encoder = None
        try:
            # Copied only when it is what the recorder (and every spectator path) takes: H.264
            # without B-frames, so decode order is presentation order. Else encoded once more.
            if codec.name == "h264" and not codec.has_b_frames:
                packets = _annex_b(container, stream)
            else:
                encoder = H264Encoder(codec.width, codec.height, fps, bitrate_kbps, keyframe_interval_seconds,
                                      preset=preset)
                packets = _encoded(container, stream, encoder, fps)
            start: float | None = None
            end = 0.0
            for packet, seconds in packets:
                start = seconds if start is None else start
                t = max(0.0, seconds - start)
                clock.advance(max(0.0, t - clock.monotonic()))
                while interacts and interacts[0][0] <= t * 1000:
                    _log_prompt(recorder, *interacts.pop(0))
                recorder.write(packet, packet.is_keyframe)
                end = t + 1 / fps
            clock.advance(max(0.0, end - clock.monotonic()))
            for ts, prompt in interacts:  # after the last frame: taken, with nothing left to show it
                _log_prompt(recorder, ts, prompt)
            reason = "ended"
        finally:
            if encoder is not None:
                encoder.close()
            result = recorder.close(reason)
    return result


def _annex_b(container: Any, stream: Any) -> Iterator[tuple[av.Packet, float]]:
    """The stream's packets in Annex B with SPS/PPS before each keyframe, with their time in seconds."""
    bsf = BitStreamFilterContext("h264_mp4toannexb", stream)
    for packet in container.demux(stream):
        for out in bsf.filter(packet if packet.size else None):
            if out.pts is not None:
                yield out, float(out.pts * stream.time_base)


def _encoded(container: Any, stream: Any, encoder: H264Encoder, fps: int) -> Iterator[tuple[av.Packet, float]]:
    """Any other codec, decoded and encoded once (zerolatency: a frame in is a packet out)."""
    for i, frame in enumerate(container.decode(stream)):
        frame.pts, frame.time_base = round(i * 90000 / fps), VIDEO_TIME_BASE
        for packet in encoder.encode(frame, force_keyframe=i == 0):
            yield packet, float(packet.pts * packet.time_base)


def run_job(spec: Mapping[str, Any]) -> dict[str, Any]:
    """One attempt at a job (``Simulations._spec`` builds ``spec``): {"status": "completed" | "cancelled", ...}.

    Marks the job processing first, atomically and only if it is still dispatched, so a job cancelled
    while it waited for this worker is never run. Raises if any recording fails (the supervisor then
    deletes this attempt's recordings and retries or fails the job).
    """
    from .simulations import JobStore

    store = JobStore(spec["db_path"])
    try:
        if not store.mark_processing(spec["job_id"]):
            return {"status": "cancelled"}
    finally:
        store.close()
    if spec.get("hosted"):
        return asyncio.run(_run_hosted(spec))
    results = []
    for index, (script, stream_id) in enumerate(zip(spec["scripts"], spec["stream_ids"], strict=True)):
        result = record_script(
            script, store_dir=spec["data_dir"], stream_id=stream_id, owner=spec["owner"],
            width=spec["width"], height=spec["height"], fps=spec["fps"], bitrate_kbps=spec["bitrate_kbps"],
            keyframe_interval_seconds=spec["keyframe_interval_seconds"], preset=spec["encoder_preset"],
            preview_seconds=spec["preview_seconds"],
            preview_width=spec["preview_width"], writer_queue_packets=spec["writer_queue_packets"],
            extra={"simulation_job_id": spec["job_id"], "script_index": index},
        )
        if result.status != STATUS_COMPLETE:
            raise RuntimeError(f"recording script {index} failed: {result.error}")
        results.append({"stream_id": stream_id, "frame_count": result.frame_count,
                        "duration_seconds": result.duration_seconds})
    return {"status": "completed", "stream_ids": list(spec["stream_ids"]), "recordings": results}


async def _run_hosted(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The hosted model renders the job; its videos become this job's recordings (same stream ids as a
    local run, so nothing above this function knows the difference)."""
    from .simulations import JobStore
    from .worldmodel.hosted import HostedClient

    hosted = spec["hosted"]
    client = HostedClient(hosted["url"], hosted["api_key"], api_key_env=hosted["api_key_env"])
    store = JobStore(spec["db_path"])
    upstream_id = store.upstream_job(spec["job_id"])  # an earlier attempt's, still worth waiting for
    finished = False
    # Under data_dir, not /tmp: a worker killed mid-download (a relay restart) leaves its partial
    # file where the next start sweeps it (Simulations.open).
    scratch = os.path.join(spec["data_dir"], HOSTED_SCRATCH_DIR)
    os.makedirs(scratch, exist_ok=True)
    try:
        if upstream_id is None:
            upstream_id = await client.simulate(list(spec["scripts"]), bool(spec.get("portrait")))
            store.set_upstream_job(spec["job_id"], upstream_id)
        job = await client.finished_simulation(upstream_id)
        finished = True
        if job.get("status") != "completed":
            store.set_upstream_job(spec["job_id"], None)  # a retry submits it afresh
            raise RuntimeError(f"the hosted simulation {upstream_id} {job.get('status')}: "
                               f"{job.get('error_message') or 'no reason given'}")
        streams = {s.get("script_index", i): s for i, s in enumerate(job.get("streams") or [])}
        results = []
        with tempfile.TemporaryDirectory(prefix=f"{spec['job_id']}-", dir=scratch) as tmp:
            for index, (script, stream_id) in enumerate(zip(spec["scripts"], spec["stream_ids"], strict=True)):
                upstream = streams.get(index)
                if not upstream or not upstream.get("video_url"):
                    raise RuntimeError(f"the hosted simulation {upstream_id} has no video for script {index}")
                path = os.path.join(tmp, f"{index}.mp4")
                await client.download(upstream["video_url"], path)
                result = await asyncio.to_thread(
                    import_video, path, script, store_dir=spec["data_dir"], stream_id=stream_id, owner=spec["owner"],
                    bitrate_kbps=spec["bitrate_kbps"], keyframe_interval_seconds=spec["keyframe_interval_seconds"],
                    preset=spec["encoder_preset"], preview_seconds=spec["preview_seconds"],
                    preview_width=spec["preview_width"], writer_queue_packets=spec["writer_queue_packets"],
                    extra={"simulation_job_id": spec["job_id"], "script_index": index, "world_model": "hosted",
                           "upstream_job_id": upstream_id, "upstream_stream_id": upstream.get("stream_id")})
                if result.status != STATUS_COMPLETE:
                    raise RuntimeError(f"recording script {index} failed: {result.error}")
                results.append({"stream_id": stream_id, "frame_count": result.frame_count,
                                "duration_seconds": result.duration_seconds})
    finally:
        if upstream_id is not None and not finished:  # gave up waiting: stop it costing upstream
            await client.cancel_simulation(upstream_id)
            store.set_upstream_job(spec["job_id"], None)
        store.close()
        await client.close()
    return {"status": "completed", "stream_ids": list(spec["stream_ids"]), "recordings": results}
