"""Recordings API: list and get (API key), the files by signed URL (for browsers), the replay page."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from ..auth import require_api_key
from ..errors import RelayError, not_found
from ..recordings import FILES, RecordingStore, owner_id
from .common import API_KEYS, RECORDINGS, json_response, public_url, query_int, token_of
from .pages import page

routes = web.RouteTableDef()

FILE_FIELDS = {"video_url": "video.mp4", "events_url": "events.jsonl",
               "thumbnail_url": "thumbnail.jpg", "preview_url": "preview.mp4"}


def recording_body(request: web.Request, store: RecordingStore, meta: dict[str, Any]) -> dict[str, Any]:
    base = public_url(request)
    stream_id = meta["stream_id"]
    body: dict[str, Any] = {"stream_id": stream_id}
    for field, name in FILE_FIELDS.items():
        body[field] = base + store.signed_url(f"/v1/recordings/{stream_id}/{name}")
    body.update({
        "frame_count": meta.get("frame_count"),
        "duration_seconds": meta.get("duration_seconds"),
        "status": meta.get("status"),
        "error": meta.get("error"),
        "replay_url": base + store.signed_url(f"/recordings/{stream_id}"),
        **RecordingStore.summary(meta),
    })
    return body


@routes.get("/v1/recordings")
async def list_recordings(request: web.Request) -> web.Response:
    key = require_api_key(token_of(request), request.app[API_KEYS])
    limit = query_int(request, "limit", 20, 100)
    offset = query_int(request, "offset", 0, 10**9)
    store = request.app[RECORDINGS]
    page_, total = await asyncio.to_thread(store.list, owner_id(key), limit, offset)
    return json_response({"recordings": [RecordingStore.summary(m) for m in page_],
                          "total": total, "limit": limit, "offset": offset})


@routes.get("/v1/recordings/{stream_id}")
async def get_recording(request: web.Request) -> web.Response:
    key = require_api_key(token_of(request), request.app[API_KEYS])
    store = request.app[RECORDINGS]
    stream_id = request.match_info["stream_id"]
    meta = await asyncio.to_thread(store.get, stream_id)
    if meta is None or meta.get("owner") != owner_id(key):
        raise not_found("recording", stream_id)
    return json_response(recording_body(request, store, meta))


def _check_signature(request: web.Request, path: str) -> None:
    store = request.app[RECORDINGS]
    if not store.verify(path, request.query.get("expires"), request.query.get("signature")):
        raise RelayError("FORBIDDEN", 403, "This link is invalid or has expired.",
                         action="Ask for a fresh link (GET /v1/recordings/{stream_id}).")


@routes.get("/v1/recordings/{stream_id}/{name}")
async def recording_file(request: web.Request) -> web.StreamResponse:
    stream_id, name = request.match_info["stream_id"], request.match_info["name"]
    if name not in FILES:
        raise not_found("file", name)
    _check_signature(request, request.path)
    path = request.app[RECORDINGS].path(stream_id, name)
    if path is None:
        raise not_found("file", f"{stream_id}/{name}")
    # FileResponse answers Range requests (206, Content-Range): video seeks without a full download.
    return web.FileResponse(path, headers={"Content-Type": FILES[name], "Cache-Control": "private, max-age=3600"})


@routes.get("/recordings/{stream_id}")
async def replay_page(request: web.Request) -> web.StreamResponse:
    # The page itself is public (it holds no data): its info call checks the link's signature,
    # so an expired link shows a readable explanation instead of a JSON error.
    return page("replay.html")


@routes.get("/recordings/{stream_id}/info")
async def replay_info(request: web.Request) -> web.Response:
    """What the replay page needs, authorized by the page's own signed link."""
    stream_id = request.match_info["stream_id"]
    _check_signature(request, f"/recordings/{stream_id}")
    store = request.app[RECORDINGS]
    meta = await asyncio.to_thread(store.get, stream_id)
    if meta is None:
        raise not_found("recording", stream_id)
    return json_response(recording_body(request, store, meta))
