"""Simulations' core without HTTP: validation, the SQLite job store (quota, its race, recovery,
cancel rules), the worker's rendering, and the service's runner on threads."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import pickle
import threading
from pathlib import Path

import pytest

from relay.clock import FakeClock
from relay.errors import RelayError
from relay.recordings import RecordingStore, owner_id
from relay.simulations import JobStore, QueueFull, Simulations, parse_request, validate_script, worker
from relay.simulations.record import frame_count, import_video, record_script
from relay.simulations.spec import VideoSpec, job_spec
from tests.conftest import make_settings

START = {"timestamp_ms": 0, "start": {"prompt": "  hills at dawn  "}}
END = {"timestamp_ms": 2000, "end": {}}
GOOD = [START, {"timestamp_ms": 700, "interact": {"prompt": "rain"}}, END]


def one() -> list[list[dict]]:
    return [validate_script(GOOD, 150)]


@pytest.fixture
def store(tmp_path):
    s = JobStore(tmp_path / "sim.db", clock=FakeClock())
    yield s
    s.close()


# ------------------------------------------------------------------------------------ validation

def test_a_good_script_is_normalized():
    assert validate_script(GOOD, 150) == [
        {"timestamp_ms": 0, "start": {"prompt": "hills at dawn"}},
        {"timestamp_ms": 700, "interact": {"prompt": "rain"}},
        {"timestamp_ms": 2000, "end": {}},
    ]
    scripts, portrait = parse_request({"scripts": [GOOD, GOOD], "portrait": True}, 150)
    assert len(scripts) == 2 and portrait is True


@pytest.mark.parametrize("script, index, field, reason", [
    ([{"timestamp_ms": 0, "end": {}}], 0, "end", "start_not_first"),
    ([{"timestamp_ms": 10, "start": {"prompt": "a"}}, END], 0, "timestamp_ms", "start_not_at_zero"),
    ([START, {"timestamp_ms": 10, "start": {"prompt": "b"}}, END], 1, "start", "duplicate_start"),
    ([START, {"timestamp_ms": 10, "interact": {"prompt": "b"}}, {"timestamp_ms": 10, "interact": {"prompt": "c"}}, END],
     2, "timestamp_ms", "not_ascending"),
    ([START, {"timestamp_ms": 100, "end": {}}, END], 1, "end", "end_not_last"),
    ([START, {"timestamp_ms": 100, "interact": {"prompt": "b"}}], 1, "interact", "missing_end"),
    ([START, {"timestamp_ms": 0, "end": {}}], 1, "timestamp_ms", "end_not_after_start"),
    ([START, {"timestamp_ms": 3001, "end": {}}], 1, "timestamp_ms", "too_long"),
    ([START, {"timestamp_ms": 100, "interact": {"prompt": ""}}, END], 1, "interact.prompt", "invalid_prompt"),
    ([START, {"timestamp_ms": 100, "interact": {"prompt": 7}}, END], 1, "interact.prompt", "invalid_prompt"),
    ([START, {"timestamp_ms": 100, "interact": {"prompt": "é" * 2001}}, END], 1, "interact.prompt", "prompt_too_long"),
    ([START, {"timestamp_ms": True, "end": {}}], 1, "timestamp_ms", "invalid_timestamp"),
    ([START, {"timestamp_ms": "100", "end": {}}], 1, "timestamp_ms", "invalid_timestamp"),
    ([START, {"end": {}}], 1, "timestamp_ms", "missing_timestamp"),
    ([START, {"timestamp_ms": 100}], 1, None, "no_action"),
    ([START, {"timestamp_ms": 100, "end": {}, "start": {"prompt": "x"}}], 1, None, "several_actions"),
    ([START, {"timestamp_ms": 100, "end": []}], 1, "end", "not_an_object"),
    ([START, {"timestamp_ms": 100, "end": {"now": True}}], 1, "end.now", "unknown_field"),
    ([START, {"timestamp_ms": 100, "at": 1, "end": {}}], 1, "at", "unknown_field"),
    ([START, None, END], 1, None, "not_an_object"),
    ([{"timestamp_ms": 0, "start": {"prompt": "a", "image": 12}}, END], 0, "start.image", "invalid_image"),
])
def test_each_bad_script_names_its_entry_and_reason(script, index, field, reason):
    with pytest.raises(RelayError) as err:
        validate_script(script, 3)
    e = err.value
    assert (e.status, e.code) == (422, "INVALID_REQUEST")
    assert e.details["index"] == index and e.details["reason"] == reason
    assert e.details.get("field") == field
    assert "script_index" not in e.details


def test_whole_request_errors():
    cases = [({}, "missing"), ({"script": [], "scripts": []}, "both"), ({"script": "x"}, "not_an_array"),
             ({"script": []}, "empty"), ({"scripts": []}, "empty"), ({"scripts": [GOOD] * 11}, "too_many_scripts"),
             ({"script": GOOD, "portrait": 1}, "not_a_boolean"), ({"script": GOOD, "extra": 1}, "unknown_field")]
    for body, reason in cases:
        with pytest.raises(RelayError) as err:
            parse_request(body, 150)
        assert err.value.status == 422 and err.value.details["reason"] == reason, body
        assert "index" not in err.value.details
    with pytest.raises(RelayError) as err:
        parse_request({"scripts": [GOOD, GOOD, [START, {"timestamp_ms": 5, "start": {"prompt": "x"}}, END]]}, 150)
    assert err.value.details == {"script_index": 2, "index": 1, "field": "start", "reason": "duplicate_start"}
    assert err.value.message.startswith("scripts[2]: entry 1")


# ----------------------------------------------------------------------------------------- store

def test_quota_per_owner_and_the_queue_full_details(store):
    for _ in range(3):
        store.submit("alice", one(), False, 3)
    with pytest.raises(QueueFull) as full:
        store.submit("alice", one(), False, 3)
    assert (full.value.pending, full.value.limit) == (3, 3)
    assert full.value.ahead_seconds == 2.0  # her oldest job (2 s of video) frees the first slot
    job, ahead = store.submit("bob", one(), False, 3)
    assert job.status == "pending" and ahead == 6.0  # alice's three are queued before bob's
    jobs, total = store.list("alice")
    assert total == 3 and all(j.owner == "alice" for j in jobs)
    assert jobs[0].seq > jobs[-1].seq  # newest first
    # Finished jobs free their slot; active ones (dispatched, processing) keep it.
    (claimed,) = store.claim(1)
    assert claimed.owner == "alice" and claimed.status == "dispatched"
    with pytest.raises(QueueFull):
        store.submit("alice", one(), False, 3)
    assert store.mark_processing(claimed.job_id) and store.complete(claimed.job_id)
    store.submit("alice", one(), False, 3)


@pytest.mark.parametrize("shared", [True, False])
def test_ten_concurrent_submissions_at_nine_admit_exactly_one(tmp_path, shared):
    path = tmp_path / "sim.db"
    first = JobStore(path)
    for _ in range(9):
        first.submit("k", one(), False, 10)
    # One store shared by threads (the relay), or a store each: ten connections racing on the file.
    stores = [first] * 10 if shared else [JobStore(path) for _ in range(10)]
    barrier = threading.Barrier(10)
    results: list[str] = []

    def submit(s: JobStore) -> None:
        barrier.wait()
        try:
            s.submit("k", one(), False, 10)
            results.append("ok")
        except QueueFull:
            results.append("full")

    threads = [threading.Thread(target=submit, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["full"] * 9 + ["ok"]
    assert first.active_count("k") == 10
    for s in set(stores):
        s.close()


def test_jobs_survive_reopening_and_interrupted_ones_retry_then_fail(tmp_path):
    path = tmp_path / "sim.db"
    store = JobStore(path)
    a, _ = store.submit("k", one(), False, 10)
    b, _ = store.submit("k", one(), False, 10)
    c, _ = store.submit("k", one(), False, 10)
    claimed = store.claim(2)
    assert [j.job_id for j in claimed] == [a.job_id, b.job_id] and all(len(j.stream_ids) == 1 for j in claimed)
    assert store.mark_processing(a.job_id)
    # Never closed: as after kill -9, another connection sees every committed change.
    again = JobStore(path)
    assert {j.job_id: j.status for j in again.interrupted()} == {a.job_id: "processing", b.job_id: "dispatched"}
    assert again.recover(max_retries=2) == {a.job_id: "pending", b.job_id: "pending"}
    got = again.get(a.job_id)
    assert (got.status, got.retry_count, got.stream_ids, got.started_at) == ("pending", 1, [], None)
    assert "stopped while the job was processing" in got.error_message
    assert again.get(c.job_id).retry_count == 0
    # Each interrupted attempt counts; after max_retries retries the job fails.
    for expected in ("pending", "failed"):
        job = next(j for j in again.claim(3) if j.job_id == a.job_id)
        fresh = job.stream_ids
        assert fresh and fresh != claimed[0].stream_ids  # a new attempt writes new recordings
        assert again.recover(max_retries=2)[a.job_id] == expected
    failed = again.get(a.job_id)
    assert failed.status == "failed" and failed.retry_count == 2 and failed.completed_at is not None
    assert "gave up after 3 attempts" in failed.error_message
    assert (again.get(b.job_id).status, again.get(c.job_id).status) == ("failed", "pending")  # b: one more cut
    store.close()
    again.close()


def test_a_clean_shutdown_puts_jobs_back_without_counting(store):
    job, _ = store.submit("k", one(), False, 10)
    store.claim(1)
    store.mark_processing(job.job_id)
    assert store.attempt_failed(job.job_id, "the relay stopped", 2, count=False) == "pending"
    assert store.get(job.job_id).retry_count == 0
    assert store.attempt_failed(job.job_id, "late", 2) is None  # no longer in flight: nothing to settle


def test_cancel_rules(store):
    pending, _ = store.submit("k", one(), False, 10)
    dispatched, _ = store.submit("k", one(), False, 10)
    processing, _ = store.submit("k", one(), False, 10)
    # Claim all three, then put the first back to pending.
    store.claim(3)
    store.attempt_failed(pending.job_id, "x", 2, count=False)
    store.mark_processing(processing.job_id)

    assert store.cancel("k", pending.job_id).status == "cancelled"
    assert store.cancel("k", dispatched.job_id).status == "cancelled"
    assert not store.mark_processing(dispatched.job_id)  # the worker then never runs it
    for job_id, status in ((processing.job_id, "processing"), (pending.job_id, "cancelled")):
        with pytest.raises(RelayError) as err:
            store.cancel("k", job_id)
        assert (err.value.status, err.value.code, err.value.details["status"]) == (409, "NOT_CANCELLABLE", status)
    store.complete(processing.job_id)
    with pytest.raises(RelayError) as err:
        store.cancel("k", processing.job_id)
    assert err.value.details["status"] == "completed"
    for owner, job_id in (("someone-else", pending.job_id), ("k", "nope")):
        with pytest.raises(RelayError) as err:
            store.cancel(owner, job_id)
        assert err.value.status == 404
    assert store.list("k", ("cancelled",))[1] == 2
    assert store.list("k", ("pending", "dispatched", "processing"))[1] == 0


def test_rate_comes_from_completed_jobs(tmp_path):
    clock = FakeClock()
    store = JobStore(tmp_path / "sim.db", clock=clock)
    assert store.rate() is None
    job, _ = store.submit("k", one(), False, 10)  # 2 s of video
    store.claim(1)
    store.mark_processing(job.job_id)
    clock.advance(0.5)
    store.complete(job.job_id)
    assert store.rate() == pytest.approx(0.25)
    store.close()


# -------------------------------------------------------------------------------------- worker

SMALL = VideoSpec(width=64, height=48, fps=25, bitrate_kbps=300, keyframe_interval_seconds=1)


def test_the_worker_renders_against_a_virtual_clock(tmp_path):
    script = validate_script([
        {"timestamp_ms": 0, "start": {"prompt": "forest"}},
        {"timestamp_ms": 1001, "interact": {"prompt": "snow"}},  # the first frame at or after: 1040 ms
        {"timestamp_ms": 1990, "interact": {"prompt": "night"}},  # after the last frame (1960 ms): logged at the end
        {"timestamp_ms": 2000, "end": {}},
    ], 150)
    result = record_script(script, SMALL, store_dir=str(tmp_path), stream_id="s1", owner="o")
    assert result.status == "complete" and result.frame_count == 50 and result.duration_seconds == 2.0
    events = [json.loads(x) for x in (tmp_path / "recordings" / "s1" / "events.jsonl").read_text().splitlines()]
    assert [(e["type"], e["offset_ms"]) for e in events] == [
        ("stream_started", 0), ("prompt_applied", 1040), ("prompt_applied", 2000), ("stream_ended", 2000)]
    assert events[1]["timestamp_ms"] == 1001 and events[1]["source"] == "simulation"
    meta = RecordingStore(tmp_path).get("s1")
    assert meta["status"] == "complete" and meta["owner"] == "o" and meta["source"] == "simulation"
    assert meta["ended_at"] - meta["started_at"] == pytest.approx(2.0)
    assert frame_count(3000, 25) == 75 and frame_count(3001, 25) == 76


def test_a_video_made_elsewhere_becomes_a_recording_in_any_codec(tmp_path):
    # A hosted simulation's output: H.264 is copied packet for packet; another codec (VP8 here) is
    # decoded and encoded once. Either way the recording is H.264 with the script's prompts.
    import av
    import numpy as np

    script = validate_script([{"timestamp_ms": 0, "start": {"prompt": "forest"}},
                              {"timestamp_ms": 1000, "interact": {"prompt": "snow"}},
                              {"timestamp_ms": 2000, "end": {}}], 150)
    record_script(script, SMALL, store_dir=str(tmp_path / "h264"), stream_id="h", owner="o")
    vp8 = tmp_path / "vp8.webm"
    with av.open(str(vp8), "w") as container:
        stream = container.add_stream("libvpx", rate=25)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        for i in range(50):
            frame = av.VideoFrame.from_ndarray(np.full((64, 96, 3), i * 5, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    bframes = tmp_path / "bframes.mp4"  # High profile with B-frames: decode order is not display order
    with av.open(str(bframes), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.options = {"bf": "3", "profile": "high"}
        for i in range(50):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 5, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    sources = {"copied": tmp_path / "h264" / "recordings" / "h" / "video.mp4", "encoded": vp8, "reordered": bframes}
    for stream_id, source in sources.items():
        result = import_video(str(source), script, SMALL, store_dir=str(tmp_path), stream_id=stream_id, owner="o")
        assert (result.status, result.frame_count, result.duration_seconds) == ("complete", 50, 2.0), stream_id
        with av.open(str(tmp_path / "recordings" / stream_id / "video.mp4")) as container:
            video = container.streams.video[0]
            assert video.codec_context.name == "h264"
            frames = list(container.decode(video))
            assert len(frames) == 50
            assert [f.pts for f in frames] == sorted(f.pts for f in frames)  # shown in order
        events = [json.loads(x) for x in (tmp_path / "recordings" / stream_id / "events.jsonl").read_text().splitlines()]
        assert [(e["type"], e["offset_ms"]) for e in events] == [
            ("stream_started", 0), ("prompt_applied", 1000), ("stream_ended", 2000)]
    assert RecordingStore(tmp_path).get("encoded")["width"] == 96
    with av.open(str(sources["copied"])) as a, av.open(str(tmp_path / "recordings" / "copied" / "video.mp4")) as b:
        assert [bytes(p) for p in a.demux(a.streams.video[0]) if p.size] == \
            [bytes(p) for p in b.demux(b.streams.video[0]) if p.size]


def test_a_prompt_at_a_frames_very_millisecond_is_that_frames_on_both_paths(tmp_path):
    # 8040 ms is frame 201 at 25 fps exactly, where 201 / 25 * 1000 in floating point falls just short
    # of 8040: the record loop times in exact fractions, so neither path logs it a frame late.
    script = validate_script([{"timestamp_ms": 0, "start": {"prompt": "forest"}},
                              {"timestamp_ms": 8040, "interact": {"prompt": "snow"}},
                              {"timestamp_ms": 8080, "end": {}}], 150)
    record_script(script, SMALL, store_dir=str(tmp_path), stream_id="rendered", owner="o")
    import_video(str(tmp_path / "recordings" / "rendered" / "video.mp4"), script, SMALL, store_dir=str(tmp_path),
                 stream_id="imported", owner="o")
    for stream_id in ("rendered", "imported"):
        events = [json.loads(x) for x in (tmp_path / "recordings" / stream_id / "events.jsonl").read_text().splitlines()]
        assert [(e["type"], e["offset_ms"]) for e in events] == [
            ("stream_started", 0), ("prompt_applied", 8040), ("stream_ended", 8080)], stream_id


def test_the_job_spec_is_frozen_and_crosses_the_process_pool(tmp_path, monkeypatch):
    monkeypatch.setenv("ODYSSEY_API_KEY", "secret-upstream-key")
    settings = make_settings(tmp_path, world_model={"width": 64, "height": 48, "kind": "hosted",
                                                    "url": "http://127.0.0.1:9/odyssey"})
    store = JobStore(tmp_path / "jobs.db")
    store.submit("o", [validate_script(GOOD, 150)], True, 10)
    (job,) = store.claim(1)
    store.close()
    spec = job_spec(job, settings, tmp_path / "jobs.db")
    assert pickle.loads(pickle.dumps(spec)) == spec
    assert (spec.video.width, spec.video.height) == (48, 64)  # portrait, as a live stream's
    assert spec.stream_ids == tuple(job.stream_ids) and spec.hosted.api_key == "secret-upstream-key"
    assert "secret-upstream-key" not in repr(spec)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.job_id = "another"  # type: ignore[misc]


# ------------------------------------------------------------------------------ service on threads

def _service(tmp_path, **simulations) -> Simulations:
    settings = make_settings(tmp_path, world_model={"width": 64, "height": 48},
                             simulations={"workers": 1, "poll_interval_seconds": 0.02, **simulations})
    return Simulations(settings, RecordingStore.from_settings(settings),
                       executor_factory=lambda n: concurrent.futures.ThreadPoolExecutor(n))


async def _until(service: Simulations, key: str, job_id: str, statuses: set[str], timeout: float = 20):
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while (job := await service.get(key, job_id)).status not in statuses:
        assert loop.time() < end, job
        await asyncio.sleep(0.02)
    return job


async def test_the_runner_completes_a_batch_and_portrait_swaps(tmp_path):
    service = _service(tmp_path)
    await service.start()
    try:
        accepted = await service.submit("key", {"scripts": [GOOD, GOOD], "portrait": True})
        assert accepted["status"] == "pending" and accepted["estimated_wait_seconds"] >= 1
        job = await _until(service, "key", accepted["job_id"], {"completed", "failed"})
        assert job.status == "completed", job
        recordings = RecordingStore(tmp_path / "data")
        metas = [recordings.get(s) for s in job.stream_ids]
        assert [(m["width"], m["height"], m["frame_count"]) for m in metas] == [(48, 64, 50)] * 2
        assert all(m["owner"] == owner_id("key") and m["simulation_job_id"] == job.job_id for m in metas)
        assert [m["script_index"] for m in metas] == [0, 1]
        with pytest.raises(RelayError) as err:
            await service.get("other-key", job.job_id)
        assert err.value.status == 404
    finally:
        await service.close()


async def test_a_failing_attempt_is_retried_then_failed_and_leaves_no_recording(tmp_path, monkeypatch):
    calls = []

    def broken(script, video, **kwargs):
        calls.append(kwargs["stream_id"])
        (tmp_path / "data" / "recordings" / kwargs["stream_id"]).mkdir(parents=True)  # a half-written attempt
        raise OSError("disk on fire")

    monkeypatch.setattr(worker, "record_script", broken)
    service = _service(tmp_path, max_retries=1)
    await service.start()
    try:
        job_id = (await service.submit("key", {"script": GOOD}))["job_id"]
        job = await _until(service, "key", job_id, {"failed", "completed"})
    finally:
        await service.close()
    assert job.status == "failed" and job.retry_count == 1 and len(calls) == 2
    assert "disk on fire" in job.error_message and "gave up after 2 attempts" in job.error_message
    assert job.stream_ids == [] and list((tmp_path / "data" / "recordings").iterdir()) == []


async def test_quota_error_carries_details_and_retry_after(tmp_path):
    service = _service(tmp_path)
    await service.open()  # no runner: everything stays pending
    try:
        for _ in range(10):
            await service.submit("key", {"script": GOOD})
        with pytest.raises(RelayError) as err:
            await service.submit("key", {"script": GOOD})
        e = err.value
        assert (e.status, e.code, e.details) == (429, "SIMULATION_QUEUE_FULL", {"pending": 10, "limit": 10})
        assert int(e.headers()["Retry-After"]) >= 1
    finally:
        await service.close()


async def test_opening_sweeps_what_a_killed_hosted_download_left(tmp_path):
    service = _service(tmp_path)
    scratch = Path(service._settings.server.data_dir) / worker.HOSTED_SCRATCH_DIR / "job-1"
    scratch.mkdir(parents=True)
    (scratch / "0.mp4").write_bytes(b"half a video")
    await service.open()
    try:
        assert not scratch.parent.exists()
    finally:
        await service.close()
