"""Simulations on a real server: quota and its race, validation, cancel rules, a completed script's
recording, and kill -9 mid-job then restart."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import av
import pytest

from relay.client import RelayAPIError, RelayClient
from tests.conftest import API_KEY, OTHER_KEY, start_relay_process

AUTH = {"Authorization": f"Bearer {API_KEY}"}
OTHER = {"Authorization": f"Bearer {OTHER_KEY}"}

SCRIPT_3S = [
    {"timestamp_ms": 0, "start": {"prompt": "a calm ocean at sunset"}},
    {"timestamp_ms": 1000, "interact": {"prompt": "storm clouds roll in"}},
    {"timestamp_ms": 2000, "interact": {"prompt": "night falls over the sea"}},
    {"timestamp_ms": 3000, "end": {}},
]


def script(seconds: float, prompt: str = "desert dunes at noon") -> list[dict]:
    return [{"timestamp_ms": 0, "start": {"prompt": prompt}}, {"timestamp_ms": int(seconds * 1000), "end": {}}]


# Long enough that the one worker is still on the first job while a test fills the queue.
LONG = script(150)


async def post(http, base: str, body: dict, headers=AUTH) -> tuple[int, dict, dict]:
    async with http.post(f"{base}/v1/simulations", json=body, headers=headers) as r:
        return r.status, await r.json(), dict(r.headers)


async def until_status(client: RelayClient, job_id: str, wanted: set[str], timeout: float = 30) -> dict:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        job = await client.get_simulation(job_id)
        if job["status"] in wanted:
            return job
        assert loop.time() < end, f"job still {job['status']}: {job}"
        await asyncio.sleep(0.05)


async def test_a_three_second_script_becomes_a_recording(relay_factory, http, tmp_path):
    relay = await relay_factory(simulations={"workers": 1})
    async with RelayClient(relay.url, API_KEY) as client:
        accepted = await client.simulate(SCRIPT_3S)
        assert set(accepted) == {"job_id", "status", "created_at", "estimated_wait_seconds"}
        assert accepted["status"] == "pending" and accepted["estimated_wait_seconds"] >= 1
        job = await until_status(client, accepted["job_id"], {"completed", "failed"})
        assert job["status"] == "completed", job
        assert job["retry_count"] == 0 and job["error_message"] is None
        assert job["started_at"] and job["completed_at"] and job["created_at"]
        (rec,) = job["streams"]
        assert rec["status"] == "complete" and (rec["width"], rec["height"]) == (320, 176)
        assert abs(rec["frame_count"] - 75) <= 3, rec

        async with http.get(rec["video_url"]) as r:
            assert r.status == 200 and r.content_type == "video/mp4"
            (tmp_path / "video.mp4").write_bytes(await r.read())
        with av.open(str(tmp_path / "video.mp4")) as container:
            stream = container.streams.video[0]
            assert stream.codec_context.name == "h264"
            frames = sum(1 for _ in container.decode(stream))
        assert abs(frames - 75) <= 3, frames

        async with http.get(rec["events_url"]) as r:
            events = [json.loads(line) for line in (await r.text()).splitlines()]
        prompts = [e["prompt"] for e in events if e["type"] in ("stream_started", "prompt_applied")]
        assert prompts == ["a calm ocean at sunset", "storm clouds roll in", "night falls over the sea"]
        applied = [e for e in events if e["type"] == "prompt_applied"]
        assert all(e["source"] == "simulation" for e in applied)
        assert [e["offset_ms"] for e in applied] == [1000, 2000]  # the virtual clock, not the wall clock
        assert events[-1] == {"type": "stream_ended", "offset_ms": 3000, "reason": "ended"}

        listing = await client.request("GET", "/v1/recordings")
        assert rec["stream_id"] in [r["stream_id"] for r in listing["recordings"]]
        done = await client.list_simulations(status="completed")
        assert [j["job_id"] for j in done["jobs"]] == [job["job_id"]] and done["total"] == 1
        assert (await client.list_simulations(active=True))["total"] == 0

        with pytest.raises(RelayAPIError) as err:
            await client.cancel_simulation(job["job_id"])
        assert err.value.status == 409 and err.value.code == "NOT_CANCELLABLE"
    async with http.get(f"{relay.url}/v1/simulations/{job['job_id']}", headers=OTHER) as r:
        assert r.status == 404  # another key's job does not exist for it
    async with http.get(f"{relay.url}/v1/simulations", headers=OTHER) as r:
        assert (await r.json())["total"] == 0


async def test_ten_accepted_then_the_eleventh_is_429(relay_factory, http):
    relay = await relay_factory(simulations={"workers": 1})
    ids = []
    for _ in range(10):
        status, body, _ = await post(http, relay.url, {"script": LONG})
        assert status == 202, body
        ids.append(body["job_id"])
    status, body, headers = await post(http, relay.url, {"script": LONG})
    assert status == 429
    assert body["error"]["code"] == "SIMULATION_QUEUE_FULL"
    assert body["error"]["details"] == {"pending": 10, "limit": 10}
    assert int(headers["Retry-After"]) >= 1
    status, _, _ = await post(http, relay.url, {"script": LONG}, headers=OTHER)
    assert status == 202  # the quota is per key
    # A slot frees when one of the key's jobs leaves the queue.
    async with http.delete(f"{relay.url}/v1/simulations/{ids[-1]}", headers=AUTH) as r:
        assert r.status == 200 and (await r.json())["status"] == "cancelled"
    status, _, _ = await post(http, relay.url, {"script": LONG})
    assert status == 202


async def test_ten_concurrent_submissions_at_nine_pending_admit_exactly_one(relay_factory, http):
    relay = await relay_factory(simulations={"workers": 1})
    for _ in range(9):
        status, _, _ = await post(http, relay.url, {"script": LONG})
        assert status == 202
    answers = await asyncio.gather(*(post(http, relay.url, {"script": LONG}) for _ in range(10)))
    statuses = sorted(a[0] for a in answers)
    assert statuses == [202] + [429] * 9, statuses
    async with http.get(f"{relay.url}/v1/simulations?active=true&limit=100", headers=AUTH) as r:
        assert (await r.json())["total"] == 10


START = {"timestamp_ms": 0, "start": {"prompt": "hills"}}
END = {"timestamp_ms": 2000, "end": {}}
BAD_SCRIPTS = [
    # (script, index named, reason)
    ([{"timestamp_ms": 0, "interact": {"prompt": "x"}}, END], 0, "start_not_first"),
    ([{"timestamp_ms": 5, "start": {"prompt": "hills"}}, END], 0, "start_not_at_zero"),
    ([START, {"timestamp_ms": 500, "start": {"prompt": "again"}}, END], 1, "duplicate_start"),
    ([START, {"timestamp_ms": 900, "interact": {"prompt": "a"}},
      {"timestamp_ms": 800, "interact": {"prompt": "b"}}, END], 2, "not_ascending"),
    ([START, {"timestamp_ms": 900, "interact": {"prompt": "a"}},
      {"timestamp_ms": 900, "interact": {"prompt": "b"}}, END], 2, "not_ascending"),
    ([START, {"timestamp_ms": 1000, "end": {}}, {"timestamp_ms": 1500, "interact": {"prompt": "late"}}],
     1, "end_not_last"),
    ([START, {"timestamp_ms": 1000, "interact": {"prompt": "no end"}}], 1, "missing_end"),
    ([START], 0, "missing_end"),
    ([START, {"timestamp_ms": 0, "end": {}}], 1, "end_not_after_start"),
    ([START, {"timestamp_ms": 500, "interact": {"prompt": "   "}}, END], 1, "invalid_prompt"),
    ([START, {"timestamp_ms": 500, "interact": {"prompt": "x" * 2001}}, END], 1, "prompt_too_long"),
    ([{"timestamp_ms": 0, "start": {}}, END], 0, "invalid_prompt"),
    ([START, {"timestamp_ms": 151_000, "end": {}}], 1, "too_long"),
    ([START, {"timestamp_ms": -1, "end": {}}], 1, "invalid_timestamp"),
    ([START, {"timestamp_ms": 1.5, "interact": {"prompt": "a"}}, END], 1, "invalid_timestamp"),
    ([START, {"interact": {"prompt": "a"}}, END], 1, "missing_timestamp"),
    ([START, {"timestamp_ms": 500}, END], 1, "no_action"),
    ([START, {"timestamp_ms": 500, "interact": {"prompt": "a"}, "end": {}}, END], 1, "several_actions"),
    ([START, "not an entry", END], 1, "not_an_object"),
    ([START, {"timestamp_ms": 500, "interact": {"prompt": "a", "strength": 2}}, END], 1, "unknown_field"),
    ([{"timestamp_ms": 0, "start": {"prompt": "hills", "image": "not base64!"}}, END], 0, "invalid_image"),
]


async def test_each_bad_script_is_422_naming_its_entry(relay_factory, http):
    relay = await relay_factory(simulations={"workers": 1})
    for bad, index, reason in BAD_SCRIPTS:
        status, body, _ = await post(http, relay.url, {"script": bad})
        assert status == 422, (bad, body)
        error = body["error"]
        assert error["code"] == "INVALID_REQUEST"
        assert error["details"]["index"] == index and error["details"]["reason"] == reason, (bad, error)
        assert f"entry {index}" in error["message"] or index == 0, error["message"]
    # A batch names the script as well as the entry.
    status, body, _ = await post(http, relay.url, {"scripts": [SCRIPT_3S, [START, {"timestamp_ms": 0, "end": {}}]]})
    assert status == 422
    assert body["error"]["details"] == {"script_index": 1, "index": 1, "field": "timestamp_ms",
                                        "reason": "end_not_after_start"}
    for whole, reason in (({}, "missing"), ({"script": []}, "empty"), ({"script": SCRIPT_3S, "scripts": []}, "both"),
                          ({"script": SCRIPT_3S, "portrait": "yes"}, "not_a_boolean")):
        status, body, _ = await post(http, relay.url, whole)
        assert status == 422 and body["error"]["details"]["reason"] == reason, body
    malformed = {**AUTH, "Content-Type": "application/json"}
    async with http.post(f"{relay.url}/v1/simulations", data="{", headers=malformed) as r:
        assert r.status == 400
    async with http.post(f"{relay.url}/v1/simulations", json={"script": SCRIPT_3S}) as r:
        assert r.status == 401
    async with http.get(f"{relay.url}/v1/simulations", headers=AUTH) as r:
        assert (await r.json())["total"] == 0  # nothing bad was queued


async def test_cancel_rules(relay_factory, http):
    relay = await relay_factory(simulations={"workers": 1})
    async with RelayClient(relay.url, API_KEY) as client:
        running = (await client.simulate(LONG))["job_id"]
        waiting = (await client.simulate(LONG))["job_id"]
        await until_status(client, running, {"processing"})
        cancelled = await client.cancel_simulation(waiting)
        assert cancelled["status"] == "cancelled" and cancelled["job_id"] == waiting
        assert cancelled["streams"] == []
        for job_id, status in ((waiting, "cancelled"), (running, "processing")):
            with pytest.raises(RelayAPIError) as err:
                await client.cancel_simulation(job_id)
            assert err.value.status == 409 and err.value.code == "NOT_CANCELLABLE"
            assert err.value.details["status"] == status
        for method in ("GET", "DELETE"):
            async with http.request(method, f"{relay.url}/v1/simulations/{running}", headers=OTHER) as r:
                assert r.status == 404 and (await r.json())["error"]["code"] == "NOT_FOUND"
        with pytest.raises(RelayAPIError) as err:
            await client.cancel_simulation("no-such-job")
        assert err.value.status == 404
        active = await client.list_simulations(active=True)
        assert [j["job_id"] for j in active["jobs"]] == [running]
        assert [j["job_id"] for j in (await client.list_simulations(status="cancelled"))["jobs"]] == [waiting]
        both = await client.list_simulations(status="cancelled,processing")
        assert both["total"] == 2 and [j["job_id"] for j in both["jobs"]] == [waiting, running]  # newest first
        with pytest.raises(RelayAPIError) as err:
            await client.list_simulations(status="running")
        assert err.value.status == 400
        assert (await client.get_simulation(waiting))["status"] == "cancelled"  # stays cancelled


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and alive(int(entry)):
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie has exited; only its parent's wait is missing


async def test_a_worker_that_dies_mid_job_is_replaced_and_the_job_retried(relay_factory):
    from relay.web import SIMULATIONS

    relay = await relay_factory(simulations={"workers": 1, "poll_interval_seconds": 0.05})
    async with RelayClient(relay.url, API_KEY) as client:
        job_id = (await client.simulate(script(20, "volcano at night")))["job_id"]  # 500 frames: killed mid-job
        await until_status(client, job_id, {"processing"})
        pool = relay.app[SIMULATIONS]._pool
        (worker,) = pool._processes.values()
        os.kill(worker.pid, signal.SIGKILL)  # the OOM killer, say
        job = await until_status(client, job_id, {"completed", "failed"})
        assert job["status"] == "completed" and job["retry_count"] == 1, job
        assert job["error_message"] is None
        (rec,) = job["streams"]
        assert rec["frame_count"] == 500
        listing = await client.request("GET", "/v1/recordings")
        assert [r["stream_id"] for r in listing["recordings"]] == [rec["stream_id"]]  # the cut attempt is gone


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc to find the worker processes")
async def test_kill_9_during_processing_then_restart_every_job_completes(tmp_path, http):
    data = tmp_path / "data"
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[server]\nport = 0\ndata_dir = "{data}"\n[auth]\napi_keys = ["{API_KEY}"]\n'
        "[world_model]\nwidth = 320\nheight = 176\n[simulations]\nworkers = 1\npoll_interval_seconds = 0.1\n"
    )
    log = open(tmp_path / "relay.log", "ab")

    proc, base = await start_relay_process(config, stderr=log)
    workers: list[int] = []
    try:
        async with RelayClient(base, API_KEY) as client:
            # 20 s scripts (500 frames, about half a second of work each): long enough to be cut mid-recording.
            ids = [(await client.simulate(script(20, f"{p} at dawn")))["job_id"] for p in ("forest", "ocean", "lava")]
            cut = None
            while cut is None:
                for job_id in ids:
                    if (await client.get_simulation(job_id))["status"] == "processing":
                        cut = job_id
                await asyncio.sleep(0.02)
            while not any(p.stat().st_size for p in (data / "recordings").glob("*/video.mp4")):
                await asyncio.sleep(0.02)  # until the job is mid-recording: its first fragments are on disk
            workers = children(proc.pid)
            assert workers  # the worker (and multiprocessing's resource tracker)
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    # Orphaned, the worker notices its parent is gone and exits, so it cannot write on behind the next run.
    for _ in range(50):
        if not any(alive(pid) for pid in workers):
            break
        await asyncio.sleep(0.05)
    assert not any(alive(pid) for pid in workers)

    proc, base = await start_relay_process(config, stderr=log)
    try:
        async with RelayClient(base, API_KEY) as client:
            jobs = [await client.wait_simulation(job_id, timeout=40, interval=0.1) for job_id in ids]
            assert [j["status"] for j in jobs] == ["completed"] * 3, jobs
            by_id = {j["job_id"]: j for j in jobs}
            assert by_id[cut]["retry_count"] == 1
            for job in jobs:
                (rec,) = job["streams"]
                assert rec["status"] == "complete" and rec["frame_count"] == 500, rec
            # The cut attempt's recording was taken back: exactly one recording per script remains.
            listing = await client.request("GET", "/v1/recordings")
            assert sorted(r["stream_id"] for r in listing["recordings"]) == sorted(
                j["streams"][0]["stream_id"] for j in jobs)
            assert sorted(os.listdir(data / "recordings")) == sorted(j["streams"][0]["stream_id"] for j in jobs)
    finally:
        proc.terminate()
        await proc.wait()
        log.close()


async def test_live_spectators_keep_their_frame_rate_while_two_simulations_run(relay_factory):
    from relay.client import Spectator
    from tests.conftest import frames_for

    relay = await relay_factory(simulations={"workers": 2},
                                limits={"stream_max_seconds": 60, "idle_timeout_seconds": 60})
    async with RelayClient(relay.url, API_KEY) as client, client.connect() as conn:
        await conn.start_stream("a calm ocean at sunset")
        b = conn.broadcast
        async with Spectator(b["whep_url"], b["spectator_token"]) as viewer:
            await viewer.track.recv()
            jobs = [(await client.simulate(LONG))["job_id"] for _ in range(2)]
            for job_id in jobs:
                await until_status(client, job_id, {"processing"})
            frames = await frames_for(viewer.track, 2.0)
            still = [(await client.get_simulation(j))["status"] for j in jobs]
        assert still == ["processing", "processing"], "the measurement must overlap both simulations"
        assert len(frames) / 2.0 >= 22, f"{len(frames) / 2.0:.1f} fps while two simulations ran"
