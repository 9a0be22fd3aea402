"""The simulations service: submits, lists and cancels for an API key, and its supervisor task claims
pending jobs for a pool of worker processes (``worker.run_job``), so rendering and encoding never run
on the relay's event loop, and records how each attempt ended.

An attempt that does not finish (worker error or crash, relay restart) deletes what it recorded before
the store puts the job back to pending (or fails it). Knows no HTTP: the API translates its errors.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import multiprocessing
import shutil
import sqlite3
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..clock import SYSTEM_CLOCK, Clock, iso
from ..config import Settings
from ..errors import RelayError, insufficient_storage, not_found
from ..recordings import RecordingStore, owner_id, valid_stream_id
from .script import parse_request
from .spec import job_spec
from .store import DB_FILE, Job, JobStore, QueueFull, disk_full
from .worker import HOSTED_SCRATCH_DIR, init_worker, run_job

__all__ = ["Simulations"]

log = logging.getLogger(__name__)

# Until jobs have completed here, estimates assume this much work per second of video (about 3x real
# time at 1280x704 on one core, previews included) plus a fixed cost per job.
DEFAULT_SECONDS_PER_VIDEO_SECOND = 0.3
JOB_OVERHEAD_SECONDS = 1.0


def _spawn_pool(workers: int) -> concurrent.futures.Executor:
    # spawn, not fork: a fork of the relay would copy its event loop, sockets and threads.
    return concurrent.futures.ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context("spawn"), initializer=init_worker)


class Simulations:
    """The simulations of one relay: quota, durable queue, and the supervisor that runs jobs in workers."""

    def __init__(
        self,
        settings: Settings,
        recordings: RecordingStore,
        *,
        clock: Clock = SYSTEM_CLOCK,
        executor_factory: Callable[[int], concurrent.futures.Executor] = _spawn_pool,
    ) -> None:
        self._settings = settings
        self._sim = settings.simulations
        self._recordings = recordings
        self._clock = clock
        self._executor_factory = executor_factory
        self.db_path = Path(settings.server.data_dir) / DB_FILE
        self.store: JobStore | None = None
        self._pool: concurrent.futures.Executor | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._inflight: dict[str, tuple[Job, asyncio.Future[Any]]] = {}
        self._wake = asyncio.Event()
        self._rate = DEFAULT_SECONDS_PER_VIDEO_SECOND
        self._next_sweep = 0.0
        self._unavailable: BaseException | None = None  # why the store could not be opened (a full disk)
        self._closed = False
        # A cluster's seam (relay/cluster/node.py), None on a single node: pending_simulations held across
        # nodes, a slot taken in Redis (take/give_back, `submitting`) before the job enters this store.
        self.cluster_quota: Any = None
        # And the directory's: async job_submitted(job_id), so the job's calls at any node reach this one.
        self.cluster_directory: Any = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Open the store and put back what a previous run left in flight (no worker yet)."""
        if self.store is not None:
            return
        try:
            store = await asyncio.to_thread(JobStore, self.db_path, clock=self._clock,
                                            max_finished=self._sim.max_finished_jobs)
        except (OSError, sqlite3.Error) as exc:
            if not disk_full(exc):
                raise
            # The relay still starts (streams need no room to go on); simulations answer 507 and the
            # supervisor opens the store once the disk has room.
            self._unavailable = exc
            log.warning("simulations: the job store cannot be opened (%s); retrying", exc)
            return
        try:
            await asyncio.to_thread(self._recover, store)
            self._rate = await asyncio.to_thread(store.rate) or self._rate
        except BaseException as exc:
            await asyncio.to_thread(store.close)
            if isinstance(exc, (OSError, sqlite3.Error)) and disk_full(exc):
                self._unavailable = exc
                log.warning("simulations: recovery needs room on the disk (%s); retrying", exc)
                return
            raise
        self.store, self._unavailable = store, None
        try:
            await self._sweep()
        except Exception:  # a full disk or a locked file: the supervisor sweeps again later
            log.exception("simulations: retention sweep failed")

    def _recover(self, store: JobStore) -> None:
        # No worker runs yet: what a killed one was downloading is garbage.
        shutil.rmtree(Path(self._settings.server.data_dir) / HOSTED_SCRATCH_DIR, ignore_errors=True)
        stale = store.interrupted()
        for job in stale:  # first delete what the cut attempt recorded, so a crash here only repeats this
            self._delete_recordings(job.stream_ids)
        if stale:
            outcome = store.recover(self._sim.max_retries)
            log.info("simulations: %d interrupted jobs back to pending, %d failed",
                     sum(s == "pending" for s in outcome.values()), sum(s == "failed" for s in outcome.values()))

    async def start(self) -> None:
        """Open, then start the supervisor; workers are started by the pool as jobs arrive."""
        await self.open()
        if self._supervisor is None:
            self._supervisor = asyncio.create_task(self._supervise(), name="relay-simulations")

    async def close(self) -> None:
        """Stop the supervisor and the workers without waiting for their jobs; those go back to pending."""
        if self._closed:
            return
        self._closed = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
        pool, self._pool = self._pool, None
        inflight, self._inflight = dict(self._inflight), {}
        for _, future in inflight.values():
            future.cancel()  # nobody will read their outcome: the workers are about to be stopped
        if pool is not None:
            await asyncio.to_thread(_stop_pool, pool)
        if self.store is not None:
            store = self.store

            def requeue() -> None:
                try:
                    for job, _ in inflight.values():
                        self._delete_recordings(job.stream_ids)
                        store.attempt_failed(job.job_id, "the relay stopped during the job", self._sim.max_retries,
                                             count=False)
                finally:  # what could not be put back now, the next start's recovery does
                    store.close()

            await asyncio.to_thread(requeue)

    # -- the API's calls ----------------------------------------------------------------------

    def _require(self) -> JobStore:
        if self.store is None and self._unavailable is not None:
            raise insufficient_storage("the job store cannot be opened")
        if self.store is None:
            raise RelayError("SERVICE_UNAVAILABLE", 503, "Simulations are not available yet.", action="Retry shortly.",
                             retry_after=1)
        return self.store

    async def submit(self, api_key: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """Validate and queue; {job_id, status, created_at, estimated_wait_seconds} (202 in the API)."""
        scripts, portrait = parse_request(body, self._sim.max_seconds)
        store = self._require()
        limit = self._settings.limits.pending_simulations
        job_id = uuid.uuid4().hex
        try:
            with _disk_full_as_507("the job could not be queued"):
                async with self._cluster_slot(owner_id(api_key), job_id, limit):
                    job, ahead = await asyncio.to_thread(store.submit, owner_id(api_key), scripts, portrait, limit,
                                                         job_id)
        except QueueFull as full:
            raise RelayError(
                "SIMULATION_QUEUE_FULL", 429,
                f"This API key already has {full.pending} simulations pending or running (limit {full.limit}).",
                action="Wait for one to finish (or cancel one), then retry.",
                details={"pending": full.pending, "limit": full.limit},
                retry_after=self._estimate(full.ahead_seconds, 0.0),
            ) from None
        if self.cluster_directory is not None:
            await self.cluster_directory.job_submitted(job.job_id)
        self._wake.set()
        return {"job_id": job.job_id, "status": job.status, "created_at": iso(job.created_at),
                "estimated_wait_seconds": math.ceil(self._estimate(ahead, job.video_seconds))}

    @contextlib.asynccontextmanager
    async def _cluster_slot(self, owner: str, job_id: str, limit: int):
        """Across a cluster: the key's slot taken atomically in Redis first (QueueFull when the cluster holds
        `limit`), given back if the job does not enter the store. A single node: nothing."""
        quota = self.cluster_quota
        if quota is None:
            yield
            return
        quota.submitting.add(job_id)  # held while it is neither in Redis's count alone nor in the store
        try:
            admitted, held = await quota.take(owner, job_id, limit)
            if not admitted:
                raise QueueFull(held, limit, 0.0)
            try:
                yield
            except BaseException:
                await quota.give_back(job_id)
                raise
        finally:
            quota.submitting.discard(job_id)

    def _estimate(self, ahead_video_seconds: float, own_video_seconds: float) -> float:
        """Seconds until a job with ``own`` seconds of video behind ``ahead`` seconds of it completes."""
        workers = max(1, self._sim.workers)
        return JOB_OVERHEAD_SECONDS + self._rate * (ahead_video_seconds / workers + own_video_seconds)

    async def get(self, api_key: str, job_id: str) -> Job:
        job = await asyncio.to_thread(self._require().get, job_id)
        if job is None or job.owner != owner_id(api_key):
            raise not_found("job", job_id)
        return job

    async def list(self, api_key: str, statuses: Sequence[str] | None = None, limit: int = 20,
                   offset: int = 0) -> tuple[list[Job], int]:
        return await asyncio.to_thread(self._require().list, owner_id(api_key), statuses, limit, offset)

    async def cancel(self, api_key: str, job_id: str) -> Job:
        with _disk_full_as_507("the job could not be cancelled"):
            job = await asyncio.to_thread(self._require().cancel, owner_id(api_key), job_id)
        log.info("simulation %s cancelled", job_id)
        return job

    # -- the supervisor -----------------------------------------------------------------------

    async def _sweep(self) -> None:
        """Retention: finished jobs past keep_days (and beyond max_finished_jobs a key) are deleted."""
        assert self.store is not None
        self._next_sweep = self._clock.monotonic() + self._sim.sweep_interval_seconds
        deleted = await asyncio.to_thread(self.store.sweep, self._sim.keep_days * 86400)
        if deleted:
            log.info("simulations: retention removed %d finished jobs", deleted)

    async def _supervise(self) -> None:
        while True:
            try:
                if self.store is None:
                    await self.open()  # it could not be, for want of room: maybe there is some now
                if self.store is not None:
                    await self._settle_finished()
                    await self._dispatch()
                    if self._clock.monotonic() >= self._next_sweep:
                        await self._sweep()
            except asyncio.CancelledError:
                raise
            except Exception:  # a full disk, a locked database: retry on the next round
                log.exception("simulations supervisor round failed")
            try:
                # asyncio.timeout, not wait_for: no helper task is created twice a second.
                async with asyncio.timeout(self._sim.poll_interval_seconds):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()

    async def _dispatch(self) -> None:
        free = self._sim.workers - len(self._inflight)
        if free <= 0:
            return
        assert self.store is not None
        jobs = await asyncio.to_thread(self.store.claim, free)
        for job in jobs:
            try:
                if self._pool is None:
                    self._pool = self._executor_factory(self._sim.workers)
                future = asyncio.wrap_future(self._pool.submit(run_job, job_spec(job, self._settings, self.db_path)))
            except Exception as exc:  # a pool broken since the last round: a new one next round
                self._discard_pool()
                await asyncio.to_thread(self.store.attempt_failed, job.job_id, f"could not start a worker: {exc}",
                                        self._sim.max_retries)
                continue
            future.add_done_callback(lambda _: self._wake.set())
            self._inflight[job.job_id] = (job, future)

    async def _settle_finished(self) -> None:
        for job_id, (job, future) in list(self._inflight.items()):
            if not future.done():
                continue
            error = future.exception() if not future.cancelled() else concurrent.futures.CancelledError()
            if isinstance(error, BrokenProcessPool):
                self._discard_pool()  # every job in it failed with it; a new pool for the next ones
            outcome = None if error is not None else future.result()
            await asyncio.to_thread(self._settle, job, outcome, error)
            del self._inflight[job_id]  # only once settled: a database error retries it next round

    def _settle(self, job: Job, outcome: Mapping[str, Any] | None, error: BaseException | None) -> None:
        store = self.store
        assert store is not None
        if error is None and outcome is not None:
            if outcome.get("status") == "completed" and store.complete(job.job_id):
                log.info("simulation %s completed", job.job_id)
                self._rate = store.rate() or self._rate
                return
            # Cancelled before it started (nothing was written), or no longer processing: no result.
            self._delete_recordings(job.stream_ids)
            return
        if isinstance(error, BrokenProcessPool):
            message = "the worker process stopped unexpectedly"
        else:
            message = f"the simulation failed: {type(error).__name__}: {error}"
        self._delete_recordings(job.stream_ids)
        status = store.attempt_failed(job.job_id, message, self._sim.max_retries)
        log.warning("simulation %s: attempt failed (%s), now %s", job.job_id, message, status)

    def _discard_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def _delete_recordings(self, stream_ids: Sequence[str]) -> None:
        for stream_id in stream_ids:
            if valid_stream_id(stream_id):
                shutil.rmtree(self._recordings.directory(stream_id), ignore_errors=True)


@contextmanager
def _disk_full_as_507(what: str) -> Iterator[None]:
    try:
        yield
    except (OSError, sqlite3.Error) as exc:
        if disk_full(exc):
            log.warning("simulations: %s: %s", what, exc)
            raise insufficient_storage(what) from None
        raise


def _stop_pool(pool: concurrent.futures.Executor) -> None:
    """Shut the pool down now: its workers are killed mid-job rather than waited for."""
    processes = list((getattr(pool, "_processes", None) or {}).values())  # ProcessPoolExecutor's own (3.11-3.13)
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(5)
        if process.is_alive():
            process.kill()
            process.join(1)
