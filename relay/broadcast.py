"""A broadcast: one per connection, the watchable side of it.

It owns the spectators (their peer connections and tracks), the fan-out hub they all read,
the pipeline of whichever stream is live, and the event channels of participants.  It
outlives streams: when the host ends one stream and starts the next, spectators keep their
peer connections and simply receive the new stream's packets, keyframe first.
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

from aiortc import RTCPeerConnection
from aiortc.mediastreams import MediaStreamTrack

from . import metrics
from .clock import SYSTEM_CLOCK, Clock
from .config import Settings
from .errors import RelayError, invalid_request, not_found
from .media.hls import HlsPublisher
from .media.hub import FanoutHub
from .media.pipeline import StreamPipeline
from .media.recorder import StreamRecorder
from .media.rtp_fanout import IdleVideoTrack, RtpFanout, RtpOutput, hook_output
from .media.webrtc import (add_trickled_candidates, answer_spectator, count_candidates, hook_sender,
                           too_many_candidates)
from .orchestration import Forward, Orchestrator
from .ratelimit import TokenBucket, rate_limited
from .recordings import RecordingStore

log = logging.getLogger(__name__)

EVENT_QUEUE_MAX = 256
# What the recording's events log keeps (stream_ended is the recorder's own; viewers are logged
# exactly on each join and leave, not from the coalesced pushes).
RECORDED_EVENTS = frozenset({"stream_started", "prompt_applied"})
STATE_PUSH_INTERVAL = 0.25  # orchestration state reaches participants a few times a second at most
# How long close() waits for joins still answering their offer. They close their own peer
# connection when they see the broadcast closed; the wait only makes close() return after them.
JOIN_CLOSE_WAIT = 5.0


@dataclass(eq=False)
class MediaFeed:
    """One peer's share of the broadcast's media: the track its transceiver holds and the hooks
    that make its RTCRtpSender part of the fan-out (spectators, and the hosted-API owner peer)."""

    broadcast: "Broadcast"
    track: MediaStreamTrack
    output: RtpOutput | None = None

    def attach(self, sender, on_heard: Callable[[], None] | None = None) -> None:
        """Hook the sender before its description is applied: keyframes, liveness, the fan-out."""
        broadcast = self.broadcast
        hook_sender(sender, broadcast.hub.request_keyframe if broadcast.encode_once else None,
                    on_heard or (lambda: None))
        if broadcast.fanout is not None:
            self.output = broadcast.fanout.add(sender)
            hook_output(sender, self.output)

    def close(self) -> None:
        if self.output is not None:
            self.output.close()
        self.track.stop()


@dataclass
class Spectator:
    spectator_id: str
    pc: RTCPeerConnection
    feed: MediaFeed
    joined_at: float
    last_heard: float
    counted: bool = True  # False for the host's own preview: the host is not its audience
    address: str | None = None  # where the offer came from: pending sessions are capped per address
    # ICE and DTLS completed. Until then the session is pending: not a viewer, not in the metrics or
    # the cap, and dropped if it has not connected within whep_connect_seconds.
    connected: bool = False
    candidates: int = 0  # remote ICE candidates signalled so far (offer and PATCHes), bounded
    closed: bool = False

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.feed.close()
        await self.pc.close()

    @property
    def output(self) -> RtpOutput | None:
        return self.feed.output


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
    limiter: TokenBucket | None = None  # every message takes a token
    refused: int = 0  # messages refused for rate in a row
    flooded: bool = False  # refused so often in a row that the socket is to be closed (FLOODING_CLOSE_CODE)
    admitted: bool = True  # counted against its address until close_channel

    def push(self, event: str) -> None:
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.overflowed = True  # the reader is too slow: its socket is closed, not waited on

    def close(self, *, replaced: bool = False) -> None:
        self.replaced = replaced
        try:
            self.queue.put_nowait(None)  # tells the socket's sender to finish
        except asyncio.QueueFull:
            self.overflowed = True


# The reply type each participant message is answered with (anything else: an error event).
REPLY_TYPES = {"input": "input_result", "vote": "vote_result", "raise_hand": "turn_result",
               "release_turn": "turn_result"}


def rate_limited_reply(kind: Any, wait: float) -> dict[str, Any]:
    """The answer to a message refused for rate: the reply its type expects, refused RATE_LIMITED."""
    retry_after = math.ceil(wait * 10) / 10  # never 0: the client must wait some
    reply_type = REPLY_TYPES.get(kind) if isinstance(kind, str) else None
    if reply_type is None:
        return {"type": "error", "code": "RATE_LIMITED", "fatal": False, "retry_after": retry_after,
                "message": rate_limited(wait, "Too many messages").message}
    return {"type": reply_type, "status": "rejected", "reason": "rate_limited", "code": "RATE_LIMITED",
            "retry_after": retry_after}


class Broadcast:
    def __init__(
        self,
        connection_id: str,
        settings: Settings,
        clock: Clock = SYSTEM_CLOCK,
        *,
        recordings: RecordingStore | None = None,
        owner: str = "",
    ) -> None:
        self.broadcast_id = secrets.token_urlsafe(12)
        self.spectator_token = secrets.token_urlsafe(24)
        self.connection_id = connection_id
        self._settings = settings
        self._clock = clock
        mode = settings.media.mode
        self.hub = FanoutHub(max_queue=settings.media.spectator_queue_packets if mode != "per-spectator" else 2)
        # Default path: packetize once, write headers per spectator. The other modes hand
        # each spectator's aiortc sender a track from the hub instead (for comparison).
        self.fanout: RtpFanout | None = None
        # The optional lower layer (half size): its own hub, on the main hub's clock, and its own
        # packetizer; spectators' outputs move between the two by their bandwidth estimates.
        self.low_hub: FanoutHub | None = None
        self.low_fanout: RtpFanout | None = None
        if mode == "encode-once":
            if settings.media.low_layer:
                self.low_hub = FanoutHub(clock_of=self.hub)
                self.low_fanout = RtpFanout(self.low_hub.request_keyframe, on_sent=metrics.count_sent)
                self.low_hub.add_sink(self.low_fanout.publish)
            self.fanout = RtpFanout(self.hub.request_keyframe, on_sent=metrics.count_sent, lower=self.low_fanout)
            self.hub.add_sink(self.fanout.publish)
        # Live HLS: one more reader of the hub's packets, for players and CDNs (nothing per viewer).
        self.hls: HlsPublisher | None = None
        if settings.media.hls and mode != "per-spectator":
            self.hls = HlsPublisher(target_seconds=settings.media.keyframe_interval_seconds,
                                    window=settings.media.hls_window_segments, fps=settings.world_model.fps,
                                    on_segment=metrics.HLS_SEGMENTS.inc)
            self.hub.add_sink(self.hls.write)
        self.spectators: dict[str, Spectator] = {}
        # Joins still answering their offer: (counted, address). Counted ones are pending sessions
        # already, and close() waits for all of them.
        self._joins: dict[asyncio.Future, tuple[bool, str | None]] = {}
        self._channels: dict[str, EventChannel] = {}  # participant_id -> its one open socket
        self._address_sockets: Counter[str] = Counter()  # client address -> its open events sockets
        self._participant_secret = secrets.token_bytes(16)  # signs resume tokens
        self._pipeline: StreamPipeline | None = None
        # Recording is one more reader of the stream's packets (a hub sink), never a second encode.
        self._recordings = recordings if settings.recordings.enabled and settings.media.mode != "per-spectator" else None
        self._owner = owner
        self._recorder: StreamRecorder | None = None
        self._finishing: set[StreamRecorder] = set()
        self.stream_id: str | None = None
        self.prompt: str | None = None
        self.peak_spectators = 0
        self._viewers_sent = -1
        self.orchestrator = Orchestrator(settings.orchestration, clock)
        # Joiners get the state in their hello; pushes carry changes only.
        self._state_sent = (self.orchestrator.version, self.orchestrator.host_version)
        self._state_pushed_at = -1e9
        # Set by the session that owns this broadcast: where accepted audience inputs go
        # (the stream's interact) and where host-only events go (the control socket).
        self.forward_input: Callable[[Forward], Awaitable[None]] | None = None
        self.host_event: Callable[[dict[str, Any]], None] | None = None
        self.closed = False

    @property
    def encode_once(self) -> bool:
        return self._settings.media.mode != "per-spectator"

    @property
    def live(self) -> bool:
        return self._pipeline is not None

    @property
    def orchestration(self) -> dict[str, Any]:
        return self.orchestrator.state()

    def state(self) -> dict[str, Any]:
        return {
            "broadcast_id": self.broadcast_id,
            "live": self.live,
            "stream_id": self.stream_id,
            "spectators": self.viewers,
            "prompt": self.prompt,
            "orchestration": self.orchestration,
        }

    # -- the stream side -------------------------------------------------------------

    def attach_stream(
        self, stream_id: str, prompt: str, track: MediaStreamTrack, width: int, height: int, fps: int
    ) -> StreamPipeline:
        media = self._settings.media
        pipeline = StreamPipeline(
            track,
            self.hub,
            width=width,
            height=height,
            fps=fps,
            mode=media.mode,
            bitrate_kbps=media.bitrate_kbps,
            keyframe_interval_seconds=media.keyframe_interval_seconds,
            preset=media.preset,
            on_frame=metrics.FRAMES_GENERATED.inc,
            on_keyframe_forced=metrics.KEYFRAMES_FORCED.inc,
            on_latency=metrics.RELAY_LATENCY.observe,
            clock=self._clock.monotonic,
            low_hub=self.low_hub,
            low_bitrate_kbps=media.low_layer_bitrate_kbps,
        )
        self._pipeline = pipeline
        self.stream_id = stream_id
        self.prompt = prompt
        if self._recordings is not None:
            self._recorder = self._recordings.recorder(
                stream_id, width=width, height=height, fps=fps, owner=self._owner,
                connection_id=self.connection_id, broadcast_id=self.broadcast_id,
            )
            self.hub.add_sink(self._recorder.write)
        if self.hls is not None:
            self.hls.new_stream(width, height, fps)
        pipeline.start()
        self.emit({"type": "stream_started", "stream_id": stream_id, "prompt": prompt})
        return pipeline

    async def detach_stream(self, reason: str) -> None:
        pipeline, self._pipeline = self._pipeline, None
        if pipeline is None:
            return
        stream_id = self.stream_id
        await pipeline.close()
        if self.hls is not None:
            self.hls.end_stream()
        self.emit({"type": "stream_ended", "stream_id": stream_id, "reason": reason})
        recorder, self._recorder = self._recorder, None
        if recorder is not None:
            self.hub.remove_sink(recorder.write)
            recorder.stop(reason)  # finishes (trailer, thumbnail, preview) on its own thread
            self._finishing.add(recorder)
            recorder.done.add_done_callback(lambda _: self._finishing.discard(recorder))

    @property
    def upstream_failed(self) -> BaseException | None:
        return self._pipeline.failed if self._pipeline is not None else None

    def prompt_applied(self, prompt: str, source: str, participant_id: str | None = None) -> None:
        self.prompt = prompt
        event = {"type": "prompt_applied", "prompt": prompt, "source": source, "mode": self.orchestrator.mode}
        if participant_id is not None:
            event["participant_id"] = participant_id
            event["name"] = self.orchestrator.participants.get(participant_id)
        self.emit(event)

    # -- spectators ------------------------------------------------------------------

    def media_feed(self) -> MediaFeed:
        """A new receiver of this broadcast's media. Default path: an idle track on the transceiver
        (the fan-out sends for it); the comparison modes: a track from the hub."""
        return MediaFeed(self, IdleVideoTrack() if self.fanout is not None else self.hub.subscribe())

    @property
    def viewers(self) -> int:
        """Spectators who count: everyone connected and watching but the host's own preview."""
        return sum(1 for s in self.spectators.values() if s.counted and s.connected)

    def _pending(self) -> list[str | None]:
        """Addresses of the counted sessions not yet connected, joins still answering included."""
        joining = [address for counted, address in self._joins.values() if counted]
        return joining + [s.address for s in self.spectators.values() if s.counted and not s.connected]

    def _admit(self, address: str | None) -> None:
        """Raise unless one more counted spectator may start joining from this address."""
        limits = self._settings.limits
        limit = limits.spectators_per_broadcast
        pending = self._pending()
        per_address = limits.pending_whep_per_address
        if self.viewers < limit and pending.count(address) >= per_address:
            # A slot frees at the latest when this address's oldest pending session hits its deadline.
            started = [s.joined_at for s in self.spectators.values()
                       if s.counted and not s.connected and s.address == address]
            wait = min(started, default=self._clock.monotonic()) + limits.whep_connect_seconds
            raise RelayError(
                "RATE_LIMITED",
                429,
                f"Too many WHEP sessions from your address are still connecting (at most {per_address}).",
                action="Let a session connect, or end it with DELETE, then retry.",
                details={"limit": per_address},
                retry_after=max(1.0, wait - self._clock.monotonic()),
            )
        # Pending sessions do not take viewers' seats: they are bounded on their own, per address
        # (above) and in total (by the same number as the seats), for whep_connect_seconds at most.
        if self.viewers >= limit or len(pending) >= limit:
            raise RelayError(
                "SPECTATOR_LIMIT_REACHED",
                503,
                f"This broadcast already has its maximum of {limit} spectators.",
                action="Retry later.",
                details={"limit": limit},
                retry_after=10,
            )

    async def add_spectator(
        self, offer_sdp: str, *, counted: bool = True, address: str | None = None
    ) -> tuple[Spectator, str]:
        if self.closed:
            raise not_found("broadcast", self.broadcast_id)
        if counted:
            self._admit(address)
        max_candidates = self._settings.limits.whep_offer_max_candidates
        spectator_id = uuid.uuid4().hex
        feed = self.media_feed()
        now = self._clock.monotonic()
        # Registered before the first await, so concurrent offers from one address see each other.
        join = asyncio.get_running_loop().create_future()
        self._joins[join] = (counted, address)
        try:
            peer = await answer_spectator(
                offer_sdp, feed.track, max_candidates=max_candidates,
                on_sender=lambda sender: feed.attach(sender, lambda: self._heard(spectator_id)),
            )
            if self.closed:  # closed while we answered: no join may outlive the close
                await peer.pc.close()
                raise not_found("broadcast", self.broadcast_id)
        except BaseException:
            feed.close()
            raise
        finally:
            del self._joins[join]
            join.set_result(None)
        spectator = Spectator(spectator_id, peer.pc, feed, joined_at=now, last_heard=now, counted=counted,
                              address=address, candidates=count_candidates(offer_sdp))
        self.spectators[spectator_id] = spectator

        @peer.pc.on("connectionstatechange")
        async def on_state() -> None:
            if peer.pc.connectionState == "connected":
                await self._spectator_connected(spectator)
            elif peer.pc.connectionState in ("failed", "closed"):
                await self.remove_spectator(spectator_id)

        log.info("spectator joining", extra={"broadcast_id": self.broadcast_id, "spectator_id": spectator_id})
        return spectator, peer.answer_sdp

    async def _spectator_connected(self, spectator: Spectator) -> None:
        if spectator.connected or self.spectators.get(spectator.spectator_id) is not spectator:
            return
        limit = self._settings.limits.spectators_per_broadcast
        if spectator.counted and self.viewers >= limit:
            # Pending sessions are admitted beyond the seats taken; the last seat goes to whoever
            # connects first, and the others are turned away here.
            log.info("spectator connected to a full broadcast: dropped",
                     extra={"broadcast_id": self.broadcast_id, "spectator_id": spectator.spectator_id})
            await self.remove_spectator(spectator.spectator_id)
            return
        spectator.connected = True
        self.peak_spectators = max(self.peak_spectators, self.viewers)
        self._record_viewers()
        metrics.SPECTATORS.inc()
        log.info("spectator joined", extra={"broadcast_id": self.broadcast_id,
                                            "spectator_id": spectator.spectator_id})

    def _record_viewers(self) -> None:
        if self._recorder is not None:
            self._recorder.log_event({"type": "viewers", "count": self.viewers})

    def _heard(self, spectator_id: str) -> None:
        spectator = self.spectators.get(spectator_id)
        if spectator is not None:
            spectator.last_heard = self._clock.monotonic()

    def spectator(self, spectator_id: str) -> Spectator:
        spectator = self.spectators.get(spectator_id)
        if spectator is None:
            raise not_found("spectator", spectator_id)
        return spectator

    async def add_candidates(self, spectator_id: str, sdpfrag: str) -> None:
        spectator = self.spectator(spectator_id)
        # The offer's bound holds for the session: trickling cannot add what the offer could not.
        limit = self._settings.limits.whep_offer_max_candidates
        total = spectator.candidates + count_candidates(sdpfrag)
        if total > limit:
            raise too_many_candidates(limit, total)
        spectator.candidates = total
        await add_trickled_candidates(spectator.pc, sdpfrag)

    async def remove_spectator(self, spectator_id: str) -> bool:
        spectator = self.spectators.pop(spectator_id, None)
        if spectator is None:
            return False
        if spectator.connected:
            metrics.SPECTATORS.dec()
            self._record_viewers()
        await spectator.close()
        log.info("spectator left", extra={"broadcast_id": self.broadcast_id, "spectator_id": spectator_id})
        return True

    # -- participants' event channels ------------------------------------------------

    # A participant is an identity, not a socket: hello hands out a resume token (the id,
    # signed with this broadcast's secret), and a socket that presents it takes the identity
    # back after a dropped network or a reload, with its block and cooldown. One socket per
    # identity: a newer one replaces the older, which is closed as "replaced".

    def resume_token(self, participant_id: str) -> str:
        mac = hmac.new(self._participant_secret, participant_id.encode(), hashlib.sha256).hexdigest()[:32]
        return f"{participant_id}.{mac}"

    def _resumed_id(self, token: str | None) -> str | None:
        if not token:
            return None
        participant_id = token.partition(".")[0]
        return participant_id if hmac.compare_digest(token.encode(), self.resume_token(participant_id).encode()) else None

    # An invite is a participant identity the host minted, signed apart from resume tokens (so a
    # resume token is no invite): stateless, and presenting it again resumes the same identity.

    def invite_code(self, participant_id: str) -> str:
        mac = hmac.new(self._participant_secret, b"invite:" + participant_id.encode(), hashlib.sha256)
        return f"{participant_id}.{mac.hexdigest()[:20]}"

    def mint_invites(self, count: int) -> list[tuple[str, str]]:
        """(participant_id, invite code) for `count` new identities."""
        return [(pid, self.invite_code(pid)) for pid in (EventChannel().participant_id for _ in range(count))]

    def _invited_id(self, code: str | None) -> str | None:
        if not code:
            return None
        participant_id = code.partition(".")[0]
        return participant_id if hmac.compare_digest(code.encode(), self.invite_code(participant_id).encode()) else None

    def open_channel(self, resume: str | None = None, *, address: str | None = None,
                     invite: str | None = None) -> EventChannel:
        """A participant's socket is opening; ``resume`` (a token from an earlier hello) or ``invite``
        (a host's invite code, which wins) gives its identity. An unknown or forged token is not an
        error: the socket gets a new identity and its hello says ``resumed: false`` (``invited: false``).

        Called before the WebSocket upgrade, so the caps answer in HTTP: 503 PARTICIPANT_LIMIT_REACHED
        past [limits] participants_per_broadcast (a socket resuming a connected identity replaces it
        and is not counted twice), 429 RATE_LIMITED past events_sockets_per_address."""
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
                                                   settings.participant_messages_burst))
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

    async def participant_message(self, channel: EventChannel, message: dict[str, Any]) -> dict[str, Any] | None:
        """A message from a participant; returns the direct reply, if any."""
        pid = channel.participant_id
        kind = message.get("type")
        orchestrator = self.orchestrator
        wait = self.take_token(channel)
        if wait:
            return rate_limited_reply(kind, wait)
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

    def take_token(self, channel: EventChannel) -> float:
        """0 if this message may go on, else the seconds to wait. Refused messages cost a dict
        lookup and a small reply, nothing of the orchestrator's, so a flood slows no one else; a
        socket refused events_flood_messages times in a row is marked `flooded` for closing."""
        limiter, settings = channel.limiter, self.orchestrator.settings
        if limiter is None:
            return 0.0
        limiter.rate, limiter.burst = settings.participant_messages_per_second, settings.participant_messages_burst
        wait = limiter.take()
        if not wait:
            channel.refused = 0
            return 0.0
        channel.refused += 1
        if channel.refused >= self._settings.limits.events_flood_messages:
            channel.flooded = True
        return wait

    def host_changed_orchestration(self) -> None:
        """The host acted: show everyone the result now rather than at the next tick."""
        self._push_orchestration_state(at_once=True)

    def configure_orchestration(self, body: dict[str, Any]) -> None:
        """The host's `{mode?, ...settings}` (REST body or control message), validated by the orchestrator."""
        settings = {k: v for k, v in body.items() if k != "type"}
        mode = settings.pop("mode", None)
        if mode is not None and not isinstance(mode, str):
            raise invalid_request("'mode' must be a string.", field="mode")
        self.orchestrator.configure(mode, **settings)

    async def _forward(self, forward: Forward) -> None:
        if self.forward_input is None or not self.live:
            log.info("audience input dropped: no live stream", extra={"broadcast_id": self.broadcast_id})
            return
        try:
            await self.forward_input(forward)
        except Exception:
            log.exception("forwarding an audience input failed", extra={"broadcast_id": self.broadcast_id})

    def emit(self, event: dict[str, Any]) -> None:
        if self._channels:
            text = json.dumps(event)  # once, however many participants: the sockets send the same text
            for channel in self._channels.values():
                channel.push(text)
        if self._recorder is not None and event["type"] in RECORDED_EVENTS:
            self._recorder.log_event(event)

    # -- housekeeping ----------------------------------------------------------------

    async def tick(self) -> None:
        """Drop spectators that went silent or never connected; publish the viewer count when it changed."""
        limits = self._settings.limits
        now = self._clock.monotonic()
        for spectator in list(self.spectators.values()):
            if now - spectator.last_heard > limits.spectator_timeout_seconds:
                log.info("spectator timed out", extra={"spectator_id": spectator.spectator_id})
                await self.remove_spectator(spectator.spectator_id)
            elif not spectator.connected and now - spectator.joined_at > limits.whep_connect_seconds:
                log.info("spectator never connected", extra={"spectator_id": spectator.spectator_id})
                await self.remove_spectator(spectator.spectator_id)
        if self.viewers != self._viewers_sent:
            self._viewers_sent = self.viewers
            self.emit({"type": "viewers", "count": self._viewers_sent})
        if self.live:  # while nothing is live, inputs wait (a queue holds, a window's winner keeps)
            for forward in self.orchestrator.tick():
                await self._forward(forward)
        self._push_orchestration_state()

    def _push_orchestration_state(self, *, at_once: bool = False) -> None:
        """Coalesced: at most one push per STATE_PUSH_INTERVAL, only when something changed."""
        versions = (self.orchestrator.version, self.orchestrator.host_version)
        now = self._clock.monotonic()
        if versions == self._state_sent or (now - self._state_pushed_at < STATE_PUSH_INTERVAL and not at_once):
            return
        public_changed = versions[0] != self._state_sent[0]
        self._state_sent, self._state_pushed_at = versions, now
        if public_changed:
            self.emit({"type": "orchestration", **self.orchestrator.state()})
        if self.host_event is not None:
            self.host_event({"type": "orchestration", **self.orchestrator.state(host=True)})

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        await self.detach_stream("disconnected")
        if self._joins:  # each closes its own peer connection on seeing `closed`
            await asyncio.wait(list(self._joins), timeout=JOIN_CLOSE_WAIT)
        await asyncio.gather(*(self.remove_spectator(s) for s in list(self.spectators)))
        for channel in list(self._channels.values()):
            channel.close()
        self._channels.clear()
        self.hub.close()
        if self.hls is not None:
            self.hls.close()
        if self.low_hub is not None:
            self.low_hub.close()
        # A recording finishes even when its connection goes: wait for its files.
        await asyncio.gather(*(r.aclose() for r in list(self._finishing)), return_exceptions=True)
