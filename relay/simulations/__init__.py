"""Simulations: timed scripts run offline as durable jobs, each script producing one recording.

script (validation) -> store (the jobs in SQLite) -> service (quota, queue, supervisor) -> spec (one
attempt, typed) -> worker (the spawned processes) -> record (one record loop, rendered or imported).
None of them knows HTTP; the API and /odyssey translate to and from the service, and read jobs
through views (a listing's status filter, a job's recordings).
"""

from .script import parse_request, validate_script
from .service import Simulations
from .store import ACTIVE, CANCELLABLE, DB_FILE, STATUSES, Job, JobStore, QueueFull

__all__ = [
    "ACTIVE",
    "CANCELLABLE",
    "DB_FILE",
    "STATUSES",
    "Job",
    "JobStore",
    "QueueFull",
    "Simulations",
    "parse_request",
    "validate_script",
]
