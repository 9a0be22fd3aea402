"""Where a broadcast lives in the cluster (minimal stand-in: the cluster core's own module replaces
this file at merge; the edge codes only against ``Origin`` and the two callables below)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Awaitable, Callable


@dataclass(frozen=True)
class Origin:
    node_id: str
    url: str  # the origin's public_url
    spectator_token: str  # the broadcast's spectator token (what local spectators must present)


# async def origin_of(broadcast_id) -> Origin | None: a method of the cluster's directory
OriginOf = Callable[[str], Awaitable[Origin | None]]
# def node_authorization() -> str: the Authorization header value one node presents to another
NodeAuthorization = Callable[[], str]
