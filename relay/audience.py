"""A broadcast's audience: participants' event channels and what they may do through them.

A participant is an identity, not a socket: hello hands out a resume token (the id, signed with this
broadcast's secret), and a socket that presents it takes the identity back after a dropped network
or a reload, with its block and cooldown. One socket per identity: a newer one replaces the older,
which is closed as "replaced". An invite is an identity the host minted, signed apart from resume
tokens (so a resume token is no invite).

The audience holds the orchestrator: participants' messages go through it (each taking a rate token
first), accepted inputs are forwarded to the live stream, and its state reaches everyone in coalesced
pushes. Chat and reactions (orchestration/chat.py) take tokens of their own, so talking never costs a
participant their say in the stream; what they say is fanned out here and kept in the recording. The host's orchestration actions are methods here that push the new state themselves.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import secrets
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from .clock import Clock
from .config import Settings
from .errors import RelayError, invalid_request, not_found
from .orchestration import Forward, Orchestrator
from .orchestration.chat import Chat
from .ratelimit import TokenBucket, rate_limited

log = logging.getLogger(__name__)

EVENT_QUEUE_MAX = 256
STATE_PUSH_INTERVAL = 0.25  # orchestration state reaches participants a few times a second at most


@dataclass(eq=False)
class EventChannel:
    """One participant's socket outbox: bounded, so a stalled reader cannot grow memory."""

    participant_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    name: str | None = None
    resumed: bool = False  # the socket presented a valid resume token and took its identity back
    queue: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(EVENT_QUEUE_MAX))
    overflowed: bool = False
    replaced: bool = False  # a newer socket resumed this participant: this one is closed
    address: str = ""  # the client address the socket came from (request.remote)
    invited: bool = False  # the socket presented a valid invite
    limiter: TokenBucket | None = None  # every message but chat and reactions takes a token
    chat_limiter: TokenBucket | None = None  # chat messages and reactions take one of these instead
    refused: int = 0  # messages refused for rate in a row
    flooded: bool = False  # refused so often in a row that the socket is to be closed (FLOODING_CLOSE_CODE)
    admitted: bool = True  # counted against its address until close_channel
    # Set when the socket is at another node of a cluster (relay/cluster/audience_link.py): its pushes
    # travel once per broadcast in Audience.published, and a close is told to that node.
    relayed_close: Callable[[bool], None] | None = None

    def push(self, event: str) -> None:
        if self.relayed_close is not None:
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.overflowed = True  # the reader is too slow: its socket is closed, not waited on

    def close(self, *, replaced: bool = False) -> None:
        self.replaced = replaced
        if self.relayed_close is not None:
            self.relayed_close(replaced)
            return
        try:
            self.queue.put_nowait(None)  # tells the socket's sender to finish
        except asyncio.QueueFull:
            self.overflowed = True


# The reply type each participant message is answered with (anything else: an error event).
REPLY_TYPES = {"input": "input_result", "vote": "vote_result", "raise_hand": "turn_result",
               "release_turn": "turn_result", "chat": "chat_result", "reaction": "reaction_result"}
CHAT_TYPES = frozenset({"chat", "reaction"})
# What the stream's recording keeps of the chat (the replay page's timeline shows it).
RECORDED_CHAT = frozenset({"chat", "chat_cleared", "chat_state", "reactions"})


def rate_limited_reply(kind: Any, wait: float) -> dict[str, Any]:
    """The answer to a message refused for rate: the reply its type expects, refused RATE_LIMITED."""
    retry_after = math.ceil(wait * 10) / 10  # never 0: the client must wait some
    reply_type = REPLY_TYPES.get(kind) if isinstance(kind, str) else None
    if reply_type is None:
        return {"type": "error", "code": "RATE_LIMITED", "fatal": False, "retry_after": retry_after,
                "message": rate_limited(wait, "Too many messages").message}
    return {"type": reply_type, "status": "rejected", "reason": "rate_limited", "code": "RATE_LIMITED",
            "retry_after": retry_after}


def take_token(channel: EventChannel, limiter: TokenBucket | None, flood_messages: int,
               rate: float | None = None, burst: int | None = None) -> float:
    """A message's token from one of its socket's buckets (see Audience.take_token), at ``rate`` and
    ``burst`` when given (the host may have changed them since the socket opened); also where a cluster
    node holding the socket of another node's broadcast limits it, before anything crosses Redis."""
    if limiter is None:
        return 0.0
    if rate is not None:
        limiter.rate, limiter.burst = rate, burst
    wait = limiter.take()
    if not wait:
        channel.refused = 0
        return 0.0
    channel.refused += 1
    if channel.refused >= flood_messages:
        channel.flooded = True
    return wait


class Audience:
    def __init__(self, broadcast_id: str, settings: Settings, clock: Clock, *, live: Callable[[], bool]) -> None:
        self._broadcast_id = broadcast_id
        self._settings = settings
        self._clock = clock
        self._live = live  # whether a stream is live to take inputs
        self._channels: dict[str, EventChannel] = {}  # participant_id -> its one open socket
        self._address_sockets: Counter[str] = Counter()  # client address -> its open events sockets
        self._secret = secrets.token_bytes(16)  # signs resume tokens and invites
        self.closed = False
        self.orchestrator = Orchestrator(settings.orchestration, clock)
        self.chat = Chat(settings.chat, clock, self.orchestrator)
        # Joiners get the state in their hello; pushes carry changes only.
        self._state_sent = (self.orchestrator.version, self.orchestrator.host_version)
        self._state_pushed_at = -1e9
        # Set by the session that owns the broadcast: where accepted inputs go (the stream's
        # interact) and where host-only events go (the control socket).
        self.forward_input: Callable[[Forward], Awaitable[None]] | None = None
        self.host_event: Callable[[dict[str, Any]], None] | None = None
        # Set by the broadcast: into the live stream's recording (its events log), if any.
        self.record_event: Callable[[dict[str, Any]], None] | None = None
        # Set by a cluster node that holds participants' sockets for this broadcast elsewhere: each
        # event sent to everyone, once (as text), for the other nodes to fan out. None on one node.
        self.published: Callable[[str], None] | None = None

    # -- identities ----------------------------------------------------------------------

    def resume_token(self, participant_id: str) -> str:
        mac = hmac.new(self._secret, participant_id.encode(), hashlib.sha256).hexdigest()[:32]
        return f"{participant_id}.{mac}"

    def _resumed_id(self, token: str | None) -> str | None:
        if not token:
            return None
        participant_id = token.partition(".")[0]
        return participant_id if hmac.compare_digest(token.encode(), self.resume_token(participant_id).encode()) else None

    def invite_code(self, participant_id: str) -> str:
        mac = hmac.new(self._secret, b"invite:" + participant_id.encode(), hashlib.sha256)
        return f"{participant_id}.{mac.hexdigest()[:20]}"

    def mint_invites(self, count: int) -> list[tuple[str, str]]:
        """(participant_id, invite code) for `count` new identities: stateless, and presenting one
        again resumes the same identity."""
        return [(pid, self.invite_code(pid)) for pid in (EventChannel().participant_id for _ in range(count))]

    def _invited_id(self, code: str | None) -> str | None:
        if not code:
            return None
        participant_id = code.partition(".")[0]
        return participant_id if hmac.compare_digest(code.encode(), self.invite_code(participant_id).encode()) else None

    # -- channels ------------------------------------------------------------------------

    def open_channel(self, resume: str | None = None, *, address: str | None = None,
                     invite: str | None = None) -> EventChannel:
        """A participant's socket is opening; ``resume`` (a token from an earlier hello) or ``invite``
        (a host's invite code, which wins) gives its identity. An unknown or forged token is not an
        error: the socket gets a new identity and its hello says ``resumed: false`` (``invited: false``).

        Called before the WebSocket upgrade, so the caps answer in HTTP: 503 PARTICIPANT_LIMIT_REACHED
        past [limits] participants_per_broadcast (a socket resuming a connected identity replaces it
        and is not counted twice), 429 RATE_LIMITED past events_sockets_per_address."""
        if self.closed:  # the broadcast is ending: a socket admitted now would be told nothing, ever
            raise not_found("broadcast", self._broadcast_id)
        limits = self._settings.limits
        address = address or "unknown"
        invited_id = self._invited_id(invite)
        participant_id = invited_id or self._resumed_id(resume)
        if participant_id not in self._channels and len(self._channels) >= limits.participants_per_broadcast:
            raise RelayError("PARTICIPANT_LIMIT_REACHED", 503,
                             f"This broadcast already has its maximum of {limits.participants_per_broadcast} "
                             "participants.", action="Watch without the events socket, or retry later.",
                             details={"limit": limits.participants_per_broadcast}, retry_after=10)
        if self._address_sockets[address] >= limits.events_sockets_per_address:
            raise RelayError("RATE_LIMITED", 429,
                             f"Too many events sockets from this address (at most "
                             f"{limits.events_sockets_per_address} per broadcast).",
                             action="Close another socket of this broadcast first.",
                             details={"limit": limits.events_sockets_per_address}, retry_after=10)
        settings = self.orchestrator.settings
        channel = EventChannel(address=address, invited=invited_id is not None,
                               limiter=TokenBucket(self._clock, settings.participant_messages_per_second,
                                                   settings.participant_messages_burst),
                               chat_limiter=TokenBucket(self._clock, self.chat.settings.messages_per_second,
                                                        self.chat.settings.burst))
        if participant_id:
            channel.participant_id, channel.resumed = participant_id, True
        self._address_sockets[address] += 1
        previous = self._channels.pop(channel.participant_id, None)
        if previous is not None:
            previous.close(replaced=True)
        self._channels[channel.participant_id] = channel
        self.orchestrator.admit(channel.participant_id, address=address, invited=channel.invited)
        return channel

    def close_channel(self, channel: EventChannel) -> None:
        if channel.admitted:  # once per socket, replaced ones too: each held a place for its address
            channel.admitted = False
            self._address_sockets[channel.address] -= 1
            if not self._address_sockets[channel.address]:
                del self._address_sockets[channel.address]
        # A replaced socket no longer speaks for its participant: the newer one does.
        if self._channels.get(channel.participant_id) is channel:
            del self._channels[channel.participant_id]
            self.orchestrator.participant_left(channel.participant_id)

    @property
    def participants(self) -> int:
        """Participants with an open events socket."""
        return len(self._channels)

    def send(self, event: dict[str, Any]) -> None:
        """To every participant's socket (and, clustered, to the nodes holding the others)."""
        if self._channels:
            text = json.dumps(event)  # once, however many participants: the sockets send the same text
            for channel in self._channels.values():
                channel.push(text)
            if self.published is not None:
                self.published(text)

    # -- participants' messages ----------------------------------------------------------

    async def participant_message(self, channel: EventChannel, message: dict[str, Any]) -> dict[str, Any] | None:
        """A message from a participant; returns the direct reply, if any."""
        pid = channel.participant_id
        kind = message.get("type")
        orchestrator = self.orchestrator
        wait = self.take_token(channel, chat=isinstance(kind, str) and kind in CHAT_TYPES)
        if wait:
            return rate_limited_reply(kind, wait)
        if kind == "chat":
            reply, event = self.chat.say(pid, message.get("text"), address=channel.address,
                                         addresses=len(self._address_sockets))
            if event is not None:
                self._chat_event(event)
            return reply
        if kind == "reaction":
            return self.chat.react(pid, message.get("emoji"))
        if kind == "hello":
            name = message.get("name")
            orchestrator.participant_joined(pid, name if isinstance(name, str) else None)
            return None
        if kind == "input":
            result = orchestrator.submit(pid, message.get("prompt"))
            if result.forward is not None:  # turns: the holder's input goes straight through
                await self._forward(result.forward)
            return result.as_event()
        if kind == "vote":
            return orchestrator.vote(pid, message.get("candidate_id")).as_event("vote_result")
        if kind == "raise_hand":
            return orchestrator.raise_hand(pid).as_event("turn_result")
        if kind == "release_turn":
            return orchestrator.release_turn(pid).as_event("turn_result")
        return {"type": "error", "code": "INVALID_REQUEST", "fatal": False,
                "message": f"Unknown message type {kind!r}."}

    def take_token(self, channel: EventChannel, *, chat: bool = False) -> float:
        """0 if this message may go on, else the seconds to wait. Refused messages cost a dict
        lookup and a small reply, nothing of the orchestrator's, so a flood slows no one else; a
        socket refused events_flood_messages times in a row (chat or not) is marked `flooded` for
        closing. ``chat``: a chat message or reaction, which takes a chat token instead."""
        if chat:
            return take_token(channel, channel.chat_limiter, self._settings.limits.events_flood_messages)
        settings = self.orchestrator.settings
        return take_token(channel, channel.limiter, self._settings.limits.events_flood_messages,
                          settings.participant_messages_per_second, settings.participant_messages_burst)

    async def _forward(self, forward: Forward) -> None:
        if self.forward_input is None or not self._live():
            log.info("audience input dropped: no live stream", extra={"broadcast_id": self._broadcast_id})
            return
        try:
            await self.forward_input(forward)
        except Exception:
            log.exception("forwarding an audience input failed", extra={"broadcast_id": self._broadcast_id})

    # -- the host's actions: each shows everyone the result now, not at the next tick ----

    def configure(self, body: dict[str, Any]) -> None:
        """The host's `{mode?, ...settings}` (REST body or control message), validated by the orchestrator."""
        settings = {k: v for k, v in body.items() if k != "type"}
        mode = settings.pop("mode", None)
        if mode is not None and not isinstance(mode, str):
            raise invalid_request("'mode' must be a string.", field="mode")
        self.orchestrator.configure(mode, **settings)
        self._push_state(at_once=True)

    def block(self, participant_id: str) -> None:
        self.orchestrator.block(participant_id)
        self._push_state(at_once=True)

    def unblock(self, participant_id: str) -> None:
        self.orchestrator.unblock(participant_id)
        self._push_state(at_once=True)

    def grant_turn(self, participant_id: str) -> None:
        self.orchestrator.grant_turn(participant_id)
        self._push_state(at_once=True)

    def revoke_turn(self) -> None:
        self.orchestrator.revoke_turn()
        self._push_state(at_once=True)

    def clear_chat(self, message_id: str) -> None:
        """The host removes a message: it leaves the history and every page (404 if not held)."""
        self._chat_event(self.chat.clear(message_id))

    def set_chat(self, enabled: bool) -> None:
        """The host turns chat (and reactions) off or on; participants are told at once."""
        event = self.chat.set_enabled(enabled)
        if event is not None:
            self._chat_event(event)

    def _chat_event(self, event: dict[str, Any]) -> None:
        """To every participant and the host, and into the recording."""
        self.send(event)
        if self.host_event is not None:
            self.host_event(event)
        if self.record_event is not None and event["type"] in RECORDED_CHAT:
            self.record_event(event)

    # -- housekeeping --------------------------------------------------------------------

    async def tick(self) -> None:
        """Forward what the policy lets through now; push the state if it changed."""
        if self._live():  # while nothing is live, inputs wait (a queue holds, a window's winner keeps)
            for forward in self.orchestrator.tick():
                await self._forward(forward)
        self._push_state()
        reactions = self.chat.flush()
        if reactions is not None:
            self._chat_event(reactions)

    def _push_state(self, *, at_once: bool = False) -> None:
        """Coalesced: at most one push per STATE_PUSH_INTERVAL, only when something changed."""
        versions = (self.orchestrator.version, self.orchestrator.host_version)
        now = self._clock.monotonic()
        if versions == self._state_sent or (now - self._state_pushed_at < STATE_PUSH_INTERVAL and not at_once):
            return
        public_changed = versions[0] != self._state_sent[0]
        self._state_sent, self._state_pushed_at = versions, now
        if public_changed:
            self.send({"type": "orchestration", **self.orchestrator.state()})
        if self.host_event is not None:
            self.host_event({"type": "orchestration", **self.orchestrator.state(host=True)})

    def close(self) -> None:
        self.closed = True
        for channel in list(self._channels.values()):
            channel.close()
        self._channels.clear()
