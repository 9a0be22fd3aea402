"""A host's connection and its streams: the records and their state machines.

    Connection:  connected --start--> starting --(upstream ready)--> streaming --end--> ending --> connected
                            starting --(upstream refused)--> connected
                 any state --close--> closed        (a start or end under way then finishes into closed)
    Stream:      live --end(reason)--> ended     (reason: ended | duration_limit | upstream_error | disconnected)

The API's ``status`` is the connection's state seen from outside: ``streaming``, ``closed``, or
``connected`` (which includes starting and ending: the host's stream is not live in either).
SessionManager (sessions.py) alone moves a connection from state to state.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from dataclasses import dataclass, field
from typing import Any

from .broadcast import Broadcast
from .clock import iso
from .errors import RelayError
from .ratelimit import TokenBucket
from .worldmodel.base import Streamer

# Under relay.sessions, beside SessionManager's own lines: one logger tells a connection's whole story.
log = logging.getLogger("relay.sessions")


class ConnectionState(enum.Enum):
    CONNECTED = "connected"
    STARTING = "starting"  # the upstream is starting a stream: no second start; counts toward the key's limit
    STREAMING = "streaming"
    ENDING = "ending"  # until the upstream has really stopped, no new start (409)
    CLOSED = "closed"

    @property
    def status(self) -> str:
        """The API's value (docs/api.md): starting and ending are ``connected`` from outside."""
        return self.value if self in (ConnectionState.STREAMING, ConnectionState.CLOSED) else "connected"


@dataclass(eq=False)
class Stream:
    stream_id: str
    connection: "Connection"
    prompt: str
    portrait: bool
    width: int
    height: int
    started_at: float  # wall clock
    deadline: float  # monotonic
    max_duration_seconds: float
    status: str = "live"
    ended_at: float | None = None
    end_reason: str | None = None
    last_applied_prompt: str | None = None
    peak_spectators: int = 0

    @property
    def live(self) -> bool:
        return self.status == "live"

    def to_dict(self) -> dict[str, Any]:
        broadcast = self.connection.broadcast
        return {
            "stream_id": self.stream_id,
            "connection_id": self.connection.connection_id,
            "status": self.status,
            "started_at": iso(self.started_at),
            "ended_at": iso(self.ended_at),
            "end_reason": self.end_reason,
            "spectators": broadcast.viewers if self.live else self.peak_spectators,
            "last_applied_prompt": self.last_applied_prompt,
            "width": self.width,
            "height": self.height,
            "max_duration_seconds": self.max_duration_seconds,
        }


@dataclass(eq=False)
class Connection:
    connection_id: str
    api_key: str
    streamer: Streamer
    broadcast: Broadcast
    client_token: str  # the newest; client_tokens holds every one still valid
    created_at: float  # wall clock
    opened: float  # monotonic
    deadline: float  # monotonic: connection_max_seconds
    client_token_deadline: float  # monotonic, of the newest
    last_seen: float  # monotonic
    stream: Stream | None = None
    streams_started: int = 0
    control_sockets: int = 0
    close_reason: str | None = None
    # token -> monotonic deadline. A host page asks for a fresh token over its control socket
    # while the old one still works, so an hour-long connection never locks its host out.
    client_tokens: dict[str, float] = field(default_factory=dict)
    # The host's prompts, however they arrive (REST, control socket, /odyssey): one bucket per connection.
    interacts: TokenBucket | None = None
    _listeners: set[asyncio.Queue] = field(default_factory=set)
    _state: ConnectionState = ConnectionState.CONNECTED
    _closed: asyncio.Task | None = None  # the close work, which every caller of close_connection awaits

    @property
    def state(self) -> ConnectionState:
        return self._state

    def set_state(self, state: ConnectionState) -> None:
        """The one way the state changes (SessionManager's alone), each change logged as aiortc's transports do."""
        if state is not self._state:
            log.debug("connection %s -> %s", self._state.value, state.value,
                      extra={"connection_id": self.connection_id})
            self._state = state

    @property
    def status(self) -> str:
        return self._state.status

    @property
    def closed(self) -> bool:
        return self._state is ConnectionState.CLOSED

    @property
    def live_stream(self) -> Stream:
        """The stream, if one is live: what a host command acts on; 409 NO_ACTIVE_STREAM otherwise."""
        if self.stream is None or not self.stream.live:
            raise no_active_stream(None)
        return self.stream

    def listen(self) -> asyncio.Queue:
        """An outbox for one control socket: every event for the host lands here."""
        queue: asyncio.Queue = asyncio.Queue(256)
        self._listeners.add(queue)
        return queue

    def unlisten(self, queue: asyncio.Queue) -> None:
        self._listeners.discard(queue)

    def publish(self, event: dict[str, Any]) -> None:
        for queue in self._listeners:
            if queue.full():
                continue  # a host that stopped reading loses events, not the relay's memory
            queue.put_nowait(event)

    def to_dict(self, wall_now: float, mono_now: float) -> dict[str, Any]:
        return {
            "connection_id": self.connection_id,
            "status": self.status,
            "created_at": iso(self.created_at),
            "expires_at": iso(wall_now + max(0.0, self.deadline - mono_now)),
            "stream": self.stream.to_dict() if self.stream and self.stream.live else None,
            "streams_started": self.streams_started,
            "channel_id": self.broadcast.channel.channel_id if self.broadcast.channel else None,
        }


def no_active_stream(stream: Stream | None) -> RelayError:
    """409 NO_ACTIVE_STREAM, the refusal of every command that needs a live stream: for the stream a
    call names (it has ended: which one, and why) or for the connection's (none is live)."""
    if stream is None:
        return RelayError("NO_ACTIVE_STREAM", 409, "No stream is live.", action="Start a stream first.")
    return RelayError(
        "NO_ACTIVE_STREAM", 409, "The stream has ended.", action="Start a new stream.",
        details={"stream_id": stream.stream_id, "end_reason": stream.end_reason},
    )
