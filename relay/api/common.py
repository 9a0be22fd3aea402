"""What the relay's own API handlers share beyond relay/web.py: a handler's own body limit."""

from __future__ import annotations

from typing import Callable

from ..config import Settings


def body_limit(limit_of: Callable[[Settings], int]):
    """A handler's own bound on its body, below max_body_bytes (a WHEP offer's, say). The app's
    body_deadline middleware refuses a longer declared body with 413 before reading a byte of it."""
    def mark(handler):
        handler.body_limit = limit_of
        return handler
    return mark
