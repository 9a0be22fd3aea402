"""Participants at any node: an events socket opened at a node that is not the broadcast's origin is
served there, with the origin's Audience as the one authority, through Redis pub/sub.

Each node listens on one channel, ``relay:audience:<node_id>``. Inside the cluster's Redis a message is a
node's (the same trust as the directory). JSON, at most MESSAGE_MAX_BYTES as sent (a larger one is not sent):
- to an origin: ``join`` (resume, invite, client address: the origin checks them and issues the identity
  and its resume token, so both hold on every node), ``message`` (a participant's input, vote, hand: the
  origin's Audience answers as on one node), ``leave``, ``sync`` (the broadcast's snapshot: Broadcast.snapshot);
- to an edge: ``reply`` (a join's hello, a message's answer, a sync's snapshot), ``push`` (an event for every
  participant of a broadcast: published by the origin once per broadcast per node holding its participants,
  fanned out there to each socket), ``close`` (the origin closed that socket's participant: replaced, or the
  end), ``stale`` (the origin lost Redis a while, or a push to that node was lost: every broadcast of that
  origin held there syncs; one per node, sent again at each sweep until it is out).

The node holding the socket bounds it first (message size, JSON depth, its rate: relay/api/broadcasts.py),
so nothing a stranger floods crosses Redis. With Redis away a message is answered at once with 503
CLUSTER_UNAVAILABLE in the error shape and the socket stays open; the listener subscribes again when
Redis returns. Pub/sub keeps nothing: a push published while Redis was away is lost. So when Redis is
back (a listener subscribes again), each edge asks the origin of every broadcast it holds sockets of for a
snapshot and sends each socket a fresh ``hello`` built from it (same identity, ``resumed: true``: what a
page does with a reconnected socket's hello; the snapshot serialized once for all of them), and each
origin tells the nodes holding its participants ``stale`` (an edge whose own subscription never broke).
A ``stale`` that arrives while that broadcast's sync is in flight asks nothing more: the origin sent it
before reading the request, so the reply that follows is newer. A sync the origin cannot answer yet is
tried again every heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

from redis.exceptions import RedisError

from ..audience import CHAT_TYPES, Audience, EventChannel, rate_limited_reply, take_token
from ..auth import check_spectator
from ..clock import SYSTEM_CLOCK, Clock
from ..config import Settings
from ..errors import RelayError, cluster_unavailable, not_found
from ..ratelimit import TokenBucket

log = logging.getLogger(__name__)

MESSAGE_MAX_BYTES = 64 * 1024  # an event socket's message is at most 16 KiB; a push is one event
OUTBOX_MAX = 4096  # an origin's replies and pushes awaiting Redis; past it they are dropped (Redis is away)
CLOSE_FLUSH_SECONDS = 1.0  # at shutdown, the outbox is given this long to reach Redis
REPLY_SECONDS = 5.0  # an origin that does not answer a request within this is unavailable
ENVELOPE_BYTES = 1024  # room for a reply's op, id and sender around a hello or snapshot
TOKEN_MAX_CHARS = 256  # a resume token or invite longer than any we mint is no token (a new identity)
ORCHESTRATION_EVENT = '{"type": "orchestration"'  # how Audience.send's json.dumps starts a state push


def inbox(node_id: str) -> str:
    return f"relay:audience:{node_id}"


def node_unavailable(node_id: str) -> RelayError:
    return RelayError("NODE_UNAVAILABLE", 503, "The node that serves this broadcast does not answer.",
                      action="Retry shortly.", details={"node_id": node_id}, retry_after=2)


ORIGIN_LOST = json.dumps({"type": "disconnected", "reason": "origin_lost"})
# A hello's fields that are the socket's own; the rest is the broadcast's snapshot, the same for every socket.
PERSONAL = ("participant_id", "resume_token", "invited")


@dataclass(eq=False)
class RelayedParticipant:
    """A participant's socket here for another node's broadcast: the local outbox and rate, the origin's identity."""

    link: "AudienceLink"
    broadcast_id: str
    origin: str  # the origin's node id
    socket_id: str
    channel: EventChannel
    hello: dict[str, Any] | None = None

    def take_token(self, channel: EventChannel, *, chat: bool = False) -> float:
        return self.link.take_token(self.broadcast_id, channel, chat=chat)

    async def participant_message(self, channel: EventChannel, message: dict[str, Any]) -> dict[str, Any] | None:
        """As Audience.participant_message, the token taken here (a chat token for chat and reactions, as
        at the origin): a flood never crosses Redis."""
        kind = message.get("type")
        wait = self.take_token(channel, chat=isinstance(kind, str) and kind in CHAT_TYPES)
        if wait:
            return rate_limited_reply(message.get("type"), wait)
        reply = await self.link.request(self.origin, {"op": "message", "broadcast_id": self.broadcast_id,
                                                      "socket": self.socket_id, "message": message})
        return reply.get("reply")

    def close(self) -> None:
        self.link.leave(self)


@dataclass(eq=False)
class _Remote:
    """At the origin: a participant whose socket is at another node."""

    node: str
    broadcast_id: str
    audience: Audience
    channel: EventChannel


class AudienceLink:
    def __init__(self, settings: Settings, cluster: Any, sessions: Any, clock: Clock = SYSTEM_CLOCK) -> None:
        """`cluster`: this node's Cluster (its Redis, node id, directory); `sessions`: the SessionManager
        whose broadcasts' audiences answer other nodes' participants."""
        self._settings = settings
        self._cluster = cluster
        self._sessions = sessions
        self._clock = clock
        self.node_id = cluster.node_id
        self.listening = False  # subscribed to our inbox: replies can reach us
        # As an edge: our sockets, and requests awaiting their reply.
        self._sockets: dict[str, RelayedParticipant] = {}
        self._by_broadcast: dict[str, dict[str, RelayedParticipant]] = {}
        self._pending: dict[int, asyncio.Future] = {}
        self._on_reply: dict[int, Callable[[dict[str, Any]], None]] = {}
        # The origin's participant rate per broadcast (the host may change it): from the hello, then pushes.
        self._rates: dict[str, tuple[float, int]] = {}
        self._ids = itertools.count(1)
        # As an origin: other nodes' participants of our broadcasts, and how many each node holds.
        self._remote: dict[str, _Remote] = {}
        self._nodes_of: dict[str, Counter[str]] = {}
        self._misses: Counter[str] = Counter()  # socket id -> sweeps in a row that did not see its other node
        self._outbox: asyncio.Queue[tuple[str, str, bool, str | None]] = asyncio.Queue(OUTBOX_MAX)
        self._unsent: list[tuple[str, str, int]] = []  # leaves that met Redis away: sent again when it is back
        self._subscribed = False  # once: a later subscription is Redis coming back (pushes may be lost)
        self._stale: set[str] = set()  # as an edge: broadcasts whose sockets may have missed pushes
        self._owed: set[str] = set()  # as an origin: nodes to tell "stale" (a push to them was lost)
        self._syncing: dict[str, asyncio.Task] = {}  # a sync in flight per broadcast, until its reply is dispatched
        self._tasks: list[asyncio.Task] = []
        self._work: set[asyncio.Task] = set()
        self.closed = False

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._listen(), name="relay-audience-listen"),
                       loop.create_task(self._send_outbox(), name="relay-audience-outbox"),
                       loop.create_task(self._sweep_forever(), name="relay-audience-sweep")]

    async def close(self) -> None:
        """Every relayed socket told to close, the tasks ended; safe to call twice."""
        if self.closed:
            return
        self.closed = True
        for participant in list(self._sockets.values()):
            participant.channel.close()
        if self._tasks:  # what the closing broadcasts told other nodes (their sockets' closes) goes out first
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._outbox.join(), CLOSE_FLUSH_SECONDS)
        for future in self._pending.values():  # a sync or join waiting on a reply ends now, not in REPLY_SECONDS
            future.cancel()
        for task in (*self._tasks, *self._work):
            task.cancel()
        await asyncio.gather(*self._tasks, *self._work, return_exceptions=True)

    # -- as an edge: the sockets held here -------------------------------------------------------

    async def join(self, broadcast_id: str, token: str | None, *, resume: str | None, invite: str | None,
                   address: str) -> RelayedParticipant:
        """A socket opening here for another node's broadcast: the origin's identity for it, before the
        upgrade (so its caps answer in HTTP, as on one node)."""
        if self.closed:
            raise not_found("broadcast", broadcast_id)
        origin = await self._cluster.origin_of(broadcast_id)
        if origin is None:
            raise not_found("broadcast", broadcast_id)
        check_spectator(token, origin.spectator_token)
        orchestration = self._settings.orchestration
        chat = self._settings.chat
        channel = EventChannel(address=address, limiter=TokenBucket(
            self._clock, orchestration.participant_messages_per_second, orchestration.participant_messages_burst),
            chat_limiter=TokenBucket(self._clock, chat.messages_per_second, chat.burst))
        participant = RelayedParticipant(self, broadcast_id, origin.node_id, uuid.uuid4().hex, channel)
        # Registered before the request: the origin's pushes may come before its reply.
        self._sockets[participant.socket_id] = participant
        self._by_broadcast.setdefault(broadcast_id, {})[participant.socket_id] = participant
        try:
            reply = await self.request(origin.node_id, {
                "op": "join", "broadcast_id": broadcast_id, "socket": participant.socket_id, "address": address,
                "resume": _token(resume), "invite": _token(invite)})
        except BaseException:  # refused, timed out, cancelled: a leave, in case the origin admitted it after all
            self.leave(participant)
            raise
        hello = reply["reply"]
        self._learn_rate(broadcast_id, hello["orchestration"])
        channel.participant_id, channel.resumed = hello["participant_id"], hello["resumed"]
        participant.hello = hello
        return participant

    def take_token(self, broadcast_id: str, channel: EventChannel, *, chat: bool = False) -> float:
        if chat:
            return take_token(channel, channel.chat_limiter, self._settings.limits.events_flood_messages)
        orchestration = self._settings.orchestration
        rate, burst = self._rates.get(broadcast_id, (orchestration.participant_messages_per_second,
                                                     orchestration.participant_messages_burst))
        return take_token(channel, channel.limiter, self._settings.limits.events_flood_messages, rate, burst)

    def _learn_rate(self, broadcast_id: str, state: Any) -> None:
        settings = state.get("settings") if isinstance(state, dict) else None
        if isinstance(settings, dict) and "participant_messages_per_second" in settings:
            self._rates[broadcast_id] = (settings["participant_messages_per_second"],
                                         settings["participant_messages_burst"])

    def leave(self, participant: RelayedParticipant) -> None:
        if self._forget(participant):
            self._post(participant.origin, {"op": "leave", "broadcast_id": participant.broadcast_id,
                                            "socket": participant.socket_id}, keep=True)

    def _forget(self, participant: RelayedParticipant) -> bool:
        if self._sockets.pop(participant.socket_id, None) is None:
            return False
        self._misses.pop(participant.socket_id, None)
        sockets = self._by_broadcast.get(participant.broadcast_id, {})
        sockets.pop(participant.socket_id, None)
        if not sockets:
            self._by_broadcast.pop(participant.broadcast_id, None)
            self._rates.pop(participant.broadcast_id, None)
        return True

    async def request(self, node_id: str, body: dict[str, Any],
                      on_reply: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """The origin's reply to a request, or 503 at once: CLUSTER_UNAVAILABLE (Redis away, or we cannot
        hear replies yet), NODE_UNAVAILABLE (nobody listens at the origin, or it does not answer).
        `on_reply` is called with the reply as it is dispatched, before any later message from the origin."""
        if not self.listening:
            raise cluster_unavailable(self._cluster.settings.heartbeat_seconds)
        request_id = next(self._ids)
        payload = self._encode({**body, "id": request_id})
        if len(payload) > MESSAGE_MAX_BYTES:  # the socket's own bound keeps it far below; never cross Redis big
            raise RelayError("PAYLOAD_TOO_LARGE", 413, "The message is too large.", action="Send less.")
        future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        if on_reply is not None:
            self._on_reply[request_id] = on_reply
        try:
            async with self._cluster.guarded():
                receivers = await self._cluster.redis.publish(inbox(node_id), payload)
            if not receivers:
                raise node_unavailable(node_id)
            reply = await asyncio.wait_for(future, REPLY_SECONDS)
        except asyncio.TimeoutError:
            raise node_unavailable(node_id) from None
        finally:
            self._pending.pop(request_id, None)
            self._on_reply.pop(request_id, None)
        if "error" in reply:
            error = reply["error"]
            raise RelayError(error["code"], error["status"], error["message"], action=error.get("action", ""),
                             details=error.get("details") or {}, retry_after=error.get("retry_after"))
        return reply

    def _edge_dispatch(self, message: dict[str, Any]) -> None:
        op = message.get("op")
        if op == "reply":
            future = self._pending.get(message.get("id"))
            if future is not None and not future.done():
                on_reply = self._on_reply.pop(message["id"], None)
                if on_reply is not None:
                    on_reply(message)
                future.set_result(message)
        elif op == "push":
            event, broadcast_id = message.get("event"), message.get("broadcast_id")
            sockets = self._by_broadcast.get(broadcast_id, {})
            if sockets and isinstance(event, str) and event.startswith(ORCHESTRATION_EVENT):
                self._learn_rate(broadcast_id, json.loads(event))  # the host may have changed the rate
            for participant in sockets.values():
                participant.channel.push(event)
        elif op == "stale":
            # Every broadcast of that origin held here, but one whose sync is in flight: the origin sent
            # "stale" before it read our request, so its reply (which comes after, in order) is fresh enough.
            origin = message.get("from")
            for broadcast_id, sockets in self._by_broadcast.items():
                if broadcast_id not in self._syncing and any(p.origin == origin for p in sockets.values()):
                    self._stale.add(broadcast_id)
            self._sync_stale()
        elif op == "close":
            participant = self._sockets.get(message.get("socket"))
            if participant is not None:
                self._forget(participant)  # the origin has let it go: no leave to send
                participant.channel.close(replaced=bool(message.get("replaced")))

    def _sync_stale(self) -> None:
        """A sync for each stale broadcast not already asked for."""
        for broadcast_id in self._stale - self._syncing.keys():
            self._stale.discard(broadcast_id)
            task = asyncio.get_running_loop().create_task(self._sync(broadcast_id), name="relay-audience-sync")
            self._syncing[broadcast_id] = task
            self._work.add(task)
            task.add_done_callback(self._work.discard)

    async def _sync(self, broadcast_id: str) -> None:
        """The origin's snapshot of the broadcast, to each socket here as a fresh hello (applied as the reply
        is dispatched: a push the origin sent after it is dispatched after it, never overtaken)."""
        try:
            sockets = self._by_broadcast.get(broadcast_id)
            if not sockets:
                return
            origin = next(iter(sockets.values())).origin
            try:
                await self.request(origin, {"op": "sync", "broadcast_id": broadcast_id},
                                   on_reply=lambda reply: self._caught_up(broadcast_id, reply))
            except RelayError as err:
                # 404: the broadcast ended (its sockets are closed by the origin or the sweep); STATE_TOO_LARGE:
                # asking again would not make it fit, the next push brings what changes
                if err.code == "STATE_TOO_LARGE":
                    log.warning("audience link: %s's state is too large to catch up here; its sockets keep "
                                "what they were last sent", broadcast_id)
                elif err.status != 404:
                    self._stale.add(broadcast_id)  # the origin is not listening yet: the next sweep asks again
        finally:  # unless its reply came and another sync of the broadcast has started since
            if self._syncing.get(broadcast_id) is asyncio.current_task():
                del self._syncing[broadcast_id]

    def _caught_up(self, broadcast_id: str, reply: dict[str, Any]) -> None:
        """A sync's reply: each socket's hello is its own fields and the snapshot, serialized once for all."""
        self._syncing.pop(broadcast_id, None)  # a "stale" dispatched after this reply asks again
        snapshot = reply.get("reply")
        if not isinstance(snapshot, dict) or not snapshot:
            return
        self._learn_rate(broadcast_id, snapshot.get("orchestration"))
        shared = ", " + json.dumps(snapshot)[1:]  # 10k sockets: one serialization of the history, not 10k
        for participant in list(self._by_broadcast.get(broadcast_id, {}).values()):
            if participant.hello is not None:
                own = {"type": "hello", **{key: participant.hello.get(key) for key in PERSONAL}, "resumed": True}
                participant.hello = {**own, **snapshot}
                participant.channel.push(json.dumps(own)[:-1] + shared)

    def _returned(self) -> None:
        """Redis is back after a loss: as an edge, every broadcast held here is stale; as an origin, the
        nodes holding our participants are told so (their own subscriptions may never have broken)."""
        self._stale.update(self._by_broadcast)
        self._owed.update(node for nodes in self._nodes_of.values() for node in nodes)
        self._tell_stale()
        self._sync_stale()

    def _tell_stale(self) -> None:
        """One ``stale`` to each node owed one (its edge syncs every broadcast of ours it holds), kept owed
        while the outbox is full or its publish fails."""
        for node in list(self._owed):
            if self._post(node, {"op": "stale"}, stale_if_lost=True):
                self._owed.discard(node)

    # -- as an origin: other nodes' participants of our broadcasts --------------------------------

    def _origin_dispatch(self, message: dict[str, Any]) -> None:
        op, node, socket_id = message.get("op"), message.get("from"), message.get("socket")
        if op == "sync" and isinstance(node, str):
            broadcast = self._sessions.broadcasts.get(message.get("broadcast_id"))
            if broadcast is None:
                self._reply(node, message, None, not_found("broadcast", str(message.get("broadcast_id"))[:128]))
            else:
                try:
                    self._reply(node, message, within_bound(broadcast.snapshot()))
                except RelayError as err:
                    self._reply(node, message, None, err)
            return
        if not isinstance(node, str) or not isinstance(socket_id, str):
            return
        if op == "leave":
            remote = self._remote.pop(socket_id, None)
            self._misses.pop(socket_id, None)
            if remote is not None:
                self._drop(remote)
                remote.audience.close_channel(remote.channel)
            return
        try:
            if op == "join":
                self._reply(node, message, self._join(node, socket_id, message))
            elif op == "message":
                task = asyncio.get_running_loop().create_task(self._message(node, socket_id, message),
                                                              name="relay-audience-message")
                self._work.add(task)
                task.add_done_callback(self._work.discard)
        except RelayError as err:
            self._reply(node, message, None, err)

    def _join(self, node: str, socket_id: str, message: dict[str, Any]) -> dict[str, Any]:
        broadcast = self._sessions.broadcasts.get(message.get("broadcast_id"))
        if broadcast is None:
            raise not_found("broadcast", str(message.get("broadcast_id")))
        audience = broadcast.audience
        channel = audience.open_channel(_token(message.get("resume")), address=str(message.get("address"))[:64],
                                        invite=_token(message.get("invite")))
        channel.limiter = None  # its node took the token before the message crossed Redis
        remote = _Remote(node, broadcast.broadcast_id, audience, channel)
        channel.relayed_close = lambda replaced: self._closed(socket_id, remote, replaced)
        self._remote[socket_id] = remote
        self._nodes_of.setdefault(broadcast.broadcast_id, Counter())[node] += 1
        if audience.published is None:
            broadcast_id = broadcast.broadcast_id
            audience.published = lambda text: self._push(broadcast_id, text)
        return within_bound(broadcast.hello(channel.participant_id, channel.resumed))

    async def _message(self, node: str, socket_id: str, message: dict[str, Any]) -> None:
        remote = self._remote.get(socket_id)
        if remote is None:  # its close (replaced, swept) was lost with Redis: its node closes the socket now
            self._post(node, {"op": "close", "socket": socket_id, "replaced": False})
        try:
            if remote is None or not isinstance(message.get("message"), dict):
                raise not_found("participant", socket_id)
            reply = await remote.audience.participant_message(remote.channel, message["message"])
        except RelayError as err:
            self._reply(node, message, None, err)
        else:
            self._reply(node, message, reply)

    def _closed(self, socket_id: str, remote: _Remote, replaced: bool) -> None:
        """The origin's Audience closed a relayed participant (replaced by a newer socket, or the broadcast
        ends): its node closes the socket; here it gives back its place once the Audience is done."""
        if self._remote.get(socket_id) is remote:
            del self._remote[socket_id]
            self._misses.pop(socket_id, None)
            self._drop(remote)
            self._post(remote.node, {"op": "close", "socket": socket_id, "replaced": replaced})
            asyncio.get_running_loop().call_soon(remote.audience.close_channel, remote.channel)

    def _drop(self, remote: _Remote) -> None:
        """A relayed participant gone from the origin: its node counted once less for the broadcast's pushes."""
        nodes = self._nodes_of.get(remote.broadcast_id)
        if nodes is None:
            return
        nodes[remote.node] -= 1
        if nodes[remote.node] <= 0:
            del nodes[remote.node]
        if not nodes:
            del self._nodes_of[remote.broadcast_id]
            remote.audience.published = None

    def _push(self, broadcast_id: str, text: str) -> None:
        """One event for every participant: once to each node holding some of them (an orchestration state
        cut to fit, as a hello is: the node would drop a larger one). One that still cannot fit is not sent
        and that node is owed a ``stale``: its sockets catch up from a snapshot, smaller (not escaped twice)."""
        nodes = self._nodes_of.get(broadcast_id)
        if not nodes:
            return
        if len(json.dumps(text)) > MESSAGE_MAX_BYTES - ENVELOPE_BYTES and text.startswith(ORCHESTRATION_EVENT):
            with contextlib.suppress(RelayError):  # nothing left to cut: too large for _post, a stale owed
                text = json.dumps(orchestration_within_bound(json.loads(text)))
        for node in nodes:
            self._post(node, {"op": "push", "broadcast_id": broadcast_id, "event": text}, stale_if_lost=True)

    def _reply(self, node: str, request: dict[str, Any], reply: dict[str, Any] | None,
               error: RelayError | None = None) -> None:
        body: dict[str, Any] = {"op": "reply", "id": request.get("id")}
        if error is None:
            body["reply"] = reply
            payload = self._encode(body)
            if len(payload) <= MESSAGE_MAX_BYTES:
                self._enqueue(node, payload)
                return
            del body["reply"]
            error = state_too_large()  # within_bound leaves room for the envelope: this is a safety net
        body["error"] = {"code": error.code, "status": error.status, "message": error.message,
                         "action": error.action, "details": error.details, "retry_after": error.retry_after}
        self._enqueue(node, self._encode(body))

    # -- nodes that left ---------------------------------------------------------------------------

    def sweep(self) -> None:
        """What a node that left the cluster (killed, cut off) can no longer end itself: as an origin, the
        participants whose sockets were there give back their places; as an edge, the sockets here of a
        broadcast whose origin is gone are closed (a page opens a new one where the broadcast lives)."""
        if not self._cluster.reachable:
            return  # Redis away: nobody is seen, and nobody is presumed gone
        alive = {node.node_id for node in self._cluster.nodes_seen}
        self._resend(alive)
        self._tell_stale()
        if self.listening:
            self._sync_stale()
        for socket_id, remote in list(self._remote.items()):
            if self._gone(socket_id, remote.node, alive):
                del self._remote[socket_id]
                self._drop(remote)
                remote.audience.close_channel(remote.channel)
        for participant in list(self._sockets.values()):
            if participant.hello is not None and self._gone(participant.socket_id, participant.origin, alive):
                self._forget(participant)
                # The broadcast's last word, as a host's end gives one: its origin is gone, and the broadcast with it.
                participant.channel.push(ORIGIN_LOST)
                participant.channel.close()

    def _gone(self, socket_id: str, node: str, alive: set[str]) -> bool:
        """Absent from two sweeps in a row: a node that joined since our last look at the members is not gone."""
        if node in alive:
            self._misses.pop(socket_id, None)
            return False
        self._misses[socket_id] += 1
        if self._misses[socket_id] < 2:
            return False
        del self._misses[socket_id]
        return True

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self._cluster.settings.heartbeat_seconds)
            self.sweep()

    # -- Redis ------------------------------------------------------------------------------------

    def _post(self, node: str, body: dict[str, Any], *, keep: bool = False, stale_if_lost: bool = False) -> bool:
        """In order, from one task: a reply never overtakes the push before it. `keep`: sent again after
        Redis returns if it cannot be sent now (a leave: else the origin would hold the place for good).
        `stale_if_lost`: if it is dropped (outbox full, publish failed), that node is told ``stale`` at a
        later sweep (a push: its sockets missed an event), as it is if it is too large to send (the receiver
        drops a message over MESSAGE_MAX_BYTES). False when it was not sent."""
        return self._enqueue(node, self._encode(body), keep=keep, stale_if_lost=stale_if_lost)

    def _encode(self, body: dict[str, Any]) -> str:
        """The message as it crosses Redis (ASCII: its length is its size in bytes)."""
        return json.dumps({**body, "from": self.node_id})

    def _enqueue(self, node: str, payload: str, *, keep: bool = False, stale_if_lost: bool = False) -> bool:
        if len(payload) > MESSAGE_MAX_BYTES:
            log.warning("audience link: a %d-byte %s to %s is over the bound; not sent", len(payload),
                        payload[:20], node)
            if stale_if_lost:
                self._owed.add(node)
            return False
        try:
            self._outbox.put_nowait((inbox(node), payload, keep, node if stale_if_lost else None))
        except asyncio.QueueFull:
            log.warning("audience link: outbox full (Redis away?); a message to %s dropped", node)
            if stale_if_lost:
                self._owed.add(node)
            return False
        return True

    async def _send_outbox(self) -> None:
        while True:
            channel, payload, keep, owed = await self._outbox.get()
            try:
                await self._publish(channel, payload, keep, owed)
            finally:
                self._outbox.task_done()

    async def _publish(self, channel: str, payload: str, keep: bool, owed: str | None) -> None:
        for _ in range(2):  # after a Redis restart the pool's first connection is a dead one
            try:
                if await self._cluster.redis.publish(channel, payload) or not keep:
                    return
                exc: Exception = RedisError("nobody listens there yet")  # Redis is back, that node not yet
            except (RedisError, OSError) as error:
                exc = error
        if keep and len(self._unsent) < OUTBOX_MAX:
            self._unsent.append((channel, payload, 0))
        else:
            log.warning("audience link: publish failed (%s); dropped", exc)
            if owed is not None:
                self._owed.add(owed)

    def _resend(self, alive: set[str]) -> None:
        """The kept messages again; one for a node absent from three sweeps in a row (gone) is dropped."""
        unsent, self._unsent = self._unsent, []
        inboxes = {inbox(node) for node in alive}
        for channel, payload, misses in unsent:
            if channel not in inboxes:
                if misses < 2:
                    self._unsent.append((channel, payload, misses + 1))
                continue
            try:
                self._outbox.put_nowait((channel, payload, True, None))
            except asyncio.QueueFull:
                self._unsent.append((channel, payload, misses))

    async def _listen(self) -> None:
        """Our inbox, subscribed again after Redis comes back."""
        while True:
            pubsub = self._cluster.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(inbox(self.node_id))
                self.listening = True
                if self._subscribed:
                    self._returned()
                self._subscribed = True
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None:
                        self._dispatch(message["data"])
            except (RedisError, OSError) as exc:
                if self.listening:
                    log.warning("audience link: Redis lost (%s); listening again when it returns", exc)
            finally:
                self.listening = False
                await asyncio.shield(pubsub.aclose())
            await asyncio.sleep(self._cluster.settings.heartbeat_seconds)

    def _dispatch(self, data: bytes | str) -> None:
        if len(data) > MESSAGE_MAX_BYTES:
            log.warning("audience link: a %d-byte message ignored", len(data))
            return
        try:
            message = json.loads(data)
        except ValueError:
            return
        if not isinstance(message, dict):
            return
        if message.get("op") in ("join", "message", "leave", "sync"):
            self._origin_dispatch(message)
        else:
            self._edge_dispatch(message)


def within_bound(state: dict[str, Any]) -> dict[str, Any]:
    """A hello or snapshot that crosses Redis within MESSAGE_MAX_BYTES (the receiver drops a larger one):
    the chat history's oldest messages are left out as needed (500 long messages could reach megabytes),
    then the orchestration's queue and candidates from their tails (50 queued prompts of 200 emoji are
    ~150 KB as JSON); queue_length and hands_count still count everyone. STATE_TOO_LARGE if even that
    cannot fit (the receiver would drop it: an error it can read instead)."""
    budget = MESSAGE_MAX_BYTES - ENVELOPE_BYTES
    size = len(json.dumps(state))
    if size <= budget:
        return state
    state = dict(state)
    chat = state.get("chat")
    if isinstance(chat, dict) and isinstance(chat.get("history"), list):
        history, size = _cut(chat["history"], size, budget, oldest=True)
        state["chat"] = {**chat, "history": history}
    if size > budget and isinstance(state.get("orchestration"), dict):
        state["orchestration"], size = _orchestration_within(state["orchestration"], size, budget)
    if size > budget:
        raise state_too_large()
    return state


def orchestration_within_bound(event: dict[str, Any]) -> dict[str, Any]:
    """An ``orchestration`` push (the state at its top level) within the bound, cut as within_bound cuts.
    Measured as it crosses: a push carries its event as a JSON string, so each quote and backslash of the
    event's JSON (two in each emoji's \\uXXXX pair) is escaped once more."""
    budget = MESSAGE_MAX_BYTES - ENVELOPE_BYTES
    event, size = _orchestration_within(event, len(json.dumps(json.dumps(event))), budget, _quoted_cost)
    if size > budget:
        raise state_too_large()
    return event


def _object_cost(item: Any) -> int:
    return len(json.dumps(item)) + 2  # the item and its ", " separator


def _quoted_cost(item: Any) -> int:
    """An item's share of its list's JSON once that JSON is a string: escaping is per character, so the
    item's quoted JSON less its two quotes, and the ", " (nothing to escape)."""
    return len(json.dumps(json.dumps(item)))


def _orchestration_within(orchestration: dict[str, Any], size: int, budget: int,
                          cost: Callable[[Any], int] = _object_cost) -> tuple[dict[str, Any], int]:
    orchestration = dict(orchestration)
    for key in ("queue", "candidates"):  # the head of the queue is whose prompt runs next: the tail goes first
        if size > budget and isinstance(orchestration.get(key), list):
            orchestration[key], size = _cut(orchestration[key], size, budget, oldest=False, cost=cost)
    return orchestration, size


def _cut(items: list[Any], size: int, budget: int, *, oldest: bool,
         cost: Callable[[Any], int] = _object_cost) -> tuple[list[Any], int]:
    """Items left out (the first ones if `oldest`, else the last) until `size` is within `budget`."""
    kept = list(items) if oldest else list(reversed(items))
    start = 0
    while start < len(kept) and size > budget:
        size -= cost(kept[start])
        start += 1
    kept = kept[start:]
    return (kept if oldest else kept[::-1]), size


def state_too_large() -> RelayError:
    return RelayError("STATE_TOO_LARGE", 503, "The broadcast's state is too large to send to this node.",
                      action="Retry later, or join at the broadcast's origin node.",
                      retry_after=10)  # as every 503: a queue that drains makes it fit again


def _token(value: Any) -> str | None:
    return value if isinstance(value, str) and len(value) <= TOKEN_MAX_CHARS else None
