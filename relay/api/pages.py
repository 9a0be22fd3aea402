"""The pages: host console, watch page (with its link-preview tags and share QR code), static files.

The pages are plain JS, no build step. The watch page's HTML shell gets its og: meta tags filled in
here, server-side, because link-preview bots (chat apps, social sites) do not run scripts.
"""

from __future__ import annotations

import io
from functools import lru_cache
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import quote

import segno
from aiohttp import web

from ..auth import check_spectator
from ..errors import RelayError
from ..web import SESSIONS, public_url, token_of

STATIC_DIR = Path(__file__).resolve().parent.parent.parent / "static"
OG_MARK = "<!--og-->"  # where watch.html takes its link-preview tags
QR_CACHE = 64  # distinct watch URLs whose SVG is kept: a share dialog opened by many viewers costs one render

routes = web.RouteTableDef()


def page(name: str) -> web.FileResponse:
    # No caching of the HTML shell: a redeployed relay must not serve a stale page.
    return web.FileResponse(STATIC_DIR / name, headers={"Cache-Control": "no-cache"})


@routes.get("/")
async def index(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/host")


@routes.get("/host")
@routes.get("/host/")  # as people type it; the page's own links are absolute
async def host_console(request: web.Request) -> web.FileResponse:
    return page("host.html")


def watch_url(request: web.Request, broadcast_id: str, token: str) -> str:
    """The link a viewer shares: the broadcast's, never the sharer's invite."""
    return f"{public_url(request)}/watch/{quote(broadcast_id, safe='')}?token={quote(token, safe='')}"


def thumbnail_url(request: web.Request, broadcast_id: str, token: str) -> str:
    return (f"{public_url(request)}/v1/broadcasts/{quote(broadcast_id, safe='')}/thumbnail.jpg"
            f"?token={quote(token, safe='')}")


def _shared_info(request: web.Request) -> dict[str, Any] | None:
    """The broadcast's public state, for a request that carries its spectator token; else None (the page
    then shows its own error, and a preview of a wrong link says nothing about the broadcast)."""
    try:
        broadcast = request.app[SESSIONS].broadcast(request.match_info["broadcast_id"])
        check_spectator(token_of(request), broadcast.spectator_token)
    except RelayError:
        return None
    return broadcast.state()


def og_tags(request: web.Request, info: dict[str, Any] | None) -> str:
    title = (info or {}).get("title") or "Live world-model stream"
    host_name = (info or {}).get("host_name")
    description = (info or {}).get("description") or (
        f"Watch {host_name}'s live stream and take part." if host_name else "Watch live and take part."
    )
    tags = {"og:type": "video.other", "og:site_name": "relay", "og:title": title, "og:description": description}
    token = token_of(request)
    if info is not None and token:
        tags["og:url"] = watch_url(request, info["broadcast_id"], token)
    thumbnail = None
    if info is not None and token and info.get("live"):  # a live broadcast's latest picture
        thumbnail = thumbnail_url(request, info["broadcast_id"], token)
        tags["og:image"] = thumbnail
    lines = [f'<meta property="{k}" content="{escape(str(v))}">' for k, v in tags.items()]
    lines.append(f'<meta name="twitter:card" content="{"summary_large_image" if thumbnail else "summary"}">')
    return "\n  ".join(lines)


@lru_cache(maxsize=1)
def _watch_shell() -> str:
    return (STATIC_DIR / "watch.html").read_text(encoding="utf-8")


@routes.get("/watch/{broadcast_id}")
@routes.get("/watch/{broadcast_id}/")
async def watch_page(request: web.Request) -> web.Response:
    # The page itself is public; the spectator token in its URL is what grants watching.
    html = _watch_shell().replace(OG_MARK, og_tags(request, _shared_info(request)), 1)
    return web.Response(text=html, content_type="text/html", headers={"Cache-Control": "no-cache"})


@lru_cache(maxsize=QR_CACHE)
def qr_svg(url: str) -> bytes:
    out = io.BytesIO()
    # Black on white with the standard 4-module quiet zone: what every phone camera reads.
    segno.make(url, error="m").save(out, kind="svg", scale=1, border=4, dark="#000", light="#fff",
                                    xmldecl=False, title="QR code of the watch link", omitsize=True)
    return out.getvalue()


@routes.get("/v1/broadcasts/{broadcast_id}/qr.svg")
async def watch_qr(request: web.Request) -> web.Response:
    """The share dialog's QR code of the watch link; only for a holder of the broadcast's spectator token,
    so it is never a QR generator for someone else's text (and each URL it encodes is a real one). Under
    /v1/broadcasts/ so that a cluster carries it to the broadcast's owner like the rest of its API."""
    broadcast = request.app[SESSIONS].broadcast(request.match_info["broadcast_id"])
    token = token_of(request)
    check_spectator(token, broadcast.spectator_token)
    svg = qr_svg(watch_url(request, broadcast.broadcast_id, token))
    return web.Response(body=svg, content_type="image/svg+xml",
                        headers={"Cache-Control": "private, max-age=300", "Content-Disposition": "inline"})


@routes.get("/v1/broadcasts/{broadcast_id}/thumbnail.jpg")
async def live_thumbnail(request: web.Request) -> web.Response:
    """The og:image: a small JPEG of the live stream's latest keyframe, for the spectator token's holder
    (as qr.svg). Made at most once per [recordings] thumbnail_seconds however many ask; 404 when not live."""
    broadcast = request.app[SESSIONS].broadcast(request.match_info["broadcast_id"])
    check_spectator(token_of(request), broadcast.spectator_token)
    jpeg = await broadcast.thumbnail.jpeg() if broadcast.live else None
    if jpeg is None:
        raise RelayError("NOT_FOUND", 404, "This broadcast has no live picture now.",
                         action="Ask again while it is live.")
    max_age = round(broadcast.thumbnail.every_seconds)
    return web.Response(body=jpeg, content_type="image/jpeg",
                        headers={"Cache-Control": f"private, max-age={max_age}", "Content-Disposition": "inline"})


def add_static(app: web.Application) -> None:
    app.router.add_static("/static/", STATIC_DIR, show_index=False, follow_symlinks=False)
