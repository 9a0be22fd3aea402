"""Orchestration API: the host switches audience modes live, blocks participants, hands turns, invites,
turns chat off and on, clears chat messages, and chooses whether spectators get a replay link."""

from __future__ import annotations

import hmac

from aiohttp import web

from ..broadcast import Broadcast
from ..errors import forbidden, invalid_request
from ..host import broadcast_links
from ..web import SESSIONS, json_response, public_url, read_json, token_of
from .connections import authorize_connection, chat_enabled_of, participant_of, share_replay_of

routes = web.RouteTableDef()
INVITES_PER_REQUEST = 500  # a class or a hall at once; more by asking again


def _is_spectator(request: web.Request, broadcast: Broadcast) -> bool:
    token = token_of(request)
    return bool(token) and hmac.compare_digest(token.encode(), broadcast.spectator_token.encode())


def host_broadcast(request: web.Request) -> Broadcast:
    broadcast = request.app[SESSIONS].broadcast(request.match_info["broadcast_id"])
    if _is_spectator(request, broadcast):
        raise forbidden("Only the host can change how the audience takes part.")
    authorize_connection(request, broadcast.connection_id)
    return broadcast


@routes.patch("/v1/broadcasts/{broadcast_id}")
async def patch_broadcast(request: web.Request) -> web.Response:
    """The broadcast's own settings (``share_replay``); the answer is the broadcast object."""
    broadcast = host_broadcast(request)
    body = await read_json(request)
    unknown = sorted(set(body) - {"share_replay"})
    if unknown:
        raise invalid_request(f"Unknown field '{unknown[0][:64]}'.", field=unknown[0][:64])
    share = share_replay_of(body)
    if share is not None:
        broadcast.share_replays(share, public_url(request))
    return json_response(broadcast_links(broadcast, public_url(request)))


@routes.get("/v1/broadcasts/{broadcast_id}/orchestration")
async def get_orchestration(request: web.Request) -> web.Response:
    broadcast = request.app[SESSIONS].broadcast(request.match_info["broadcast_id"])
    if _is_spectator(request, broadcast):
        return json_response(broadcast.orchestrator.state())
    authorize_connection(request, broadcast.connection_id)
    return json_response(broadcast.orchestrator.state(host=True))


@routes.put("/v1/broadcasts/{broadcast_id}/orchestration")
async def put_orchestration(request: web.Request) -> web.Response:
    broadcast = host_broadcast(request)
    broadcast.audience.configure(await read_json(request))
    return json_response(broadcast.orchestrator.state(host=True))


async def _set_blocked(request: web.Request, blocked: bool) -> web.Response:
    broadcast = host_broadcast(request)
    participant_id = request.match_info["participant_id"]
    (broadcast.audience.block if blocked else broadcast.audience.unblock)(participant_id)
    return json_response({"participant_id": participant_id, "blocked": blocked})


@routes.post("/v1/broadcasts/{broadcast_id}/participants/{participant_id}/block")
async def block(request: web.Request) -> web.Response:
    return await _set_blocked(request, True)


@routes.delete("/v1/broadcasts/{broadcast_id}/participants/{participant_id}/block")
async def unblock(request: web.Request) -> web.Response:
    return await _set_blocked(request, False)


@routes.post("/v1/broadcasts/{broadcast_id}/turn")
async def grant_turn(request: web.Request) -> web.Response:
    broadcast = host_broadcast(request)
    broadcast.audience.grant_turn(participant_of(await read_json(request)))
    return json_response(broadcast.orchestrator.state(host=True)["turn"])


@routes.delete("/v1/broadcasts/{broadcast_id}/turn")
async def revoke_turn(request: web.Request) -> web.Response:
    broadcast = host_broadcast(request)
    broadcast.audience.revoke_turn()
    return json_response(broadcast.orchestrator.state(host=True)["turn"])


@routes.post("/v1/broadcasts/{broadcast_id}/invites")
async def mint_invites(request: web.Request) -> web.Response:
    """`{count}` new participant identities, each as a code and a watch link carrying it. Invites are
    signed, not stored: any number may be minted, and each one is one person (a second socket with
    the same code resumes that identity and replaces the first)."""
    broadcast = host_broadcast(request)
    body = await read_json(request)
    count = body.get("count", 1)
    if not (isinstance(count, int) and not isinstance(count, bool) and 1 <= count <= INVITES_PER_REQUEST):
        raise invalid_request(f"'count' must be an integer from 1 to {INVITES_PER_REQUEST}.", field="count")
    watch = broadcast_links(broadcast, public_url(request))["watch_url"]
    invites = [{"participant_id": pid, "invite": code, "watch_url": f"{watch}&invite={code}"}
               for pid, code in broadcast.audience.mint_invites(count)]
    return json_response({"invites": invites, "invite_only": broadcast.orchestrator.settings.invite_only},
                         status=201)


@routes.get("/v1/broadcasts/{broadcast_id}/chat")
async def get_chat(request: web.Request) -> web.Response:
    """Chat on or off, the reactions offered and the recent messages (what a joiner's hello carries)."""
    broadcast = request.app[SESSIONS].broadcast(request.match_info["broadcast_id"])
    if not _is_spectator(request, broadcast):
        authorize_connection(request, broadcast.connection_id)
    return json_response(broadcast.audience.chat.state())


@routes.put("/v1/broadcasts/{broadcast_id}/chat")
async def put_chat(request: web.Request) -> web.Response:
    """`{enabled}`: the host turns chat and reactions off (participants are told) or back on."""
    broadcast = host_broadcast(request)
    broadcast.audience.set_chat(chat_enabled_of(await read_json(request)))
    return json_response(broadcast.audience.chat.state())


@routes.delete("/v1/broadcasts/{broadcast_id}/chat/messages/{message_id}")
async def clear_chat_message(request: web.Request) -> web.Response:
    """The host clears a message: it disappears from everyone's chat and from the history joiners get."""
    broadcast = host_broadcast(request)
    message_id = request.match_info["message_id"]
    broadcast.audience.clear_chat(message_id)
    return json_response({"message_id": message_id, "cleared": True})
