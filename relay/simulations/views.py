"""How a job is read from outside (the relay's /v1/simulations and the /odyssey twin's
/simulation-jobs alike): a listing's status filter, and a job's recordings."""

from __future__ import annotations

from typing import Any

from ..errors import invalid_request
from ..recordings import RecordingStore
from .store import ACTIVE, STATUSES, Job

_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def recordings_of(store: RecordingStore, job: Job) -> list[dict[str, Any]]:
    """The job's recordings once it has completed (an attempt's files are no result until then)."""
    if job.status != "completed":
        return []
    metas = (store.get(stream_id) for stream_id in job.stream_ids)
    return [m for m in metas if m is not None and m.get("owner") == job.owner]


def statuses_of(status: str | None, active: str | None) -> tuple[str, ...] | None:
    """The statuses a listing asks for (``?status=pending,processing`` and/or ``?active=true|false``,
    as given); None means every status."""
    chosen: set[str] | None = None
    if status is not None:
        chosen = {s.strip() for s in status.split(",") if s.strip()}
        unknown = chosen - set(STATUSES)
        if unknown or not chosen:
            raise invalid_request(f"'status' must be one or more of {', '.join(STATUSES)} (comma-separated).",
                                  field="status")
    if active is not None:
        if active.lower() not in _TRUE + _FALSE:
            raise invalid_request("'active' must be true or false.", field="active")
        wanted = set(ACTIVE) if active.lower() in _TRUE else set(STATUSES) - set(ACTIVE)
        chosen = wanted if chosen is None else chosen & wanted
    return None if chosen is None else tuple(s for s in STATUSES if s in chosen)
