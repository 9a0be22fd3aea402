"""Simulations: timed scripts run offline as durable jobs, each script producing one recording.

Three parts, none of which knows HTTP:

* ``parse_request`` validates a submission precisely (422 naming the entry's index and what is wrong).
* ``JobStore`` keeps the jobs in SQLite (data_dir/simulations.db, WAL, synchronous=FULL): every state
  change is one transaction, so a kill -9 loses no job. The quota is counted and the job inserted in one
  ``BEGIN IMMEDIATE`` transaction, so concurrent submissions (threads, or processes sharing the file)
  cannot overshoot it. Methods block: call them from a thread (``asyncio.to_thread``).
* ``Simulations`` is the asyncio service: it submits, lists and cancels for a key, and its supervisor
  task claims pending jobs for a pool of worker processes (``relay/simjob.py``), so rendering and
  encoding never run on the relay's event loop, and records how each attempt ended.

A job's life: pending -> dispatched (claimed, handed to the pool; its stream ids are chosen now, fresh
for each attempt) -> processing (the worker marks it, atomically, only if still dispatched: a cancel
wins a race with the start) -> completed | failed; pending/dispatched -> cancelled. An attempt that does
not finish (worker error or crash, relay restart) deletes what it recorded and puts the job back to
pending with ``retry_count`` + 1; after ``max_retries`` retries the job fails with ``error_message``.
Order and timing of jobs are not promised.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import errno
import json
import logging
import math
import multiprocessing
import os
import shutil
import sqlite3
import threading
import unicodedata
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .clock import SYSTEM_CLOCK, Clock, iso
from .errors import RelayError, insufficient_storage, not_found, unprocessable
from .inputs import text_problem
from .recordings import RecordingStore, owner_id, valid_stream_id

__all__ = [
    "ACTIVE",
    "CANCELLABLE",
    "STATUSES",
    "DB_FILE",
    "Job",
    "JobStore",
    "QueueFull",
    "Simulations",
    "parse_request",
    "validate_script",
]

log = logging.getLogger(__name__)

STATUSES = ("pending", "dispatched", "processing", "completed", "failed", "cancelled")
ACTIVE = ("pending", "dispatched", "processing")  # what counts toward [limits] pending_simulations
CANCELLABLE = ("pending", "dispatched")
DB_FILE = "simulations.db"

MAX_PROMPT_CHARS = 2000  # what the host's own interact accepts (relay/sessions.py)
MAX_ENTRIES = 1000  # per script
MAX_SCRIPTS = 10  # per batch job

# Until jobs have completed here, estimates assume this much work per second of video (about 3x real
# time at 1280x704 on one core, previews included) plus a fixed cost per job.
DEFAULT_SECONDS_PER_VIDEO_SECOND = 0.3
JOB_OVERHEAD_SECONDS = 1.0


# ------------------------------------------------------------------------------------ validation

def _bad(message: str, index: int | None, field_: str | None, reason: str,
         script_index: int | None, **more: Any) -> RelayError:
    details: dict[str, Any] = {}
    if script_index is not None:
        details["script_index"] = script_index
        message = f"scripts[{script_index}]: {message}"
    if index is not None:
        details["index"] = index
    if field_ is not None:
        details["field"] = field_
    details["reason"] = reason
    details.update(more)
    return unprocessable(message, **details)


def _prompt(value: Any, index: int, field_: str, script_index: int | None) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _bad(f"entry {index}: '{field_}' must be a non-empty string.", index, field_, "invalid_prompt",
                   script_index)
    if len(value) > MAX_PROMPT_CHARS:
        raise _bad(f"entry {index}: '{field_}' is longer than {MAX_PROMPT_CHARS} characters.", index, field_,
                   "prompt_too_long", script_index, limit=MAX_PROMPT_CHARS)
    problem = text_problem(value)  # the boundary's one text rule (relay.inputs), with the entry's index
    if problem is not None:
        raise _bad(f"entry {index}: '{field_}' contains {problem}.", index, field_, "invalid_text", script_index)
    return unicodedata.normalize("NFC", value).strip()


def _only(obj: Mapping[str, Any], allowed: Sequence[str], index: int, prefix: str,
          script_index: int | None) -> None:
    for key in obj:
        if key not in allowed:
            name = f"{prefix}{key}"
            raise _bad(f"entry {index}: unknown field '{name}'.", index, name, "unknown_field", script_index)


def validate_script(script: Any, max_seconds: float, script_index: int | None = None) -> list[dict[str, Any]]:
    """A script, checked entry by entry and normalized (prompts stripped); RelayError 422 otherwise.

    Entries are ``{timestamp_ms, start: {prompt, image?}}`` (the first, at 0 ms, and only once),
    ``{timestamp_ms, interact: {prompt}}`` and ``{timestamp_ms, end: {}}`` (the last, and only last).
    Timestamps are non-negative integers and strictly increasing (two entries at the same millisecond
    would be one frame: say what you mean with one). The script lasts until its end: more than 0 ms,
    at most ``max_seconds``.
    """
    where = "script" if script_index is None else "scripts"
    if not isinstance(script, list):
        raise _bad("the script must be an array of entries.", None, where, "not_an_array", script_index)
    if not script:
        raise _bad("the script is empty: it needs a start and an end.", None, where, "empty", script_index)
    if len(script) > MAX_ENTRIES:
        raise _bad(f"the script has more than {MAX_ENTRIES} entries.", None, where, "too_many_entries",
                   script_index, limit=MAX_ENTRIES)
    limit_ms = int(round(max_seconds * 1000))
    out: list[dict[str, Any]] = []
    previous: int | None = None
    for index, entry in enumerate(script):
        if not isinstance(entry, dict):
            raise _bad(f"entry {index} must be an object.", index, None, "not_an_object", script_index)
        _only(entry, ("timestamp_ms", "start", "interact", "end"), index, "", script_index)
        ts = entry.get("timestamp_ms")
        if "timestamp_ms" not in entry:
            raise _bad(f"entry {index}: 'timestamp_ms' is missing.", index, "timestamp_ms", "missing_timestamp",
                       script_index)
        if not isinstance(ts, int) or isinstance(ts, bool) or ts < 0:
            raise _bad(f"entry {index}: 'timestamp_ms' must be a non-negative integer (milliseconds).", index,
                       "timestamp_ms", "invalid_timestamp", script_index)
        actions = [k for k in ("start", "interact", "end") if k in entry]
        if len(actions) != 1:
            reason = "no_action" if not actions else "several_actions"
            raise _bad(f"entry {index} must have exactly one of 'start', 'interact' or 'end'.", index, None,
                       reason, script_index)
        action = actions[0]
        body = entry[action]
        if not isinstance(body, dict):
            raise _bad(f"entry {index}: '{action}' must be an object.", index, action, "not_an_object",
                       script_index)
        if index == 0 and action != "start":
            raise _bad("the script must begin with a 'start' entry.", index, action, "start_not_first",
                       script_index)
        if index > 0 and action == "start":
            raise _bad(f"entry {index}: a script has exactly one 'start', the first entry.", index, "start",
                       "duplicate_start", script_index)
        if action == "end" and index != len(script) - 1:
            raise _bad(f"entry {index}: 'end' must be the last entry.", index, "end", "end_not_last", script_index)
        if index == len(script) - 1 and action != "end":
            raise _bad(f"entry {index}: the script must finish with an 'end' entry.", index, action,
                       "missing_end", script_index)
        if index == 0 and ts != 0:
            raise _bad("the 'start' entry must be at timestamp_ms 0.", index, "timestamp_ms", "start_not_at_zero",
                       script_index)
        if action == "end" and ts == 0:
            raise _bad(f"entry {index}: 'end' must come after the start (timestamp_ms > 0).", index, "timestamp_ms",
                       "end_not_after_start", script_index)
        if previous is not None and ts <= previous:
            raise _bad(f"entry {index}: timestamp_ms {ts} is not after the previous entry's {previous}.", index,
                       "timestamp_ms", "not_ascending", script_index)
        if ts > limit_ms:
            raise _bad(f"entry {index}: the script may last at most {max_seconds:g} s ({limit_ms} ms).", index,
                       "timestamp_ms", "too_long", script_index, limit_ms=limit_ms)
        previous = ts
        if action == "start":
            _only(body, ("prompt", "image"), index, "start.", script_index)
            normalized: dict[str, Any] = {"prompt": _prompt(body.get("prompt"), index, "start.prompt", script_index)}
            if body.get("image") is not None:
                normalized["image"] = _image(body["image"], index, script_index)
        elif action == "interact":
            _only(body, ("prompt",), index, "interact.", script_index)
            normalized = {"prompt": _prompt(body.get("prompt"), index, "interact.prompt", script_index)}
        else:
            _only(body, (), index, "end.", script_index)
            normalized = {}
        out.append({"timestamp_ms": ts, action: normalized})
    return out


def _image(value: Any, index: int, script_index: int | None) -> str:
    ok = isinstance(value, str)
    if ok:
        try:
            base64.b64decode(value.split(",", 1)[-1], validate=True)  # a data: URL or bare base64
        except (binascii.Error, ValueError):
            ok = False
    if not ok:
        raise _bad(f"entry {index}: 'start.image' must be a base64 string (or a data: URL).", index, "start.image",
                   "invalid_image", script_index)
    return value


def parse_request(body: Mapping[str, Any], max_seconds: float) -> tuple[list[list[dict[str, Any]]], bool]:
    """``{script, portrait?}`` or ``{scripts: [...], portrait?}`` -> (scripts, portrait); 422 otherwise."""
    for key in body:
        if key not in ("script", "scripts", "portrait"):
            raise _bad(f"unknown field '{key}'.", None, key, "unknown_field", None)
    if ("script" in body) == ("scripts" in body):
        raise _bad("send exactly one of 'script' (one stream) or 'scripts' (a batch, one stream each).", None,
                   "script", "missing" if "script" not in body else "both", None)
    portrait = body.get("portrait", False)
    if not isinstance(portrait, bool):
        raise _bad("'portrait' must be true or false.", None, "portrait", "not_a_boolean", None)
    if "script" in body:
        return [validate_script(body["script"], max_seconds)], portrait
    scripts = body["scripts"]
    if not isinstance(scripts, list) or not scripts:
        raise _bad("'scripts' must be a non-empty array of scripts.", None, "scripts", "empty", None)
    if len(scripts) > MAX_SCRIPTS:
        raise _bad(f"a batch holds at most {MAX_SCRIPTS} scripts.", None, "scripts", "too_many_scripts", None,
                   limit=MAX_SCRIPTS)
    return [validate_script(s, max_seconds, i) for i, s in enumerate(scripts)], portrait


def script_seconds(script: Sequence[Mapping[str, Any]]) -> float:
    return script[-1]["timestamp_ms"] / 1000


# ----------------------------------------------------------------------------------------- store

@dataclass
class Job:
    job_id: str
    owner: str  # owner_id(api_key): a hash, never the key
    status: str
    scripts: list[list[dict[str, Any]]]
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

    def submit(self, owner: str, scripts: list[list[dict[str, Any]]], portrait: bool, limit: int) -> tuple[Job, float]:
        """Insert a pending job unless ``owner`` has ``limit`` active ones (QueueFull).

        Returns the job and the seconds of video queued or running before it (all owners).
        """
        now = self._clock.time()
        video_seconds = round(sum(script_seconds(s) for s in scripts), 3)
        job = Job(job_id=uuid.uuid4().hex, owner=owner, status="pending", scripts=scripts, portrait=portrait,
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


# --------------------------------------------------------------------------------------- service

def _spawn_pool(workers: int) -> concurrent.futures.Executor:
    from .simjob import init_worker

    # spawn, not fork: a fork of the relay would copy its event loop, sockets and threads.
    return concurrent.futures.ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context("spawn"), initializer=init_worker)


class Simulations:
    """The simulations of one relay: quota, durable queue, and the supervisor that runs jobs in workers."""

    def __init__(
        self,
        settings: Any,
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
        from .simjob import HOSTED_SCRATCH_DIR

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
        try:
            with _disk_full_as_507("the job could not be queued"):
                job, ahead = await asyncio.to_thread(store.submit, owner_id(api_key), scripts, portrait, limit)
        except QueueFull as full:
            raise RelayError(
                "SIMULATION_QUEUE_FULL", 429,
                f"This API key already has {full.pending} simulations pending or running (limit {full.limit}).",
                action="Wait for one to finish (or cancel one), then retry.",
                details={"pending": full.pending, "limit": full.limit},
                retry_after=self._estimate(full.ahead_seconds, 0.0),
            ) from None
        self._wake.set()
        return {"job_id": job.job_id, "status": job.status, "created_at": iso(job.created_at),
                "estimated_wait_seconds": math.ceil(self._estimate(ahead, job.video_seconds))}

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
        from .simjob import run_job  # the worker's function: pickled by reference, imported by the worker

        assert self.store is not None
        jobs = await asyncio.to_thread(self.store.claim, free)
        for job in jobs:
            try:
                if self._pool is None:
                    self._pool = self._executor_factory(self._sim.workers)
                future = asyncio.wrap_future(self._pool.submit(run_job, self._spec(job)))
            except Exception as exc:  # a pool broken since the last round: a new one next round
                self._discard_pool()
                await asyncio.to_thread(self.store.attempt_failed, job.job_id, f"could not start a worker: {exc}",
                                        self._sim.max_retries)
                continue
            future.add_done_callback(lambda _: self._wake.set())
            self._inflight[job.job_id] = (job, future)

    def _spec(self, job: Job) -> dict[str, Any]:
        wm, media, rec = self._settings.world_model, self._settings.media, self._settings.recordings
        long_side, short_side = max(wm.width, wm.height), min(wm.width, wm.height)
        width, height = (short_side, long_side) if job.portrait else (long_side, short_side)  # as live streams
        hosted = None
        if wm.kind == "hosted":  # the hosted model renders it: the worker submits and imports the result
            from .config import hosted_api_key

            hosted = {"url": wm.url, "api_key": hosted_api_key(self._settings), "api_key_env": wm.api_key_env}
        return {
            "job_id": job.job_id, "db_path": str(self.db_path), "data_dir": str(self._settings.server.data_dir),
            "owner": job.owner, "scripts": job.scripts, "stream_ids": job.stream_ids, "portrait": job.portrait,
            "hosted": hosted,
            "width": width, "height": height, "fps": wm.fps, "bitrate_kbps": media.bitrate_kbps,
            "keyframe_interval_seconds": media.keyframe_interval_seconds,
            "encoder_preset": self._settings.simulations.encoder_preset,
            "preview_seconds": rec.preview_seconds, "preview_width": rec.preview_width,
            "writer_queue_packets": rec.writer_queue_packets,
        }

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
