"""Storage under pressure: replay links that keep their expiry, Range answers, a bounded job store, a full disk."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import subprocess
import time
from urllib.parse import parse_qs, urlsplit

import pytest

from relay.client import RelayClient
from relay.clock import FakeClock
from relay.recordings import RecordingStore, load_or_create_secret, owner_id
from relay.simulations import JobStore
from relay.simulations.record import record_script
from relay.simulations.spec import VideoSpec
from relay.web import RECORDINGS
from tests.conftest import API_KEY, eventually

AUTH = {"Authorization": f"Bearer {API_KEY}"}
VIDEO = bytes(range(256)) * 40  # 10,240 bytes: what is served is what is on disk, whatever it holds


def seed_recording(data_dir, stream_id: str = "a" * 32) -> str:
    """A finished recording as the recorder leaves it (metadata and video), without running a stream."""
    directory = data_dir / "recordings" / stream_id
    directory.mkdir(parents=True)
    (directory / "video.mp4").write_bytes(VIDEO)
    now = time.time()
    (directory / "metadata.json").write_text(json.dumps({
        "stream_id": stream_id, "owner": owner_id(API_KEY), "width": 320, "height": 176, "fps": 25,
        "started_at": now - 10, "ended_at": now - 5, "duration_seconds": 5.0, "frame_count": 125,
        "status": "complete", "error": None}))
    return stream_id


def expiry(url: str) -> int:
    return int(parse_qs(urlsplit(url).query)["expires"][0])


# ------------------------------------------------------------------------------ replay links


async def test_a_replay_link_hands_on_links_that_expire_with_it(relay_factory, tmp_path, http):
    relay = await relay_factory()
    stream_id = seed_recording(tmp_path / "data")
    store = relay.app[RECORDINGS]
    # A link minted 50 minutes ago: ten minutes left.
    leaked = store.signed_url(f"/recordings/{stream_id}", now=time.time() - 3000)
    async with http.get(f"{relay.url}/recordings/{stream_id}/info?{urlsplit(leaked).query}") as r:
        assert r.status == 200
        info = await r.json()
    for field in ("replay_url", "video_url", "events_url", "thumbnail_url", "preview_url"):
        assert expiry(info[field]) == expiry(leaked), field  # not renewed for another hour
    # Following its own replay_url again and again never moves the expiry either.
    again = urlsplit(info["replay_url"])
    async with http.get(f"{relay.url}{again.path}/info?{again.query}") as r:
        assert expiry((await r.json())["replay_url"]) == expiry(leaked)
    # Once it has expired, the info call and the files it named are refused.
    gone = store.signed_url(f"/recordings/{stream_id}", now=time.time() - 3601)
    async with http.get(f"{relay.url}/recordings/{stream_id}/info?{urlsplit(gone).query}") as r:
        assert r.status == 403 and (await r.json())["error"]["code"] == "FORBIDDEN"
    # Only the owner's authenticated GET mints fresh links (an hour).
    async with http.get(f"{relay.url}/v1/recordings/{stream_id}", headers=AUTH) as r:
        fresh = await r.json()
    assert expiry(fresh["replay_url"]) >= time.time() + 3500


# ------------------------------------------------------------------------------------ Range


async def test_one_satisfiable_range_is_served_as_206(relay_factory, tmp_path, http):
    relay = await relay_factory()
    stream_id = seed_recording(tmp_path / "data")
    url = relay.url + relay.app[RECORDINGS].signed_url(f"/v1/recordings/{stream_id}/video.mp4")
    size = len(VIDEO)
    for header, first, last in (("bytes=100-199", 100, 199), ("bytes=10000-", 10000, size - 1),
                                ("bytes=-40", size - 40, size - 1), ("bytes=10200-99999", 10200, size - 1)):
        async with http.get(url, headers={"Range": header}) as r:
            assert r.status == 206, header
            assert r.headers["Content-Range"] == f"bytes {first}-{last}/{size}", header
            assert await r.read() == VIDEO[first:last + 1], header
    async with http.get(url) as r:
        assert r.status == 200 and await r.read() == VIDEO


@pytest.mark.parametrize("header", [
    "bytes=-0",  # an empty suffix: no bytes, never the whole file as 206
    f"bytes={len(VIDEO)}-",  # starts at the end
    "bytes=99999-100000",  # past the end
    "bytes=0-9,20-29",  # several ranges
    "bytes=0-9, 20-29",
    "bytes=200-100",  # ends before it starts
    "bytes=-",
    "bytes=abc",
    "items=0-9",
    "bytes=0x10-",
    "bytes=\u0663-",  # a non-ASCII digit
    "bytes=" + "1" * 5000 + "-",  # past int()'s digit limit: was a 500
])
async def test_an_unsatisfiable_or_malformed_range_is_416_in_the_error_shape(relay_factory, tmp_path, http, header):
    relay = await relay_factory()
    stream_id = seed_recording(tmp_path / "data")
    url = relay.url + relay.app[RECORDINGS].signed_url(f"/v1/recordings/{stream_id}/video.mp4")
    async with http.get(url, headers={"Range": header}) as r:
        assert r.status == 416
        assert r.headers["Content-Range"] == f"bytes */{len(VIDEO)}"
        body = await r.json()
    assert body["error"]["code"] == "RANGE_NOT_SATISFIABLE"
    assert body["error"]["details"] == {"size": len(VIDEO)}
    assert set(body["error"]) == {"code", "message", "action", "details"}


# ------------------------------------------------------------------------------ the job store


def big_script(entries: int = 450) -> list[dict]:
    """~0.9 MB: as many 2,000-character prompts as the issue's script had."""
    script = [{"timestamp_ms": 0, "start": {"prompt": "s" * 2000}}]
    script += [{"timestamp_ms": i, "interact": {"prompt": chr(97 + i % 26) * 2000}} for i in range(1, entries)]
    return script + [{"timestamp_ms": entries, "end": {}}]


def on_disk(path) -> int:
    return sum(os.path.getsize(f) for f in (str(path), f"{path}-wal") if os.path.exists(f))


def test_finished_jobs_past_keep_are_swept_and_active_ones_never(tmp_path):
    clock = FakeClock()
    store = JobStore(tmp_path / "sim.db", clock=clock, max_finished=100)
    try:
        script = [big_script(3)]
        cancelled, _ = store.submit("k", script, False, 10)
        store.cancel("k", cancelled.job_id)
        completed, _ = store.submit("k", script, False, 10)
        failed, _ = store.submit("k", script, False, 10)
        store.claim(2)
        for job in (completed, failed):
            assert store.mark_processing(job.job_id)
        store.complete(completed.job_id)
        assert store.attempt_failed(failed.job_id, "boom", max_retries=0) == "failed"
        pending, _ = store.submit("k", script, False, 10)  # as old as the others by the end
        clock.advance(3600)
        late, _ = store.submit("k", script, False, 10)
        store.cancel("k", late.job_id)  # finished an hour after the others

        assert store.sweep(keep_seconds=3600 + 1) == 0  # none is older than that yet
        clock.advance(2)
        assert store.sweep(keep_seconds=3600 + 1) == 3
        assert [store.get(j.job_id) for j in (cancelled, completed, failed)] == [None, None, None]
        assert store.get(pending.job_id).status == "pending"
        assert store.get(late.job_id).status == "cancelled"
        # A finished job keeps how many scripts it had, not the scripts themselves.
        assert store.get(late.job_id).scripts == [[]] and store.get(pending.job_id).scripts == script
    finally:
        store.close()


def test_each_key_keeps_its_newest_finished_jobs_and_every_active_one(tmp_path):
    store = JobStore(tmp_path / "sim.db", clock=FakeClock(), max_finished=3)
    try:
        script = [big_script(3)]
        active = [store.submit("k", script, False, 100)[0] for _ in range(5)]
        finished = []
        for _ in range(6):
            job, _ = store.submit("k", script, False, 100)
            finished.append(store.cancel("k", job.job_id))
        other, _ = store.submit("other", script, False, 100)
        store.cancel("other", other.job_id)
        jobs, total = store.list("k", limit=100)
        assert total == 8
        assert {j.job_id for j in jobs} == {j.job_id for j in active + finished[-3:]}
        assert store.get(other.job_id) is not None  # one key's jobs never push out another's
    finally:
        store.close()


def test_the_store_file_stays_small_through_twenty_submit_and_cancel_cycles(tmp_path):
    """The issue's measurement (20 cycles of a 0.94 MB script: 1.5 MB -> 24.6 MB), now bounded."""
    path = tmp_path / "sim.db"
    store = JobStore(path, max_finished=1000)  # retention by age is not what keeps this small
    try:
        script = [big_script()]
        assert len(json.dumps(script)) > 900_000
        sizes = []
        for _ in range(20):
            job, _ = store.submit("k", script, False, 10)
            store.cancel("k", job.job_id)
            sizes.append(on_disk(path))
        store.sweep(keep_seconds=0)
        after_sweep = on_disk(path)
    finally:
        store.close()
    print(f"job store on disk (db + wal): after 1 cycle {sizes[0]} B, at most {max(sizes)} B, after 20 {sizes[-1]} B, "
          f"after a sweep {after_sweep} B")
    assert max(sizes) < 5_000_000, sizes  # one script's pages, reused cycle after cycle (was 24.6 MB and growing)
    assert after_sweep < 200_000  # the freed pages given back: the file holds 20 small rows


TINY = [{"timestamp_ms": 0, "start": {"prompt": "desert dunes at noon"}}, {"timestamp_ms": 40, "end": {}}]


async def finish(http, base: str, job_id: str) -> dict:
    """Cancel the job, or, if the worker has already started it, wait for it to complete."""
    async with http.delete(f"{base}/v1/simulations/{job_id}", headers=AUTH) as r:
        if r.status == 200:
            return await r.json()
        assert r.status == 409, await r.text()
    for _ in range(300):
        async with http.get(f"{base}/v1/simulations/{job_id}", headers=AUTH) as r:
            job = await r.json()
        if job["status"] not in ("pending", "dispatched", "processing"):
            return job
        await asyncio.sleep(0.05)
    raise AssertionError(f"job {job_id} still {job['status']}")


async def test_finished_jobs_past_keep_days_answer_404_and_a_key_keeps_max_finished_jobs(relay_factory, http):
    relay = await relay_factory(simulations={"workers": 1, "keep_days": 2 / 86400, "max_finished_jobs": 2,
                                             "sweep_interval_seconds": 0.1, "poll_interval_seconds": 0.05})
    ids = []
    for _ in range(4):
        async with http.post(f"{relay.url}/v1/simulations", json={"script": TINY}, headers=AUTH) as r:
            assert r.status == 202
            ids.append((await r.json())["job_id"])
        assert (await finish(http, relay.url, ids[-1]))["status"] in ("cancelled", "completed")
    async with http.get(f"{relay.url}/v1/simulations", headers=AUTH) as r:
        listed = await r.json()
    assert listed["total"] == 2 and {j["job_id"] for j in listed["jobs"]} == set(ids[2:])  # the oldest went first
    async with http.get(f"{relay.url}/v1/simulations/{ids[0]}", headers=AUTH) as r:
        assert r.status == 404 and (await r.json())["error"]["code"] == "NOT_FOUND"

    async def swept() -> bool:
        async with http.get(f"{relay.url}/v1/simulations/{ids[-1]}", headers=AUTH) as r:
            return r.status == 404
    await eventually(swept, timeout=10, what="the finished job swept after keep_days")


# ------------------------------------------------------------------------------- a full disk


class Disk:
    """data_dir on its own small tmpfs, so the disk can really be filled."""

    def __init__(self, path) -> None:
        self.path = path
        self.filler = path / "filler"

    def fill(self) -> None:
        """Take every free byte (a tmpfs hands out whole pages: nothing is left)."""
        with open(self.filler, "ab", buffering=0) as file:
            chunk = b"\0" * 65536
            while True:
                try:
                    file.write(chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    chunk = chunk[:len(chunk) // 2]
                    if not chunk:
                        return

    def free(self) -> None:
        self.filler.unlink()

    def leftovers(self) -> list[str]:
        """Temporary files on the disk, and this process's fds on anything in it but the job store."""
        tmp = [str(p) for p in self.path.rglob("*.tmp")]
        fds = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if target.startswith(str(self.path)) and "simulations.db" not in target:
                fds.append(target)
        return tmp + fds


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "data"
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield Disk(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def error_of(body: dict) -> dict:
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "action", "details"}, body
    return body["error"]


async def test_a_full_disk_refuses_a_simulation_with_507_and_leaves_nothing_behind(relay_factory, disk, http):
    relay = await relay_factory(simulations={"workers": 1})
    async with http.get(f"{relay.url}/v1/simulations", headers=AUTH) as r:
        assert r.status == 200  # the client's connection open before counting
    fds = len(os.listdir("/proc/self/fd"))
    disk.fill()
    big = [{"timestamp_ms": 0, "start": {"prompt": "p" * 2000}}]
    big += [{"timestamp_ms": i, "interact": {"prompt": "q" * 2000}} for i in range(1, 25)] + [
        {"timestamp_ms": 25, "end": {}}]
    for body in ({"script": big}, {"script": TINY}):
        async with http.post(f"{relay.url}/v1/simulations", json=body, headers=AUTH) as r:
            assert r.status == 507, await r.text()
            assert error_of(await r.json())["code"] == "INSUFFICIENT_STORAGE"
    assert disk.leftovers() == []
    assert len(os.listdir("/proc/self/fd")) == fds  # not one fd more for the refused writes
    async with http.get(f"{relay.url}/v1/simulations", headers=AUTH) as r:
        assert r.status == 200 and (await r.json())["total"] == 0  # nothing half-stored
    disk.free()
    async with http.post(f"{relay.url}/v1/simulations", json={"script": TINY}, headers=AUTH) as r:
        assert r.status == 202  # the same relay, once there is room again


async def test_a_recording_cut_by_a_full_disk_is_finalized_failed_with_its_reason(relay_factory, disk, http):
    relay = await relay_factory(limits={"stream_max_seconds": 3})
    async with RelayClient(relay.url, API_KEY) as client, client.connect() as conn:
        stream_id = (await conn.start_stream("a calm ocean at sunset"))["stream_id"]
        video = disk.path / "recordings" / stream_id / "video.mp4"
        await eventually(lambda: video.exists() and video.stat().st_size > 0, what="the recording under way")
        disk.fill()
        rec = await finished(http, relay.url, stream_id)
    print("recording's error:", rec["error"])
    assert rec["status"] == "failed", rec
    assert "No space left on device" in rec["error"], rec
    on_disk = json.loads((disk.path / "recordings" / stream_id / "metadata.json").read_text())
    assert on_disk["status"] == "failed" and "No space left on device" in on_disk["error"]  # not "recording"
    assert disk.leftovers() == []


async def test_recovery_on_a_full_disk_finalizes_what_a_crash_left(relay_factory, disk, tmp_path, http):
    # A crash mid-recording, as kill -9 leaves it: metadata still "recording", video cut mid-fragment.
    source = record_script([{"timestamp_ms": 0, "start": {"prompt": "forest"}}, {"timestamp_ms": 2000, "end": {}}],
                           VideoSpec(width=160, height=96, fps=25, bitrate_kbps=300, keyframe_interval_seconds=0.5),
                           store_dir=str(tmp_path / "elsewhere"), stream_id="b" * 32, owner=owner_id(API_KEY))
    assert source.status == "complete"
    directory = disk.path / "recordings" / source.stream_id
    shutil.copytree(tmp_path / "elsewhere" / "recordings" / source.stream_id, directory)
    for name in ("preview.mp4", "thumbnail.jpg"):
        (directory / name).unlink()
    meta = json.loads((directory / "metadata.json").read_text())
    (directory / "metadata.json").write_text(json.dumps({**meta, "status": "recording", "ended_at": None}, indent=1))
    with open(directory / "video.mp4", "r+b") as file:
        file.truncate(os.fstat(file.fileno()).st_size - 1000)
    JobStore(disk.path / "simulations.db").close()  # what that previous run left too
    load_or_create_secret(disk.path / "url-signing.key")
    disk.fill()

    # It starts on the full disk: recovery finalizes the recording, and simulations wait for room.
    relay = await relay_factory(simulations={"workers": 1, "poll_interval_seconds": 0.05})
    async with http.get(f"{relay.url}/v1/recordings/{source.stream_id}", headers=AUTH) as r:
        rec = await r.json()
    assert rec["status"] == "partial" and rec["frame_count"] > 0, rec
    assert json.loads((directory / "metadata.json").read_text())["status"] == "partial"
    assert disk.leftovers() == []  # the preview it could not make left no temporary file
    async with http.post(f"{relay.url}/v1/simulations", json={"script": TINY}, headers=AUTH) as r:
        assert r.status == 507 and error_of(await r.json())["code"] == "INSUFFICIENT_STORAGE"
    disk.free()

    async def accepted() -> bool:
        async with http.post(f"{relay.url}/v1/simulations", json={"script": TINY}, headers=AUTH) as r:
            return r.status == 202
    await eventually(accepted, timeout=5, what="simulations back once the disk has room")


async def finished(http, base: str, stream_id: str, timeout: float = 20) -> dict:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        async with http.get(f"{base}/v1/recordings/{stream_id}", headers=AUTH) as r:
            body = await r.json()
            if r.status == 200 and body["status"] != "recording":
                return body
        assert loop.time() < end, f"recording not finished: {body}"
        await asyncio.sleep(0.1)


def test_metadata_the_disk_refused_is_written_by_the_next_sweep_once_there_is_room(disk):
    store = RecordingStore(disk.path, retention_days=0)
    stream_id = "c" * 32
    store.directory(stream_id).mkdir(parents=True)
    disk.fill()
    result = store.recorder(stream_id, width=160, height=96, fps=25, owner="o").close("ended", timeout=10)
    assert result.status == "failed" and "No space left on device" in result.error
    assert not (store.directory(stream_id) / "metadata.json").exists()  # not even a file to rewrite in place
    assert store.get(stream_id)["status"] == "failed"  # shown from memory meanwhile
    assert store.sweep() == [] and not (store.directory(stream_id) / "metadata.json").exists()  # still full
    disk.free()
    store.sweep()
    on_disk = json.loads((store.directory(stream_id) / "metadata.json").read_text())
    assert on_disk["status"] == "failed" and "No space left on device" in on_disk["error"]
    assert disk.leftovers() == []
