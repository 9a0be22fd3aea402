"""Spectator API: WHEP sessions, broadcast state, the participants' events socket, /config."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import quote

from aiohttp import WSMsgType, web

from .. import metrics
from ..auth import check_spectator, is_api_key
from ..audience import rate_limited_reply
from ..broadcast import Broadcast
from ..errors import RelayError, invalid_request, not_found, unsupported_media_type
from ..inputs import parse_json
from ..media.hls import HlsPublisher
from ..web import (API_KEYS, AUDIENCE_LINK, CLUSTER, EDGES, GOING_AWAY, IS_NODE, SESSIONS, SETTINGS, STALLED, TOO_SLOW,
                   body_limit, client_address, close_within, json_response, next_for, public_url, send_within,
                   read_sdp, token_of)

# The events socket's close code when the same participant resumed on a newer socket: the
# page that gets it should not resume again (two tabs would take turns replacing each other).
REPLACED_CLOSE_CODE = 4001
# The events socket's close code when a participant kept sending far past its message rate
# ([limits] events_flood_messages refused in a row); 4000 + HTTP 429.
FLOODING_CLOSE_CODE = 4029
HLS_FIRST_WAIT_SEGMENTS = 4  # segment durations an early playlist request may be held
WATCH_NODES_MAX = 16  # a page needs a few places to rejoin, not the whole cluster

routes = web.RouteTableDef()


def spectator_broadcast(request: web.Request) -> Broadcast:
    broadcast = request.app[SESSIONS].broadcast(request.match_info["broadcast_id"])
    check_spectator(token_of(request), broadcast.spectator_token)
    return broadcast


def session_location(broadcast: Broadcast, spectator_id: str) -> str:
    return f"/v1/broadcasts/{broadcast.broadcast_id}/whep/{spectator_id}"


@routes.get("/config")
async def client_config(request: web.Request) -> web.Response:
    return json_response({"iceServers": list(request.app[SETTINGS].webrtc.ice_servers)})


@routes.get("/v1/broadcasts/{broadcast_id}")
async def get_broadcast(request: web.Request) -> web.Response:
    return json_response(spectator_broadcast(request).state())


@routes.get("/v1/broadcasts/{broadcast_id}/nodes")
async def watch_nodes(request: web.Request) -> web.Response:
    """Where the broadcast can be watched: the live nodes, least-loaded first. The watch page rejoins
    through the next one when the node it watches at dies. Answered by the node asked (no forwarding),
    from its last heartbeat's view: no secrets, and cacheable for that long."""
    broadcast_id = request.match_info["broadcast_id"]
    cluster = request.app[CLUSTER]
    if cluster is None or broadcast_id in request.app[SESSIONS].broadcasts:
        spectator_broadcast(request)  # 404 / 401 as the broadcast's other endpoints
    else:
        origin = await cluster.origin_of(broadcast_id)
        if origin is None:
            raise not_found("broadcast", broadcast_id)
        check_spectator(token_of(request), origin.spectator_token)
    if cluster is None:
        nodes = [{"node_id": "", "url": public_url(request)}]
        max_age = 60
    else:
        nodes = cluster.watch_nodes(WATCH_NODES_MAX)
        max_age = max(1, int(cluster.settings.heartbeat_seconds))
    return json_response({"broadcast_id": broadcast_id, "nodes": nodes},
                         headers={"Cache-Control": f"private, max-age={max_age}"})


def _host_preview(request: web.Request, broadcast: Broadcast) -> bool:
    """The host watching its own broadcast (its client_token or API key): not counted as a viewer."""
    sessions = request.app[SESSIONS]
    token = token_of(request)
    conn = sessions.connections.get(broadcast.connection_id)
    if not token or conn is None:
        return False
    return sessions.connection_for_client_token(token) is conn or (
        is_api_key(token, request.app[API_KEYS]) and hmac.compare_digest(token.encode(), conn.api_key.encode()))


def _uncounted(request: web.Request, broadcast: Broadcast) -> bool:
    """The host's preview, or another node's edge feed: served, but nobody's audience."""
    return request.app[IS_NODE](request) or _host_preview(request, broadcast)


def _edge_for(request: web.Request):
    """This node's edges when the broadcast lives on another node (a cluster); else None."""
    broadcast_id = request.match_info["broadcast_id"]
    if EDGES in request.app and not request.app[SESSIONS].has_broadcast(broadcast_id):
        return request.app[EDGES]
    return None


@routes.post("/v1/broadcasts/{broadcast_id}/whep")
@body_limit(lambda settings: settings.limits.whep_offer_max_bytes)
async def whep_offer(request: web.Request) -> web.Response:
    if (edges := _edge_for(request)) is not None:  # another node's broadcast: served from here as its edge
        token = token_of(request)  # checked by the edge against the origin's token, before the body is read
        location, answer = await edges.join(request.match_info["broadcast_id"], await read_sdp(request),
                                            token, client_address(request))
        return web.Response(status=201, text=answer, content_type="application/sdp",
                            headers={"Location": location})
    broadcast = request.app[SESSIONS].broadcast(request.match_info["broadcast_id"])
    uncounted = _uncounted(request, broadcast)
    if not uncounted:
        check_spectator(token_of(request), broadcast.spectator_token)
    offer = await read_sdp(request)
    spectator, answer = await broadcast.spectators.join(offer, counted=not uncounted,
                                                        address=client_address(request))
    return web.Response(
        status=201,
        text=answer,
        content_type="application/sdp",
        headers={"Location": session_location(broadcast, spectator.spectator_id)},
    )


@routes.patch("/v1/broadcasts/{broadcast_id}/whep/{spectator_id}")
@body_limit(lambda settings: settings.limits.whep_offer_max_bytes)  # candidates are bounded by count too
async def whep_trickle(request: web.Request) -> web.Response:
    if (edges := _edge_for(request)) is not None:
        broadcast_id, token = request.match_info["broadcast_id"], token_of(request)
        edges.authorize(broadcast_id, token)  # 404/401 before the body is read
        if request.content_type != "application/trickle-ice-sdpfrag":
            raise unsupported_media_type("application/trickle-ice-sdpfrag")
        fragment = (await request.read()).decode("utf-8", errors="replace")
        await edges.trickle(broadcast_id, request.match_info["spectator_id"], fragment, token)
        return web.Response(status=204)
    broadcast = request.app[SESSIONS].broadcast(request.match_info["broadcast_id"])
    _check_optional_token(request, broadcast)
    if request.content_type != "application/trickle-ice-sdpfrag":
        raise unsupported_media_type("application/trickle-ice-sdpfrag")
    fragment = (await request.read()).decode("utf-8", errors="replace")
    await broadcast.spectators.add_candidates(request.match_info["spectator_id"], fragment)
    return web.Response(status=204)


@routes.delete("/v1/broadcasts/{broadcast_id}/whep/{spectator_id}")
async def whep_leave(request: web.Request) -> web.Response:
    if (edges := _edge_for(request)) is not None:
        await edges.leave(request.match_info["broadcast_id"], request.match_info["spectator_id"], token_of(request))
        return web.Response(status=200)
    broadcast = request.app[SESSIONS].broadcast(request.match_info["broadcast_id"])
    _check_optional_token(request, broadcast)
    spectator_id = request.match_info["spectator_id"]
    broadcast.spectators.spectator(spectator_id)  # 404 for an unknown session
    await broadcast.spectators.remove(spectator_id)
    return web.Response(status=200)


def _check_optional_token(request: web.Request, broadcast: Broadcast) -> None:
    # The session URL itself is unguessable (it is the capability, as WHEP intends); players
    # that repeat their token must still repeat a right one (a spectator's or the host's).
    if token_of(request) is not None and not _uncounted(request, broadcast):
        check_spectator(token_of(request), broadcast.spectator_token)


# -- live HLS ----------------------------------------------------------------------------------

@asynccontextmanager
async def _hls(request: web.Request) -> AsyncIterator[HlsPublisher]:
    """The broadcast's HLS for this request: its own, or (another node's broadcast) this edge's."""
    if (edges := _edge_for(request)) is not None:
        async with edges.hls(request.match_info["broadcast_id"], token_of(request)) as hls:
            yield _offered(hls)
    else:
        yield _offered(spectator_broadcast(request).hls)


def _offered(hls: HlsPublisher | None) -> HlsPublisher:
    if hls is None:
        raise RelayError("NOT_FOUND", 404, "This relay offers no HLS rendition ([media] hls is off, or the "
                         "mode is per-spectator).", action="Watch over WebRTC (whep_url).")
    return hls


@routes.get("/v1/broadcasts/{broadcast_id}/hls/index.m3u8")
async def hls_playlist(request: web.Request) -> web.Response:
    async with _hls(request) as hls:
        # Early in the broadcast's first stream, hold the request (bounded) until the playlist lists
        # enough segments for a player to start, rather than answer an (almost) empty one.
        await hls.wait_for_segments(HLS_FIRST_WAIT_SEGMENTS * hls.target_ticks / 90000 + 1.0)
        hls.note_reader(client_address(request), request.app[SESSIONS].clock.monotonic())
        token = request.query.get("token")
        query = f"?token={quote(token, safe='')}" if token else ""  # players carry only the URL they were given
        return web.Response(text=hls.playlist(query), content_type="application/vnd.apple.mpegurl",
                            headers={"Cache-Control": "no-cache"})


@routes.get(r"/v1/broadcasts/{broadcast_id}/hls/{sequence:\d{1,12}}.ts")
async def hls_segment(request: web.Request) -> web.Response:
    async with _hls(request) as hls:
        segment = hls.segment(int(request.match_info["sequence"]))
    if segment is None:
        raise RelayError("NOT_FOUND", 404, f"No HLS segment {request.match_info['sequence']}: it is not "
                         "made yet or has left the live window.", action="Read the playlist again.")
    metrics.HLS_BYTES_SERVED.inc(len(segment.data))
    # A segment never changes once listed: caches (a CDN in front of the relay) may keep it.
    return web.Response(body=segment.data, content_type="video/mp2t",
                        headers={"Cache-Control": "public, max-age=60, immutable"})


@routes.get("/v1/broadcasts/{broadcast_id}/events")
async def events(request: web.Request) -> web.WebSocketResponse:
    # Admitted before the upgrade, so the caps answer in HTTP (429/503 in the error shape) and a
    # crowd of sockets opening at once cannot all slip past a count taken before an await.
    resume, invite, address = request.query.get("resume"), request.query.get("invite"), client_address(request)
    if (link := _link_for(request)) is not None:  # another node's broadcast: its audience answers over Redis
        relayed = await link.join(request.match_info["broadcast_id"], token_of(request), resume=resume,
                                  invite=invite, address=address)
        return await _converse(request, relayed, relayed.channel, relayed.hello, relayed.close)
    broadcast = spectator_broadcast(request)
    audience = broadcast.audience
    channel = audience.open_channel(resume, address=address, invite=invite)
    return await _converse(request, audience, channel, broadcast.hello(channel.participant_id, channel.resumed),
                           lambda: audience.close_channel(channel))


def _link_for(request: web.Request):
    """This node's audience link when the broadcast lives on another node (a cluster); else None."""
    if AUDIENCE_LINK in request.app and request.match_info["broadcast_id"] not in request.app[SESSIONS].broadcasts:
        return request.app[AUDIENCE_LINK]
    return None


async def _converse(request: web.Request, audience, channel, hello: dict, close) -> web.WebSocketResponse:
    """The socket's life: the hello, then each message bounded, rate-limited and answered by `audience`
    (the broadcast's Audience, or a participant relayed to another node's); `close()` once at the end."""
    ws = web.WebSocketResponse(heartbeat=20, max_msg_size=16 * 1024)
    try:
        await ws.prepare(request)
    except BaseException:
        close()
        raise
    sender = asyncio.create_task(_pump(request, ws, channel), name="relay-events-send")
    max_depth = request.app[SETTINGS].server.max_json_depth
    try:
        await ws.send_json(hello)
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                if msg.type == WSMsgType.BINARY:  # not read, but not free either: a token, unanswered
                    audience.take_token(channel)
                reply = None
            else:
                try:
                    message = parse_json(msg.data, max_depth)
                    if not isinstance(message, dict):
                        raise invalid_request("Events messages are JSON objects.")
                except RelayError as err:  # answered, and the socket stays open
                    wait = audience.take_token(channel)  # garbage is no free flood
                    reply = rate_limited_reply(None, wait) if wait else _error_reply(err)
                else:
                    try:  # participant_message takes the message's token itself
                        reply = await audience.participant_message(channel, message)
                    except RelayError as err:
                        reply = _error_reply(err)
            if reply is not None:
                await ws.send_json(reply)
            if channel.flooded:  # kept flooding far past its rate: not worth reading any more
                await ws.close(code=FLOODING_CLOSE_CODE, message=b"rate limited")
                break
    finally:
        close()  # before any await: this handler may be cancelled
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        await ws.close()
    return ws


def _error_reply(err: RelayError) -> dict:
    reply = {"type": "error", "code": err.code, "message": err.message, "fatal": False, "details": err.details}
    if err.retry_after is not None:  # CLUSTER_UNAVAILABLE, NODE_UNAVAILABLE: the socket stays, retry then
        reply["retry_after"] = err.retry_after
    return reply


async def _pump(request: web.Request, ws: web.WebSocketResponse, channel) -> None:
    sessions, seconds = request.app[SESSIONS], request.app[SETTINGS].server.send_timeout_seconds
    while True:
        event = await next_for(request, channel.queue, seconds)
        if event is STALLED:
            await close_within(request, ws, TOO_SLOW, b"too slow", seconds)
            return
        if event is None or channel.overflowed:
            # Replaced first: a replaced socket that was also behind must still say "replaced",
            # or its page would resume the same identity and the two would take turns.
            if channel.replaced:  # the same participant opened a newer socket
                await close_within(request, ws, REPLACED_CLOSE_CODE, b"replaced", seconds)
            elif channel.overflowed:
                await close_within(request, ws, TOO_SLOW, b"too slow", seconds)
            elif sessions.closed:  # the relay is stopping (stream_ended, if one was live, went first)
                await close_within(request, ws, GOING_AWAY, b"shutdown", seconds)
            else:
                await close_within(request, ws, 1000, b"closed", seconds)
            return
        if not await send_within(request, ws, event, seconds):  # serialized once by the broadcast
            return
