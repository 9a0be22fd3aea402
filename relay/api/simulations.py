"""Simulations API (API key): submit a script (or a batch), read, list and cancel the key's jobs."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from ..auth import require_api_key
from ..errors import invalid_request
from ..recordings import RecordingStore
from ..simulations import ACTIVE, STATUSES, Job
from .common import API_KEYS, RECORDINGS, SIMULATIONS, json_response, query_int, read_json, token_of
from .recordings import recording_body

routes = web.RouteTableDef()

_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def job_body(request: web.Request, job: Job, metas: list[dict[str, Any]]) -> dict[str, Any]:
    store = request.app[RECORDINGS]
    return {**job.public(), "streams": [recording_body(request, store, m) for m in metas]}


def recordings_of(store: RecordingStore, job: Job) -> list[dict[str, Any]]:
    """The job's recordings once it has completed (an attempt's files are no result until then)."""
    if job.status != "completed":
        return []
    metas = (store.get(stream_id) for stream_id in job.stream_ids)
    return [m for m in metas if m is not None and m.get("owner") == job.owner]


async def _bodies(request: web.Request, jobs: list[Job]) -> list[dict[str, Any]]:
    store = request.app[RECORDINGS]
    metas = await asyncio.to_thread(lambda: [recordings_of(store, j) for j in jobs])
    return [job_body(request, j, m) for j, m in zip(jobs, metas)]


def statuses_of(request: web.Request) -> tuple[str, ...] | None:
    """?status=pending,processing and/or ?active=true|false; None means every status."""
    chosen: set[str] | None = None
    raw = request.query.get("status")
    if raw is not None:
        chosen = {s.strip() for s in raw.split(",") if s.strip()}
        unknown = chosen - set(STATUSES)
        if unknown or not chosen:
            raise invalid_request(f"'status' must be one or more of {', '.join(STATUSES)} (comma-separated).",
                                  field="status")
    raw = request.query.get("active")
    if raw is not None:
        if raw.lower() not in _TRUE + _FALSE:
            raise invalid_request("'active' must be true or false.", field="active")
        wanted = set(ACTIVE) if raw.lower() in _TRUE else set(STATUSES) - set(ACTIVE)
        chosen = wanted if chosen is None else chosen & wanted
    return None if chosen is None else tuple(s for s in STATUSES if s in chosen)


@routes.post("/v1/simulations")
async def submit(request: web.Request) -> web.Response:
    key = require_api_key(token_of(request), request.app[API_KEYS])
    accepted = await request.app[SIMULATIONS].submit(key, await read_json(request))
    return json_response(accepted, status=202, headers={"Location": f"/v1/simulations/{accepted['job_id']}"})


@routes.get("/v1/simulations")
async def list_jobs(request: web.Request) -> web.Response:
    key = require_api_key(token_of(request), request.app[API_KEYS])
    statuses = statuses_of(request)
    limit = query_int(request, "limit", 20, 100)
    offset = query_int(request, "offset", 0, 10**9)
    jobs, total = await request.app[SIMULATIONS].list(key, statuses, limit, offset)
    return json_response({"jobs": await _bodies(request, jobs), "total": total, "limit": limit, "offset": offset})


@routes.get("/v1/simulations/{job_id}")
async def get_job(request: web.Request) -> web.Response:
    key = require_api_key(token_of(request), request.app[API_KEYS])
    job = await request.app[SIMULATIONS].get(key, request.match_info["job_id"])
    (body,) = await _bodies(request, [job])
    return json_response(body)


@routes.delete("/v1/simulations/{job_id}")
async def cancel_job(request: web.Request) -> web.Response:
    key = require_api_key(token_of(request), request.app[API_KEYS])
    job = await request.app[SIMULATIONS].cancel(key, request.match_info["job_id"])
    return json_response(job_body(request, job, []))

