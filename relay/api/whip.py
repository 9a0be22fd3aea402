"""WHIP (RFC 9725): a live publisher's video in, on a `[world_model] kind = "whip"` connection.

    POST   /v1/connections/{id}/whip               the publisher's SDP offer -> 201 + Location + answer
    PATCH  /v1/connections/{id}/whip/{session_id}  trickled ICE candidates -> 204
    DELETE /v1/connections/{id}/whip/{session_id}  stop publishing -> 200

Every call carries `Authorization: Bearer <publish_token>` (the connection's answer has it): bound to
that connection, never the API key, so it can be pasted into OBS without handing over the account.
A wrong token and an unknown connection answer alike (401), so the token reveals nothing else.
"""

from __future__ import annotations

import logging

from aiohttp import web

from ..errors import unauthorized
from ..web import SESSIONS, bearer_of, body_limit, read_sdp
from ..worldmodel.whip import WhipStreamer

log = logging.getLogger(__name__)

routes = web.RouteTableDef()


def publish_slot(request: web.Request) -> WhipStreamer:
    conn = request.app[SESSIONS].connections.get(request.match_info["connection_id"])
    streamer = conn.streamer if conn is not None and not conn.closed else None
    # The header only, never ?token=: a URL is logged by proxies and kept in histories, and every WHIP
    # publisher can set the header (RFC 9725 section 4.5).
    if not isinstance(streamer, WhipStreamer) or not streamer.check_token(bearer_of(request)):
        raise unauthorized("Missing or invalid publish token for this connection.")
    return streamer


def whip_location(connection_id: str, session_id: str) -> str:
    return f"/v1/connections/{connection_id}/whip/{session_id}"


@routes.post("/v1/connections/{connection_id}/whip")
@body_limit(lambda settings: settings.limits.whep_offer_max_bytes)
async def whip_publish(request: web.Request) -> web.Response:
    streamer = publish_slot(request)  # 401 before the body is read
    offer = await read_sdp(request)
    session_id, answer = await streamer.publish(offer)
    log.info("WHIP session opened", extra={"connection_id": request.match_info["connection_id"],
                                           "session_id": session_id})
    return web.Response(status=201, text=answer, content_type="application/sdp",
                        headers={"Location": whip_location(request.match_info["connection_id"], session_id)})


@routes.patch("/v1/connections/{connection_id}/whip/{session_id}")
@body_limit(lambda settings: settings.limits.whep_offer_max_bytes)  # candidates are bounded by count too
async def whip_trickle(request: web.Request) -> web.Response:
    ingest = publish_slot(request).session(request.match_info["session_id"])
    await ingest.trickle(await read_sdp(request, "application/trickle-ice-sdpfrag"))
    return web.Response(status=204)


@routes.delete("/v1/connections/{connection_id}/whip/{session_id}")
async def whip_unpublish(request: web.Request) -> web.Response:
    await publish_slot(request).unpublish(request.match_info["session_id"])
    return web.Response(status=200)
