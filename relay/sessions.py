"""Connections and streams over time: the streamer pool, the limits and the deadlines.

SessionManager opens and closes connections, starts and ends their streams, moving each through its
state machine (connection.py, the records). A connection reserves a streamer from a fixed pool when
it opens and gives it back when it closes: on DELETE, after ``idle_timeout_seconds`` without a sign
of life from the host (no open control socket and no keepalive), or at ``connection_max_seconds``.
Every deadline is checked by :meth:`SessionManager.tick`, which the server calls a few times a
second and tests call after moving a fake clock, so no timer lives outside this module.

A connection opened on a channel (channels.py) streams into the channel's broadcast, which stays
when the connection closes: one connection per channel at a time (409 CHANNEL_IN_USE), and the
broadcast's spectators wait for the next.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import uuid
from collections import OrderedDict
from typing import Any

from . import metrics
from .broadcast import Broadcast, MediaFactory
from .channels import Channel, ChannelStore, channel_in_use
from .clock import SYSTEM_CLOCK, Clock
from .config import Settings
from .connection import Connection, ConnectionState, Stream, no_active_stream
from .errors import RelayError, not_found, unprocessable
from .inputs import check_text
from .media.graph import MediaGraph
from .ratelimit import TokenBucket, rate_limited
from .recordings import RecordingStore, owner_id
from .worldmodel.base import WorldModel

log = logging.getLogger(__name__)

MAX_PROMPT_CHARS = 2000
ENDED_STREAMS_KEPT = 1000  # GET /v1/streams/{id} keeps answering for recent streams


class SessionManager:
    def __init__(
        self,
        settings: Settings,
        world_model: WorldModel,
        *,
        clock: Clock = SYSTEM_CLOCK,
        recordings: RecordingStore | None = None,
        media: MediaFactory = MediaGraph,  # each broadcast's media graph (a test's may have no threads)
        channels: ChannelStore | None = None,
    ) -> None:
        self.channels = channels
        self._settings = settings
        self._media = media
        self._limits = settings.limits
        self._world_model = world_model
        self.recordings = recordings
        self.clock = clock
        self.connections: dict[str, Connection] = {}
        self.broadcasts: dict[str, Broadcast] = {}
        self._by_client_token: dict[str, Connection] = {}
        self._streams: OrderedDict[str, Stream] = OrderedDict()
        self._streamers_in_use = 0
        self.closed = False
        # A cluster's seams (relay/cluster/node.py), None on a single node: `observer` hears of connections
        # and streams as they come and go (publish/remove entries of the directory); `stream_quota` holds
        # concurrent_streams across nodes (acquire_stream/release_stream), beside the local count.
        self.observer: Any = None
        self.stream_quota: Any = None
        # `spectator_seats(broadcast_id)`: the broadcast's Seats (relay/spectators.py), counted across the cluster.
        self.spectator_seats: Any = None

    # -- queries -----------------------------------------------------------------------

    @property
    def streamers_free(self) -> int:
        return self._limits.streamers - self._streamers_in_use

    def connection(self, connection_id: str) -> Connection:
        conn = self.connections.get(connection_id)
        if conn is None:
            raise not_found("connection", connection_id)
        return conn

    def connection_for_client_token(self, token: str) -> Connection | None:
        conn = self._by_client_token.get(token)
        if conn is None or self.clock.monotonic() >= conn.client_tokens.get(token, 0.0):
            return None
        return conn

    def refresh_client_token(self, conn: Connection) -> None:
        """Give the connection a fresh client_token once the newest has used half its life
        (sooner, the newest stays: asking often costs nothing and mints nothing); the older
        ones stay valid until their own deadlines, then are forgotten."""
        now = self.clock.monotonic()
        ttl = self._limits.client_token_seconds
        if conn.closed or conn.client_token_deadline - now > ttl / 2:
            return
        for token, deadline in list(conn.client_tokens.items()):
            if deadline <= now:
                del conn.client_tokens[token]
                self._by_client_token.pop(token, None)
        self._issue_client_token(conn, now)

    def _issue_client_token(self, conn: Connection, now: float) -> None:
        conn.client_token = secrets.token_urlsafe(32)
        conn.client_token_deadline = now + self._limits.client_token_seconds
        conn.client_tokens[conn.client_token] = conn.client_token_deadline
        self._by_client_token[conn.client_token] = conn

    def stream(self, stream_id: str) -> Stream:
        stream = self._streams.get(stream_id)
        if stream is None:
            raise not_found("stream", stream_id)
        return stream

    def knows_stream(self, stream_id: str) -> bool:
        return stream_id in self._streams

    def stream_ids(self) -> list[str]:
        """Every stream GET /v1/streams/{id} still answers for: the live ones and the recent ended ones."""
        return list(self._streams)

    def broadcast(self, broadcast_id: str) -> Broadcast:
        broadcast = self.broadcasts.get(broadcast_id)
        if broadcast is None and self.channels is not None and not self.closed:
            channel = self.channels.by_broadcast(broadcast_id)
            if channel is not None:  # a channel's, watched before any host connected (or since a restart)
                broadcast = self.channel_broadcast(channel)
        if broadcast is None:
            raise not_found("broadcast", broadcast_id)
        broadcast.needed_at = self.clock.monotonic()  # a handler about to join it must find it still there
        return broadcast

    def has_broadcast(self, broadcast_id: str) -> bool:
        """Whether this node answers for the broadcast: a live one, or a channel's (made on first use)."""
        return broadcast_id in self.broadcasts or (
            self.channels is not None and self.channels.by_broadcast(broadcast_id) is not None)

    def channel_broadcast(self, channel: Channel) -> Broadcast:
        """The channel's broadcast, made the first time anyone needs it; it lives until the channel goes."""
        broadcast = self.broadcasts.get(channel.broadcast_id)
        if broadcast is None:
            broadcast = Broadcast(None, self._settings, self.clock, recordings=self.recordings,
                                  owner=channel.owner, media=self._media, channel=channel)
            self.broadcasts[channel.broadcast_id] = broadcast
        return broadcast

    def channel_changed(self, channel: Channel) -> None:
        """A channel's title, description or host name changed: open watch pages learn it at once."""
        broadcast = self.broadcasts.get(channel.broadcast_id)
        if broadcast is not None:
            broadcast.channel = channel
            broadcast.audience.send({"type": "about", **broadcast.about()})

    async def drop_channel(self, channel: Channel) -> None:
        """After the channel was deleted: its connection closes, then its broadcast (spectators and all)."""
        broadcast = self.broadcasts.get(channel.broadcast_id)
        if broadcast is None:
            return
        conn = self.connections.get(broadcast.connection_id or "")
        if conn is not None:
            await self.close_connection(conn, "disconnected")  # closes the broadcast: no channel keeps it
        elif self.broadcasts.pop(channel.broadcast_id, None) is not None:
            await broadcast.close()

    def _keeps_broadcast(self, conn: Connection) -> bool:
        """Whether the connection's broadcast stays when it closes: a channel's does, while the channel exists."""
        channel = conn.broadcast.channel
        return (channel is not None and not self.closed and self.channels is not None
                and self.channels.by_broadcast(channel.broadcast_id) is not None)

    def live_streams(self, api_key: str) -> list[Stream]:
        return [
            c.stream for c in self.connections.values()
            if c.api_key == api_key and c.stream is not None and c.stream.live
        ]

    def check_stream_quota(self, api_key: str) -> None:
        """429 CONCURRENT_LIMIT_REACHED when this key cannot start one more stream now."""
        counted = self._streams_counted(api_key)
        limit = self._limits.concurrent_streams
        if counted >= limit:
            live = self.live_streams(api_key)
            now = self.clock.monotonic()
            raise RelayError(
                "CONCURRENT_LIMIT_REACHED",
                429,
                f"This API key already has {counted} live streams (limit {limit}).",
                action="End a stream, or wait for one to finish.",
                details={"active_count": counted, "limit": limit},
                retry_after=max(1.0, min((s.deadline for s in live), default=now + 1) - now),
            )

    def _streams_counted(self, api_key: str) -> int:
        """Live streams plus starts in flight: what concurrent_streams limits."""
        return sum(
            1 for c in self.connections.values()
            if c.api_key == api_key
            and (c.state is ConnectionState.STARTING or (c.stream is not None and c.stream.live))
        )

    # -- connections ---------------------------------------------------------------------

    async def open_connection(self, api_key: str, channel: Channel | None = None) -> Connection:
        """A new connection: on ``channel`` it streams into the channel's broadcast (409 CHANNEL_IN_USE when
        another connection has it), else into a broadcast of its own."""
        if self.closed or self.streamers_free <= 0:
            raise RelayError(
                "STREAMER_NOT_AVAILABLE",
                503,
                "No streamer is free: every one is reserved by an open connection.",
                action="Retry shortly, or disconnect a connection you no longer use.",
                details={"streamers": self._limits.streamers},
                retry_after=5,
            )
        connection_id = uuid.uuid4().hex
        broadcast: Broadcast | None = None
        if channel is not None:
            broadcast = self.channel_broadcast(channel)
            if broadcast.connection_id is not None:
                raise channel_in_use(channel, broadcast.connection_id)
            broadcast.connection_id = connection_id  # claimed before awaiting: a second open gets the 409
            broadcast.owner = owner_id(api_key)  # its recordings are the streaming key's
            # Sharing replays is each connection's own choice (off unless it says so): a channel's
            # broadcast outlives its hosts, and one host's "share" must not carry over to the next.
            broadcast.share_replays(False, "")
        self._streamers_in_use += 1  # reserve before awaiting, so concurrent opens cannot overbook
        try:
            streamer = await self._world_model.connect()
        except BaseException:
            self._streamers_in_use -= 1
            if broadcast is not None:
                broadcast.connection_id = None
            raise
        if self.closed:  # shut down while the upstream was connecting: give it straight back
            self._streamers_in_use -= 1
            if broadcast is not None:
                broadcast.connection_id = None
            await streamer.disconnect()
            raise RelayError("STREAMER_NOT_AVAILABLE", 503, "The relay is shutting down.",
                             action="Retry shortly.", retry_after=5)
        if broadcast is not None and broadcast.closed:  # the channel was deleted while the upstream connected
            self._streamers_in_use -= 1
            await streamer.disconnect()
            raise not_found("channel", channel.channel_id)
        now, wall = self.clock.monotonic(), self.clock.time()
        if broadcast is None:
            broadcast = Broadcast(connection_id, self._settings, self.clock,
                                  recordings=self.recordings, owner=owner_id(api_key), media=self._media)
        conn = Connection(
            connection_id=connection_id,
            api_key=api_key,
            streamer=streamer,
            broadcast=broadcast,
            client_token="",
            created_at=wall,
            opened=now,
            deadline=now + self._limits.connection_max_seconds,
            client_token_deadline=now,
            last_seen=now,
            interacts=TokenBucket(self.clock, self._limits.host_interacts_per_second,
                                  self._limits.host_interacts_burst),
        )
        self._issue_client_token(conn, now)
        conn.broadcast.audience.forward_input = lambda forward: self._forward_input(conn, forward)
        conn.broadcast.audience.host_event = conn.publish
        self.connections[connection_id] = conn
        self.broadcasts[conn.broadcast.broadcast_id] = conn.broadcast
        if self.spectator_seats is not None:
            conn.broadcast.spectators.seats = self.spectator_seats(conn.broadcast.broadcast_id)
        metrics.CONNECTIONS.inc()
        if self.observer is not None:
            await self.observer.connection_opened(conn)
        log.info("connection opened", extra={"connection_id": connection_id})
        return conn

    def touch(self, conn: Connection) -> None:
        """A sign of life from the host: resets the idle timer."""
        conn.last_seen = self.clock.monotonic()

    def control_opened(self, conn: Connection) -> None:
        conn.control_sockets += 1
        self.touch(conn)
        conn.broadcast.set_host("connected")

    def control_closed(self, conn: Connection) -> None:
        """A console's socket went (a reload, a drop): the connection and its broadcast live on
        until the idle timeout, so the console can come back; only DELETE or the reaper end it."""
        conn.control_sockets = max(0, conn.control_sockets - 1)
        self.touch(conn)  # the idle countdown starts when the last socket goes
        if conn.control_sockets == 0:
            conn.broadcast.set_host("reconnecting")

    async def close_connection(self, conn: Connection, reason: str = "disconnected") -> None:
        """Close once, completely: the work runs in its own task, so a caller that is cancelled
        halfway (a handler whose client went away) cannot leave a streamer reserved."""
        if conn._closed is None:
            conn.set_state(ConnectionState.CLOSED)  # at once: no start may slip in before the task runs
            conn.close_reason = reason
            conn._closed = asyncio.get_running_loop().create_task(
                self._close_connection(conn, reason), name="relay-close-connection")
        await asyncio.shield(conn._closed)

    async def _close_connection(self, conn: Connection, reason: str) -> None:
        if conn.stream is not None and conn.stream.live:
            await self.end_stream(conn.stream, "disconnected")
        broadcast = conn.broadcast
        kept = self._keeps_broadcast(conn)
        if kept:  # the channel's spectators and participants stay for its next connection
            broadcast.connection_id = None
            broadcast.needed_at = self.clock.monotonic()  # the release grace counts from the host's leaving
            broadcast.audience.forward_input = None
            broadcast.audience.host_event = None
        else:
            await broadcast.close(reason)
        try:
            await conn.streamer.disconnect()
        except Exception:
            log.exception("streamer disconnect failed", extra={"connection_id": conn.connection_id})
        self._streamers_in_use -= 1
        self.connections.pop(conn.connection_id, None)
        if not kept:
            self.broadcasts.pop(broadcast.broadcast_id, None)
        for token in conn.client_tokens:
            self._by_client_token.pop(token, None)
        metrics.CONNECTIONS.dec()
        if self.observer is not None:
            self.observer.connection_closed(conn)
        conn.publish({"type": "disconnected", "reason": reason})
        log.info("connection closed", extra={"connection_id": conn.connection_id, "reason": reason})

    # -- streams -------------------------------------------------------------------------

    async def start_stream(
        self, conn: Connection, prompt: Any, image: bytes | None = None, portrait: bool = False
    ) -> Stream:
        prompt = check_prompt(prompt)
        if conn.closed:
            raise not_found("connection", conn.connection_id)
        if conn.state is not ConnectionState.CONNECTED:
            raise RelayError(
                "STREAM_ALREADY_ACTIVE",
                409,
                "This connection already has a live stream (or one is starting or ending).",
                action="End the current stream first.",
                details={"stream_id": conn.stream.stream_id if conn.stream else None},
            )
        self.check_stream_quota(conn.api_key)
        conn.set_state(ConnectionState.STARTING)  # reserves this key's slot across the await below
        try:
            await self._acquire_cluster_slot(conn)
            track = await _upstream_start(conn, prompt, image, portrait)
        except BaseException:  # refused, or cancelled: unless closed meanwhile, back to where it was
            if conn.state is ConnectionState.STARTING:
                conn.set_state(ConnectionState.CONNECTED)
            await self._release_cluster_slot(conn)
            raise
        if conn.closed:  # disconnected while the upstream was starting: nothing may outlive it
            track.stop()
            await conn.streamer.end_stream()
            await self._release_cluster_slot(conn)
            raise not_found("connection", conn.connection_id)
        wm = self._settings.world_model
        width, height = (wm.height, wm.width) if portrait else (wm.width, wm.height)
        now = self.clock.monotonic()
        stream = Stream(
            stream_id=uuid.uuid4().hex,
            connection=conn,
            prompt=prompt,
            portrait=portrait,
            width=width,
            height=height,
            started_at=self.clock.time(),
            deadline=now + self._limits.stream_max_seconds,
            max_duration_seconds=self._limits.stream_max_seconds,
            last_applied_prompt=prompt,
        )
        conn.stream = stream
        conn.set_state(ConnectionState.STREAMING)
        conn.streams_started += 1
        self._remember(stream)
        conn.broadcast.attach_stream(stream.stream_id, prompt, track, width, height, wm.fps)
        metrics.STREAMS.inc()
        metrics.STREAMS_STARTED.inc()
        conn.publish({
            "type": "stream_started",
            "stream_id": stream.stream_id,
            "prompt": prompt,
            "max_duration_seconds": stream.max_duration_seconds,
            "width": width,
            "height": height,
        })
        if self.observer is not None:  # last: the stream is whole whether or not this await completes
            await self.observer.stream_started(stream)
        log.info("stream started", extra={"connection_id": conn.connection_id, "stream_id": stream.stream_id})
        return stream

    async def interact(self, stream: Stream, prompt: Any, participant_id: str | None = None) -> str:
        """Send a prompt to the model: the host's own, or an audience input the orchestrator let through."""
        # Only the host's own prompts take a token: audience inputs were rationed by the orchestrator.
        # Taken before any other check, so a flood of bad prompts is refused as cheaply as good ones.
        if participant_id is None and stream.connection.interacts is not None:
            wait = stream.connection.interacts.take()
            if wait:
                raise rate_limited(wait, "Too many prompts from this host")
        prompt = check_prompt(prompt)
        if not stream.live:
            raise no_active_stream(stream)
        try:
            acknowledged = await stream.connection.streamer.interact(prompt)
        except RelayError:
            raise
        except Exception as exc:  # the upstream died under us; the reaper ends the stream
            raise RelayError("UPSTREAM_ERROR", 502, f"The world model did not take the prompt: {exc}",
                             action="Retry, or start a new stream.") from exc
        stream.last_applied_prompt = acknowledged
        broadcast = stream.connection.broadcast
        if participant_id is None:
            broadcast.prompt_applied(acknowledged, "host")
            stream.connection.publish({"type": "interact_acknowledged", "prompt": acknowledged})
        else:
            broadcast.prompt_applied(acknowledged, "participant", participant_id)
            stream.connection.publish({"type": "input_forwarded", "prompt": acknowledged,
                                       "participant_id": participant_id, "mode": broadcast.orchestrator.mode})
        return acknowledged

    async def _forward_input(self, conn: Connection, forward) -> None:
        stream = conn.stream
        if stream is not None and stream.live:
            await self.interact(stream, forward.prompt, participant_id=forward.participant_id)

    async def end_stream(self, stream: Stream, reason: str = "ended") -> None:
        if not stream.live:
            return
        conn = stream.connection
        stream.status = "ended"
        stream.ended_at = self.clock.time()
        stream.end_reason = reason
        stream.peak_spectators = conn.broadcast.peak_spectators
        if not conn.closed:
            conn.set_state(ConnectionState.ENDING)
        try:
            await conn.broadcast.detach_stream(reason)
            await conn.streamer.end_stream()
        except Exception:
            log.exception("world model end_stream failed", extra={"stream_id": stream.stream_id})
        finally:
            if conn.state is ConnectionState.ENDING:  # not closed meanwhile
                conn.set_state(ConnectionState.CONNECTED)
            await self._release_cluster_slot(conn)
        metrics.STREAMS.dec()
        conn.publish({"type": "stream_ended", "stream_id": stream.stream_id, "reason": reason})
        log.info("stream ended", extra={"stream_id": stream.stream_id, "reason": reason})

    async def _acquire_cluster_slot(self, conn: Connection) -> None:
        """Across a cluster: one of the key's concurrent_streams, taken atomically in Redis (429 when the
        other nodes hold them all). The slot is the connection's: one stream at a time."""
        if self.stream_quota is None:
            return
        limit = self._limits.concurrent_streams
        admitted, held = await self.stream_quota.acquire_stream(owner_id(conn.api_key), conn.connection_id, limit)
        if not admitted:
            raise RelayError("CONCURRENT_LIMIT_REACHED", 429,
                             f"This API key already has {held} live streams across the cluster (limit {limit}).",
                             action="End a stream, or wait for one to finish.",
                             details={"active_count": held, "limit": limit}, retry_after=1.0)

    async def _release_cluster_slot(self, conn: Connection) -> None:
        if self.stream_quota is not None:
            await self.stream_quota.release_stream(conn.connection_id)

    def _remember(self, stream: Stream) -> None:
        self._streams[stream.stream_id] = stream
        while len(self._streams) > ENDED_STREAMS_KEPT:
            oldest_id, oldest = next(iter(self._streams.items()))
            if oldest.live:
                break
            del self._streams[oldest_id]

    # -- the reaper ------------------------------------------------------------------------

    async def tick(self) -> None:
        """Enforce every deadline once; cheap enough to call several times a second."""
        now = self.clock.monotonic()
        idle = self._limits.idle_timeout_seconds
        for conn in list(self.connections.values()):
            stream = conn.stream
            if stream is not None and stream.live:
                if conn.broadcast.upstream_failed is not None:
                    await self.end_stream(stream, "upstream_error")
                elif now >= stream.deadline:
                    await self.end_stream(stream, "duration_limit")
            if now >= conn.deadline:
                await self.close_connection(conn, "expired")
            elif conn.control_sockets == 0 and now - conn.last_seen >= idle:
                await self.close_connection(conn, "idle_timeout")
            else:
                await conn.broadcast.tick()
        for broadcast in list(self.broadcasts.values()):
            if broadcast.connection_id is None:  # a channel's, between hosts: its spectators still come and go
                await broadcast.tick()
                if (broadcast.unused_for(now) >= self._limits.channel_release_seconds  # free its memory (HLS)
                        and self.broadcasts.pop(broadcast.broadcast_id, None) is broadcast):  # made again on ask
                    log.info("unused channel broadcast released", extra={"broadcast_id": broadcast.broadcast_id})
                    await broadcast.close()

    async def run_reaper(self, interval: float = 0.1) -> None:
        while True:
            try:
                await self.tick()
            except Exception:
                log.exception("reaper tick failed")
            await asyncio.sleep(interval)

    async def close(self) -> None:
        self.closed = True
        await asyncio.gather(*(self.close_connection(c, "shutdown") for c in list(self.connections.values())))
        remaining, self.broadcasts = list(self.broadcasts.values()), {}  # channels' broadcasts with no host
        await asyncio.gather(*(b.close() for b in remaining))


async def _upstream_start(conn: Connection, prompt: str, image: bytes | None, portrait: bool):
    """The world model's track for a new stream; any failure but the relay's own errors is UPSTREAM_ERROR."""
    try:
        return await conn.streamer.start_stream(prompt, image=image, portrait=portrait)
    except RelayError:
        raise
    except Exception as exc:
        log.exception("world model refused to start", extra={"connection_id": conn.connection_id})
        raise RelayError(
            "UPSTREAM_ERROR", 502, f"The world model could not start a stream: {exc}", action="Retry."
        ) from exc


def check_prompt(prompt: Any) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise unprocessable("'prompt' must be a non-empty string.", field="prompt")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise unprocessable(
            f"'prompt' is longer than {MAX_PROMPT_CHARS} characters.", field="prompt", limit=MAX_PROMPT_CHARS
        )
    return check_text(prompt, "prompt").strip()
