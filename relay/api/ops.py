"""Operations: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

from aiohttp import web

from .. import metrics
from ..web import CLUSTER, EDGES, SESSIONS, json_response

routes = web.RouteTableDef()


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    sessions = request.app[SESSIONS]
    ready = not sessions.closed and sessions.streamers_free > 0
    body = {"status": "ready" if ready else "unavailable", "streamers_free": sessions.streamers_free}
    cluster = request.app[CLUSTER]
    if cluster is not None:  # membership as the last heartbeat saw it; ready without Redis (streams go on)
        body["cluster"] = cluster.describe()
        body["cluster"].update(request.app[EDGES].describe() if EDGES in request.app
                               else {"edge_feeds": 0, "edge_spectators": 0})
    return json_response(body, status=200 if ready else 503)


@routes.get("/metrics")
async def prometheus(request: web.Request) -> web.Response:
    if EDGES in request.app:
        metrics.CLUSTER_EDGE_FEEDS.set(len(request.app[EDGES].edges))
    return web.Response(body=metrics.render(), content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff"})
