"""Simulations API (API key): submit a script (or a batch), read, list and cancel the key's jobs."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from ..auth import require_api_key
from ..simulations import Job
from ..simulations.views import recordings_of, statuses_of
from ..web import API_KEYS, RECORDINGS, SIMULATIONS, json_response, page_of, public_url, read_json, token_of

routes = web.RouteTableDef()


def job_body(request: web.Request, job: Job, metas: list[dict[str, Any]]) -> dict[str, Any]:
    store, base = request.app[RECORDINGS], public_url(request)
    return {**job.public(), "streams": [store.body(m, base) for m in metas]}


async def _bodies(request: web.Request, jobs: list[Job]) -> list[dict[str, Any]]:
    store = request.app[RECORDINGS]
    metas = await asyncio.to_thread(lambda: [recordings_of(store, j) for j in jobs])
    return [job_body(request, j, m) for j, m in zip(jobs, metas)]


@routes.post("/v1/simulations")
async def submit(request: web.Request) -> web.Response:
    key = require_api_key(token_of(request), request.app[API_KEYS])
    accepted = await request.app[SIMULATIONS].submit(key, await read_json(request))
    return json_response(accepted, status=202, headers={"Location": f"/v1/simulations/{accepted['job_id']}"})


@routes.get("/v1/simulations")
async def list_jobs(request: web.Request) -> web.Response:
    key = require_api_key(token_of(request), request.app[API_KEYS])
    statuses = statuses_of(request.query.get("status"), request.query.get("active"))
    limit, offset = page_of(request)
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

