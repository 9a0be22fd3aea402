"""The pages: host console, watch page, and their static files (plain JS, no build step)."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

STATIC_DIR = Path(__file__).resolve().parent.parent.parent / "static"

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


@routes.get("/watch/{broadcast_id}")
@routes.get("/watch/{broadcast_id}/")
async def watch_page(request: web.Request) -> web.FileResponse:
    # The page itself is public; the spectator token in its URL is what grants watching.
    return page("watch.html")


def add_static(app: web.Application) -> None:
    app.router.add_static("/static/", STATIC_DIR, show_index=False, follow_symlinks=False)
