"""What the relay's own API handlers share beyond relay/web.py: per-handler body limits, the broadcast's links."""

from __future__ import annotations

from typing import Any, Callable

from aiohttp import web

from ..config import Settings
from ..host import broadcast_links
from ..sessions import Connection
from ..web import public_url


def body_limit(limit_of: Callable[[Settings], int]):
    """A handler's own bound on its body, below max_body_bytes (a WHEP offer's, say). The app's
    body_deadline middleware refuses a longer declared body with 413 before reading a byte of it."""
    def mark(handler):
        handler.body_limit = limit_of
        return handler
    return mark


def broadcast_info(request: web.Request, conn: Connection) -> dict[str, Any]:
    return broadcast_links(conn.broadcast, public_url(request))
