"""What a simulation worker process runs: one attempt at a job, each script recorded as a standard
recording (``record.py``).

With ``[world_model] kind = "hosted"`` a job is the hosted model's to render: the worker submits its
scripts to the hosted API's /simulation-jobs, waits for the result, and imports each video (its H.264
packets copied, not re-encoded; the script's prompts logged at their timestamps), so the output is the
real model's, never the synthetic one's.

The service hands ``run_job`` to a spawn-context process pool with ``init_worker`` as its initializer;
``run_job`` is also callable in-process (tests run the service on a thread pool).
"""

from __future__ import annotations

import asyncio
import os
import signal
import tempfile
import threading
import time
from typing import Any

from ..media.recorder import STATUS_COMPLETE, RecordingResult
from ..worldmodel.hosted import HostedClient
from .record import import_video, record_script
from .spec import JobSpec
from .store import JobStore

__all__ = ["HOSTED_SCRATCH_DIR", "init_worker", "run_job"]

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


def run_job(spec: JobSpec) -> dict[str, Any]:
    """One attempt at a job: {"status": "completed" | "cancelled", ...}.

    Marks the job processing first, atomically and only if it is still dispatched, so a job cancelled
    while it waited for this worker is never run. Raises if any recording fails (the supervisor then
    deletes this attempt's recordings and retries or fails the job).
    """
    store = JobStore(spec.db_path)
    try:
        if not store.mark_processing(spec.job_id):
            return {"status": "cancelled"}
    finally:
        store.close()
    if spec.hosted is not None:
        return asyncio.run(_run_hosted(spec))
    return _completed(spec, [
        _recorded(index, record_script(script, spec.video, store_dir=spec.data_dir, stream_id=stream_id,
                                       owner=spec.owner,
                                       extra={"simulation_job_id": spec.job_id, "script_index": index}))
        for index, (script, stream_id) in enumerate(zip(spec.scripts, spec.stream_ids, strict=True))])


async def _run_hosted(spec: JobSpec) -> dict[str, Any]:
    """The hosted model renders the job; its videos become this job's recordings (same stream ids as a
    local run, so nothing above this function knows the difference)."""
    assert spec.hosted is not None
    client = HostedClient(spec.hosted.url, spec.hosted.api_key, api_key_env=spec.hosted.api_key_env)
    store = JobStore(spec.db_path)
    upstream_id = store.upstream_job(spec.job_id)  # an earlier attempt's, still worth waiting for
    finished = False
    # Under data_dir, not /tmp: a worker killed mid-download (a relay restart) leaves its partial
    # file where the next start sweeps it (Simulations.open).
    scratch = os.path.join(spec.data_dir, HOSTED_SCRATCH_DIR)
    os.makedirs(scratch, exist_ok=True)
    try:
        if upstream_id is None:
            upstream_id = await client.simulate([list(s) for s in spec.scripts], spec.portrait)
            store.set_upstream_job(spec.job_id, upstream_id)
        job = await client.finished_simulation(upstream_id)
        finished = True
        if job.get("status") != "completed":
            store.set_upstream_job(spec.job_id, None)  # a retry submits it afresh
            raise RuntimeError(f"the hosted simulation {upstream_id} {job.get('status')}: "
                               f"{job.get('error_message') or 'no reason given'}")
        streams = {s.get("script_index", i): s for i, s in enumerate(job.get("streams") or [])}
        results = []
        with tempfile.TemporaryDirectory(prefix=f"{spec.job_id}-", dir=scratch) as tmp:
            for index, (script, stream_id) in enumerate(zip(spec.scripts, spec.stream_ids, strict=True)):
                upstream = streams.get(index)
                if not upstream or not upstream.get("video_url"):
                    raise RuntimeError(f"the hosted simulation {upstream_id} has no video for script {index}")
                path = os.path.join(tmp, f"{index}.mp4")
                await client.download(upstream["video_url"], path)
                extra = {"simulation_job_id": spec.job_id, "script_index": index, "world_model": "hosted",
                         "upstream_job_id": upstream_id, "upstream_stream_id": upstream.get("stream_id")}
                result = await asyncio.to_thread(import_video, path, script, spec.video, store_dir=spec.data_dir,
                                                 stream_id=stream_id, owner=spec.owner, extra=extra)
                results.append(_recorded(index, result))
    finally:
        if upstream_id is not None and not finished:  # gave up waiting: stop it costing upstream
            await client.cancel_simulation(upstream_id)
            store.set_upstream_job(spec.job_id, None)
        store.close()
        await client.close()
    return _completed(spec, results)


def _recorded(index: int, result: RecordingResult) -> dict[str, Any]:
    """One script's recording in the attempt's outcome; raises if it failed (the attempt then fails)."""
    if result.status != STATUS_COMPLETE:
        raise RuntimeError(f"recording script {index} failed: {result.error}")
    return {"stream_id": result.stream_id, "frame_count": result.frame_count,
            "duration_seconds": result.duration_seconds}


def _completed(spec: JobSpec, recordings: list[dict[str, Any]]) -> dict[str, Any]:
    return {"status": "completed", "stream_ids": list(spec.stream_ids), "recordings": recordings}
