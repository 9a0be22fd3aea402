"""The job store: the jobs in SQLite (data_dir/simulations.db, WAL, synchronous=FULL).

Every state change is one transaction, so a kill -9 loses no job. The quota is counted and the job
inserted in one ``BEGIN IMMEDIATE`` transaction, so concurrent submissions (threads, or processes
sharing the file) cannot overshoot it. Methods block: call them from a thread (``asyncio.to_thread``).
Finished jobs keep only their scripts' number, and retention (``sweep``) deletes them after keep_days
and beyond ``max_finished`` an owner, giving the pages back to the disk.

A job's life: pending -> dispatched (claimed, handed to the pool; its stream ids are chosen now, fresh
for each attempt) -> processing (the worker marks it, atomically, only if still dispatched: a cancel
wins a race with the start) -> completed | failed; pending/dispatched -> cancelled. An attempt that does
not finish (worker error or crash, relay restart) puts the job back to pending with ``retry_count`` + 1;
after ``max_retries`` retries the job fails with ``error_message``. Order and timing of jobs are not promised.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sqlite3
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..clock import SYSTEM_CLOCK, Clock, iso
from ..errors import RelayError, not_found
from .script import Script, script_seconds

__all__ = ["ACTIVE", "CANCELLABLE", "DB_FILE", "STATUSES", "Job", "JobStore", "QueueFull", "disk_full"]

log = logging.getLogger(__name__)

STATUSES = ("pending", "dispatched", "processing", "completed", "failed", "cancelled")
ACTIVE = ("pending", "dispatched", "processing")  # what counts toward [limits] pending_simulations
CANCELLABLE = ("pending", "dispatched")
DB_FILE = "simulations.db"


@dataclass
class Job:
    job_id: str
    owner: str  # owner_id(api_key): a hash, never the key
    status: str
    scripts: list[Script]
    portrait: bool
    video_seconds: float
    created_at: float
    dispatched_at: float | None = None
    started_at: float | None = None
    completed_at: float | None = None
    error_message: str | None = None
    retry_count: int = 0
    stream_ids: list[str] = field(default_factory=list)
    seq: int = 0

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    def public(self) -> dict[str, Any]:
        """The job as docs/api.md shows it, without ``streams`` (the API layer adds the recording objects)."""
        return {
            "job_id": self.job_id,
            "status": self.status,
            "created_at": iso(self.created_at),
            "started_at": iso(self.started_at),
            "completed_at": iso(self.completed_at),
            "error_message": self.error_message,
            "retry_count": self.retry_count,
            "portrait": self.portrait,
            "script_count": len(self.scripts),
            "video_seconds": self.video_seconds,
        }


class QueueFull(Exception):
    """The key already has ``limit`` active jobs; ``ahead_seconds`` of video run before its oldest frees a slot."""

    def __init__(self, pending: int, limit: int, ahead_seconds: float) -> None:
        super().__init__(f"{pending} simulations pending (limit {limit})")
        self.pending, self.limit, self.ahead_seconds = pending, limit, ahead_seconds


def not_cancellable(job: Job) -> RelayError:
    return RelayError("NOT_CANCELLABLE", 409,
                      f"The job is {job.status}; only pending or dispatched jobs can be cancelled.",
                      action="Nothing to cancel: a job that has started runs to its end.",
                      details={"job_id": job.job_id, "status": job.status})


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL,
    status TEXT NOT NULL,
    scripts TEXT NOT NULL,
    portrait INTEGER NOT NULL DEFAULT 0,
    video_seconds REAL NOT NULL,
    created_at REAL NOT NULL,
    dispatched_at REAL,
    started_at REAL,
    completed_at REAL,
    error_message TEXT,
    retry_count INTEGER NOT NULL DEFAULT 0,
    stream_ids TEXT NOT NULL DEFAULT '[]'
);
-- With a hosted source: the hosted job an attempt submitted, so the next attempt (after a
-- restart or a worker's death) waits for that one instead of paying for a second.
CREATE TABLE IF NOT EXISTS upstream_jobs (
    job_id TEXT PRIMARY KEY,
    upstream_job_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_owner ON jobs (owner, status);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, seq);
CREATE INDEX IF NOT EXISTS jobs_by_completion ON jobs (status, completed_at);
"""

_COLUMNS = ("seq, job_id, owner, status, scripts, portrait, video_seconds, created_at, dispatched_at, started_at, "
            "completed_at, error_message, retry_count, stream_ids")
_ACTIVE_SQL = "('pending', 'dispatched', 'processing')"
_FINISHED_SQL = "('completed', 'failed', 'cancelled')"
_INCREMENTAL = 2  # PRAGMA auto_vacuum's value for INCREMENTAL
_WAL_LIMIT_BYTES = 1 << 20


def _job(row: tuple[Any, ...]) -> Job:
    (seq, job_id, owner, status, scripts, portrait, video_seconds, created_at, dispatched_at, started_at,
     completed_at, error_message, retry_count, stream_ids) = row
    return Job(job_id=job_id, owner=owner, status=status, scripts=json.loads(scripts), portrait=bool(portrait),
               video_seconds=video_seconds, created_at=created_at, dispatched_at=dispatched_at,
               started_at=started_at, completed_at=completed_at, error_message=error_message,
               retry_count=retry_count, stream_ids=json.loads(stream_ids), seq=seq)


class JobStore:
    """The jobs, in one SQLite file. Thread-safe (one connection behind a lock); every call blocks."""

    def __init__(self, path: str | os.PathLike[str], *, clock: Clock = SYSTEM_CLOCK, timeout: float = 30.0,
                 max_finished: int | None = None) -> None:
        """``max_finished``: finished jobs kept per owner (None: no bound; the relay's store has one,
        a worker's handle only marks its job processing)."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self._max_finished = max_finished
        self._lock = threading.Lock()
        # Autocommit: every write below opens its own BEGIN IMMEDIATE (the write lock up front, so two
        # writers never both read a count and then both insert).
        self._db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None, check_same_thread=False)
        try:
            if self._db.execute("PRAGMA auto_vacuum").fetchone()[0] != _INCREMENTAL:
                # Pages freed by swept jobs can then be given back to the disk (sweep). A new file takes
                # the setting as is; one made before it needs one full VACUUM, once.
                try:
                    self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")
                    if self._db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0]:
                        self._db.execute("VACUUM")
                except sqlite3.OperationalError as exc:  # no room for VACUUM's copy: next start
                    log.warning("simulations: the job store stays without incremental vacuum for now: %s", exc)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # a committed job survives power loss, not only kill -9
            # The WAL is checkpointed at about a megabyte and cut back to it, instead of keeping its
            # largest size (a job's script can be most of a megabyte, written twice per job).
            self._db.execute(f"PRAGMA wal_autocheckpoint={_WAL_LIMIT_BYTES // 4096}")
            self._db.execute(f"PRAGMA journal_size_limit={_WAL_LIMIT_BYTES}")
            self._db.executescript(_SCHEMA)
        except BaseException:
            self._db.close()
            raise
        self._closed = False

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # -- submitting and reading ---------------------------------------------------------------

    def submit(self, owner: str, scripts: list[Script], portrait: bool, limit: int,
               job_id: str | None = None) -> tuple[Job, float]:
        """Insert a pending job unless ``owner`` has ``limit`` active ones (QueueFull). ``job_id``: one
        chosen beforehand (a cluster's quota slot is taken under it), else a fresh one.

        Returns the job and the seconds of video queued or running before it (all owners).
        """
        now = self._clock.time()
        video_seconds = round(sum(script_seconds(s) for s in scripts), 3)
        job = Job(job_id=job_id or uuid.uuid4().hex, owner=owner, status="pending", scripts=scripts, portrait=portrait,
                  video_seconds=video_seconds, created_at=now)
        with self._write() as db:
            (pending,) = db.execute(f"SELECT COUNT(*) FROM jobs WHERE owner = ? AND status IN {_ACTIVE_SQL}",
                                    (owner,)).fetchone()
            if pending >= limit:
                (ahead,) = db.execute(
                    f"SELECT COALESCE(SUM(video_seconds), 0) FROM jobs WHERE status IN {_ACTIVE_SQL} AND seq <= "
                    f"(SELECT MIN(seq) FROM jobs WHERE owner = ? AND status IN {_ACTIVE_SQL})", (owner,)).fetchone()
                raise QueueFull(pending, limit, ahead)
            (ahead,) = db.execute(f"SELECT COALESCE(SUM(video_seconds), 0) FROM jobs WHERE status IN {_ACTIVE_SQL}"
                                  ).fetchone()
            cur = db.execute(
                "INSERT INTO jobs (job_id, owner, status, scripts, portrait, video_seconds, created_at) "
                "VALUES (?, ?, 'pending', ?, ?, ?, ?)",
                (job.job_id, owner, json.dumps(scripts, separators=(",", ":")), int(portrait), video_seconds, now))
            job.seq = cur.lastrowid or 0
        return job, ahead

    def get(self, job_id: str) -> Job | None:
        rows = self._read(f"SELECT {_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    def list(self, owner: str, statuses: Sequence[str] | None = None, limit: int = 20,
             offset: int = 0) -> tuple[list[Job], int]:
        """(one page of ``owner``'s jobs, newest first; total), optionally only those in ``statuses``."""
        where, args = "owner = ?", [owner]
        if statuses is not None:
            if not statuses:
                return [], 0
            where += f" AND status IN ({', '.join('?' for _ in statuses)})"
            args += list(statuses)
        with self._lock:
            (total,) = self._db.execute(f"SELECT COUNT(*) FROM jobs WHERE {where}", args).fetchone()
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE {where} ORDER BY seq DESC LIMIT ? OFFSET ?",
                                    [*args, max(0, limit), max(0, offset)]).fetchall()
        return [_job(r) for r in rows], total

    def active_ids(self) -> list[str]:
        """Every job still pending or running (what holds a slot of [limits] pending_simulations)."""
        return [row[0] for row in self._read(f"SELECT job_id FROM jobs WHERE status IN {_ACTIVE_SQL}")]

    def all_ids(self) -> list[str]:
        """Every job's id (a cluster registers them in its directory)."""
        return [row[0] for row in self._read("SELECT job_id FROM jobs")]

    def active_count(self, owner: str | None = None) -> int:
        if owner is None:
            rows = self._read(f"SELECT COUNT(*) FROM jobs WHERE status IN {_ACTIVE_SQL}")
        else:
            rows = self._read(f"SELECT COUNT(*) FROM jobs WHERE owner = ? AND status IN {_ACTIVE_SQL}", (owner,))
        return rows[0][0]

    def cancel(self, owner: str, job_id: str) -> Job:
        """pending/dispatched -> cancelled; 404 for an unknown id or another owner's job, 409 otherwise."""
        with self._write() as db:
            row = db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            if row is None or row[2] != owner:
                raise not_found("job", job_id)
            job = _job(row)
            if job.status not in CANCELLABLE:
                raise not_cancellable(job)
            job.status, job.completed_at = "cancelled", self._clock.time()
            db.execute("UPDATE jobs SET status = 'cancelled', completed_at = ? WHERE seq = ?",
                       (job.completed_at, job.seq))
            self._finished(db, job.job_id)
        return job

    def rate(self, recent: int = 20) -> float | None:
        """Seconds of work per second of video over the last ``recent`` completed jobs (None: none yet)."""
        rows = self._read(
            "SELECT SUM(completed_at - started_at), SUM(video_seconds) FROM (SELECT completed_at, started_at, "
            "video_seconds FROM jobs WHERE status = 'completed' AND started_at IS NOT NULL AND video_seconds > 0 "
            "ORDER BY seq DESC LIMIT ?)", (recent,))
        work, video = rows[0]
        return work / video if work and video else None

    # -- the runner's side --------------------------------------------------------------------

    def claim(self, n: int) -> list[Job]:
        """Up to ``n`` pending jobs, oldest first, now dispatched, each with fresh stream ids for this attempt."""
        if n <= 0:
            return []
        now = self._clock.time()
        with self._write() as db:
            rows = db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE status = 'pending' ORDER BY seq LIMIT ?",
                              (n,)).fetchall()
            jobs = [_job(r) for r in rows]
            for job in jobs:
                job.status, job.dispatched_at, job.started_at = "dispatched", now, None
                job.stream_ids = [uuid.uuid4().hex for _ in job.scripts]
                db.execute("UPDATE jobs SET status = 'dispatched', dispatched_at = ?, started_at = NULL, "
                           "stream_ids = ? WHERE seq = ?", (now, json.dumps(job.stream_ids), job.seq))
        return jobs

    def mark_processing(self, job_id: str) -> bool:
        """dispatched -> processing (the worker, as it starts); False if it was cancelled meanwhile."""
        now = self._clock.time()
        with self._write() as db:
            cur = db.execute("UPDATE jobs SET status = 'processing', started_at = ? "
                             "WHERE job_id = ? AND status = 'dispatched'", (now, job_id))
            return cur.rowcount == 1

    def upstream_job(self, job_id: str) -> str | None:
        rows = self._read("SELECT upstream_job_id FROM upstream_jobs WHERE job_id = ?", (job_id,))
        return rows[0][0] if rows else None

    def set_upstream_job(self, job_id: str, upstream_job_id: str | None) -> None:
        """Remember (or, with None, forget) the hosted job behind this one."""
        with self._write() as db:
            if upstream_job_id is None:
                db.execute("DELETE FROM upstream_jobs WHERE job_id = ?", (job_id,))
            else:
                db.execute("INSERT OR REPLACE INTO upstream_jobs (job_id, upstream_job_id) VALUES (?, ?)",
                           (job_id, upstream_job_id))

    def complete(self, job_id: str) -> bool:
        now = self._clock.time()
        with self._write() as db:
            cur = db.execute("UPDATE jobs SET status = 'completed', completed_at = ?, error_message = NULL "
                             "WHERE job_id = ? AND status = 'processing'", (now, job_id))
            if cur.rowcount != 1:
                return False
            self._finished(db, job_id)
            return True

    def attempt_failed(self, job_id: str, error: str, max_retries: int, *, count: bool = True) -> str | None:
        """An attempt did not finish: back to pending (retry_count + 1), or failed after ``max_retries``.

        ``count=False`` (the relay shut down cleanly) puts it back without counting a retry.
        Returns the new status, or None if the job was no longer dispatched or processing.
        """
        now = self._clock.time()
        with self._write() as db:
            row = db.execute("SELECT status, retry_count FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            if row is None or row[0] not in ("dispatched", "processing"):
                return None
            return self._settle(db, job_id, row[1], error, max_retries, count, now)

    def _settle(self, db: sqlite3.Connection, job_id: str, retries: int, error: str, max_retries: int,
                count: bool, now: float) -> str:
        if count and retries >= max_retries:
            db.execute("UPDATE jobs SET status = 'failed', completed_at = ?, stream_ids = '[]', error_message = ? "
                       "WHERE job_id = ?", (now, f"{error} (gave up after {retries + 1} attempts)", job_id))
            self._finished(db, job_id)
            return "failed"
        db.execute("UPDATE jobs SET status = 'pending', retry_count = ?, dispatched_at = NULL, started_at = NULL, "
                   "stream_ids = '[]', error_message = ? WHERE job_id = ?",
                   (retries + (1 if count else 0), error, job_id))
        return "pending"

    # -- retention ----------------------------------------------------------------------------

    def _finished(self, db: sqlite3.Connection, job_id: str) -> None:
        """A job has just finished (in the caller's transaction): its scripts will never run again, so
        only their number is kept (a script may be most of a megabyte), and its owner's oldest
        finished jobs beyond ``max_finished`` go."""
        row = db.execute("SELECT owner, scripts FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            return
        owner, scripts = row
        db.execute("UPDATE jobs SET scripts = ? WHERE job_id = ?",
                   (json.dumps([[] for _ in json.loads(scripts)]), job_id))
        db.execute("DELETE FROM upstream_jobs WHERE job_id = ?", (job_id,))
        if self._max_finished is not None:
            db.execute(f"DELETE FROM jobs WHERE seq IN (SELECT seq FROM jobs WHERE owner = ? AND status IN "
                       f"{_FINISHED_SQL} ORDER BY completed_at DESC, seq DESC LIMIT -1 OFFSET ?)",
                       (owner, self._max_finished))

    def sweep(self, keep_seconds: float) -> int:
        """Delete finished jobs that finished more than ``keep_seconds`` ago (0: keep them) and every
        owner's finished jobs beyond ``max_finished``, then give the freed pages back to the disk.
        Active jobs are never touched. Returns how many jobs went."""
        now = self._clock.time()
        with self._write() as db:
            deleted = 0
            if keep_seconds > 0:
                deleted += db.execute(f"DELETE FROM jobs WHERE status IN {_FINISHED_SQL} AND completed_at < ?",
                                      (now - keep_seconds,)).rowcount
            if self._max_finished is not None:
                deleted += db.execute(
                    f"DELETE FROM jobs WHERE seq IN (SELECT seq FROM (SELECT seq, ROW_NUMBER() OVER ("
                    f"PARTITION BY owner ORDER BY completed_at DESC, seq DESC) AS n FROM jobs WHERE status IN "
                    f"{_FINISHED_SQL}) WHERE n > ?)", (self._max_finished,)).rowcount
            db.execute("DELETE FROM upstream_jobs WHERE job_id NOT IN (SELECT job_id FROM jobs)")
        with self._lock:
            # Outside any transaction: the free pages go back to the file system, then the WAL is
            # checkpointed and cut back, so the files on disk shrink, not only the rows.
            self._db.executescript("PRAGMA incremental_vacuum;")  # executescript: run to the end, not one step
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        return deleted

    def interrupted(self) -> list[Job]:
        """Jobs a previous run left dispatched or processing (call at start, before any worker runs)."""
        rows = self._read(f"SELECT {_COLUMNS} FROM jobs WHERE status IN ('dispatched', 'processing') ORDER BY seq")
        return [_job(r) for r in rows]

    def recover(self, max_retries: int) -> dict[str, str]:
        """Every interrupted job back to pending with retry_count + 1, or failed after ``max_retries``.

        Returns job_id -> new status.
        """
        now = self._clock.time()
        out = {}
        with self._write() as db:
            rows = db.execute("SELECT job_id, status, retry_count FROM jobs "
                              "WHERE status IN ('dispatched', 'processing') ORDER BY seq").fetchall()
            for job_id, status, retries in rows:
                error = f"the relay stopped while the job was {status}"
                out[job_id] = self._settle(db, job_id, retries, error, max_retries, True, now)
        return out


# SQLITE_IOERR_SHMSIZE: the WAL index (simulations.db-shm) could not grow, which on a full disk is
# what opening the store meets first.
_SQLITE_NO_ROOM = ("SQLITE_FULL", "SQLITE_IOERR_SHMSIZE")


def disk_full(exc: BaseException) -> bool:
    """A write refused for want of space: ENOSPC/EDQUOT, or SQLite's SQLITE_FULL."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorname", None) in _SQLITE_NO_ROOM or "disk is full" in str(exc)
    return False


