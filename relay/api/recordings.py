"""Recordings API: list and get (API key), the files by signed URL (for browsers), the replay page."""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path

from aiohttp import web

from ..auth import require_api_key
from ..errors import RelayError, insufficient_storage, not_found
from ..media.recorder import EVENTS_FILE
from ..recordings import FILES, SHARED_EVENTS_PATH, RecordingStore, owner_id
from ..web import API_KEYS, RECORDINGS, json_response, page_of, public_url, token_of
from .pages import page

log = logging.getLogger(__name__)
routes = web.RouteTableDef()


@routes.get("/v1/recordings")
async def list_recordings(request: web.Request) -> web.Response:
    key = require_api_key(token_of(request), request.app[API_KEYS])
    limit, offset = page_of(request)
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
    return json_response(store.body(meta, public_url(request)))


def _check_signature(request: web.Request, path: str) -> int:
    """The link's expiry (seconds since the epoch) once its signature holds; 403 otherwise."""
    store = request.app[RECORDINGS]
    expires = request.query.get("expires")
    if not store.verify(path, expires, request.query.get("signature")):
        raise RelayError("FORBIDDEN", 403, "This link is invalid or has expired.",
                         action="Ask for a fresh link (GET /v1/recordings/{stream_id}).")
    return int(expires)  # verify accepted it: one plain integer


def _unsatisfiable(size: int, message: str) -> web.Response:
    # Rendered here rather than raised: a 416 carries Content-Range with the file's size (RFC 9110 15.5.17).
    err = RelayError("RANGE_NOT_SATISFIABLE", 416, message,
                     action="Ask for one range 'bytes=first-last', 'bytes=first-' or 'bytes=-suffix' "
                            "(suffix > 0) within the file, or for the whole file without Range.",
                     details={"size": size})
    return web.json_response(err.to_dict(), status=416, headers={"Content-Range": f"bytes */{size}"})


# At most 18 digits: any file fits, and int() of a 5,000-digit header cannot raise past the 416.
_RANGE = re.compile(r"bytes=(\d{0,18})-(\d{0,18})", re.ASCII)


def _range_refusal(header: str | None, size: int) -> web.Response | None:
    """None when ``header`` is absent or names one satisfiable range (FileResponse serves it as 206).

    Everything else is 416 in the error shape: a malformed header, several ranges (a recording is
    served one range at a time; a player asks for one), a first byte past the end, or an empty suffix
    ("bytes=-0" asks for no bytes, which no 206 can carry).
    """
    if header is None:
        return None
    match = _RANGE.fullmatch(header.strip())
    if match is None:
        if "," in header:
            return _unsatisfiable(size, "Only one byte range per request is served.")
        return _unsatisfiable(size, "The Range header is malformed.")
    first, last = match.groups()
    if not first and not last:
        return _unsatisfiable(size, "The Range header is malformed.")
    if not first:  # a suffix: the last N bytes
        if int(last) == 0 or size == 0:
            return _unsatisfiable(size, "The range asks for no bytes.")
        return None
    if last and int(last) < int(first):
        return _unsatisfiable(size, "The range ends before it starts.")
    if int(first) >= size:
        return _unsatisfiable(size, f"The range starts past the end of the file ({size} bytes).")
    return None


@routes.get("/v1/recordings/{stream_id}/{name}")
async def recording_file(request: web.Request) -> web.StreamResponse:
    stream_id, name = request.match_info["stream_id"], request.match_info["name"]
    if name not in FILES:
        raise not_found("file", name)
    _check_signature(request, request.path)
    path = request.app[RECORDINGS].path(stream_id, name)
    if path is None:
        raise not_found("file", f"{stream_id}/{name}")
    return _serve(request, path, FILES[name], "private, max-age=3600")


@routes.get("/recordings/{stream_id}")
async def replay_page(request: web.Request) -> web.StreamResponse:
    # The page itself is public (it holds no data): its info call checks the link's signature,
    # so an expired link shows a readable explanation instead of a JSON error.
    return page("replay.html")


@routes.get(SHARED_EVENTS_PATH)
async def shared_events(request: web.Request) -> web.StreamResponse:
    """A replay link's events log (its info's ``events_url``): the prompts and the chat, less the
    messages the host cleared, whose text never leaves the server this way."""
    stream_id = request.match_info["stream_id"]
    _check_signature(request, request.path)
    try:
        path = await request.app[RECORDINGS].shared_events(stream_id)
    except OSError as exc:
        log.warning("could not write a recording's shared events log: %s", exc, extra={"stream_id": stream_id})
        raise insufficient_storage("the replay's events log could not be written") from None
    if path is None:
        raise not_found("file", f"{stream_id}/{EVENTS_FILE}")
    # Revalidated each time (no-cache): a clear made after the stream ended still reaches the log
    # (relay/broadcast.py), and the rewritten view has a new ETag.
    return _serve(request, path, FILES[EVENTS_FILE], "private, no-cache")


def _serve(request: web.Request, path: Path, content_type: str, cache_control: str) -> web.StreamResponse:
    """A recording's file: FileResponse answers Range requests (206, Content-Range: video seeks without a full
    download); a range it cannot satisfy is our 416 in the error shape."""
    refusal = _range_refusal(request.headers.get("Range"), path.stat().st_size)
    if refusal is not None:
        return refusal
    return web.FileResponse(path, headers={"Content-Type": content_type, "Cache-Control": cache_control})


@routes.get("/recordings/{stream_id}/info")
async def replay_info(request: web.Request) -> web.Response:
    """What the replay page needs, authorized by the page's own signed link."""
    stream_id = request.match_info["stream_id"]
    expires_at = _check_signature(request, f"/recordings/{stream_id}")
    store = request.app[RECORDINGS]
    meta = await asyncio.to_thread(store.get, stream_id)
    if meta is None:
        raise not_found("recording", stream_id)
    # The links it hands on expire with this one: a leaked replay link is not a key that renews itself.
    return json_response(store.body(meta, public_url(request), expires_at))
