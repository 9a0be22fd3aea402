"""A broadcast: one per connection (or per channel), the watchable side of it.

A thin composition of three parts that each do one job: the media graph (media/graph.py: hubs,
fan-out, low layer, HLS, the live stream's recorder), the spectators (spectators.py: WHEP sessions)
and the audience (audience.py: participants' channels and the orchestrator). It outlives streams:
when the host ends one stream and starts the next, spectators keep their peer connections and simply
receive the new stream's packets, keyframe first. A channel's broadcast (channels.py) outlives its
connections too: its id and spectator token are the channel's, and between hosts it simply has no
connection (``connection_id`` None) and no source. What spans the parts lives here: the events a
stream's start and end announce, the viewer count, and the order things close in.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import OrderedDict
from functools import partial
from typing import Any, Callable

from aiortc.mediastreams import MediaStreamTrack

from .audience import Audience
from .channels import Channel
from .clock import SYSTEM_CLOCK, Clock
from .config import Settings
from .media.graph import MediaFeed, MediaGraph, RecorderFactory
from .media.hls import HlsPublisher
from .media.thumbnail import LiveThumbnail
from .orchestration import Orchestrator
from .recordings import RecordingStore
from .spectators import Spectators
from .worldmodel.base import EncodedTrack

# What the recording's events log keeps (stream_ended is the recorder's own; viewers are logged
# exactly on each join and leave, not from the coalesced pushes).
RECORDED_EVENTS = frozenset({"stream_started", "prompt_applied"})

STATUS_SPAN = 1.0  # the shortest time the control room's rates (fps, bitrate) are measured over

# How a broadcast gets its media graph: MediaGraph in the server; a test may pass a graph with no
# pipeline (no render or encoder thread).
MediaFactory = Callable[[Settings, Clock, RecorderFactory | None], MediaGraph]


class Broadcast:
    def __init__(
        self,
        connection_id: str | None,
        settings: Settings,
        clock: Clock = SYSTEM_CLOCK,
        *,
        recordings: RecordingStore | None = None,
        owner: str = "",
        media: MediaFactory = MediaGraph,
        channel: Channel | None = None,
    ) -> None:
        self.channel = channel  # a channel's broadcast keeps the channel's id and token, and outlives connections
        self.broadcast_id = channel.broadcast_id if channel else secrets.token_urlsafe(12)
        self.spectator_token = channel.spectator_token if channel else secrets.token_urlsafe(24)
        self.connection_id = connection_id  # the host's connection now; None while a channel has no host
        self.owner = owner  # whose recordings its streams make: the connection's key (hashed)
        recorder: RecorderFactory | None = None
        if recordings is not None and settings.recordings.enabled:  # each stream's, filed under this broadcast
            recorder = partial(self._recorder, recordings)
        self._clock = clock
        self._recordings = recordings if recorder is not None else None
        self._replay_seconds = settings.recordings.replay_link_seconds
        # The host's choice to hand spectators a replay link at each stream's end (off by default: a
        # recording belongs to the API key), the base the links point under, and the last such link.
        self.share_replay = False
        self._replay_base = ""
        self.replay_url: str | None = None
        self.media = media(settings, clock, recorder)
        # The watch page's og:image: one more reader of the packets, decoding only when asked.
        self.thumbnail = LiveThumbnail(settings.recordings.preview_width, settings.recordings.thumbnail_seconds, clock)
        self.media.hub.add_sink(self.thumbnail.offer)
        self.spectators = Spectators(self.broadcast_id, settings.limits, clock,
                                     feed=self.media.feed, on_viewers=self._record_viewers)
        self.audience = Audience(self.broadcast_id, settings, clock, live=lambda: self.live)
        self.audience.record_event = self._record_audience
        # Which stream's recording each chat message of the history went into (message_id -> stream_id):
        # the host may clear a message after its stream ended, and that recording's log must learn it too.
        self._chat_recorded: OrderedDict[str, str] = OrderedDict()
        self._chat_kept = settings.chat.history  # only a message still in the history can be cleared
        self._late_clears: set[asyncio.Task[None]] = set()
        self.stream_id: str | None = None
        self.prompt: str | None = None
        self._encoded: EncodedTrack | None = None  # the live stream's, when its packets pass through
        self._elsewhere = 0
        self._peak = 0  # the most viewers seen at once, every node's
        self._viewers_sent = -1
        # The last control-room sample: (monotonic time, frames, bytes) the rates are measured from.
        self._status_sample: tuple[float, int, int] | None = None
        self._rates: tuple[float, int] | None = None  # (fps, kbps) between the last two samples
        # Whether the host's console is there: "reconnecting" while its last control socket is gone
        # (a reload, a dropped network) and the connection waits for it until the idle timeout.
        self.host = "connected"
        # When it was last needed (asked for, watched, hosted): a channel's, unused channel_release_seconds
        # with no host, is released by the reaper and made again, with the same ids, on the next ask.
        self.needed_at = clock.monotonic()
        self.closed = False

    @property
    def live(self) -> bool:
        return self.media.live

    @property
    def viewers(self) -> int:
        """Everyone watching: this node's viewers and (in a cluster) every other node's."""
        return self.spectators.viewers + self.viewers_elsewhere

    @property
    def viewers_elsewhere(self) -> int:
        """Viewers watching at other nodes of a cluster (their edges), as the cluster's last beat counted
        them (relay/cluster/seats.py); 0 on a single node."""
        return self._elsewhere

    @viewers_elsewhere.setter
    def viewers_elsewhere(self, count: int) -> None:
        if count != self._elsewhere:
            self._elsewhere = count
            self._record_viewers(self.spectators.viewers)

    @property
    def peak_spectators(self) -> int:
        return max(self.spectators.peak, self._peak)

    @property
    def hls(self) -> HlsPublisher | None:
        return self.media.hls

    @property
    def orchestrator(self) -> Orchestrator:
        return self.audience.orchestrator

    @property
    def orchestration(self) -> dict[str, Any]:
        return self.orchestrator.state()

    def _recorder(self, recordings: RecordingStore, stream_id: str, **kwargs: Any):
        # Read at each stream's start: a channel's streams come from different connections.
        return recordings.recorder(stream_id, owner=self.owner, connection_id=self.connection_id,
                                   broadcast_id=self.broadcast_id, **kwargs)

    def about(self) -> dict[str, Any]:
        """What the broadcast is, for its viewers: the channel's title, description and host name."""
        channel = self.channel
        return {
            "channel": channel is not None,
            "title": channel.title if channel else None,
            "description": channel.description if channel else None,
            "host_name": channel.host_name if channel else None,
        }

    def state(self) -> dict[str, Any]:
        return {
            **self.about(),
            "broadcast_id": self.broadcast_id,
            "live": self.live,
            "stream_id": self.stream_id,
            "spectators": self.viewers,
            "prompt": self.prompt,
            "host": self.host,
            "orchestration": self.orchestration,
            "replay_url": self.replay_url,
        }

    def hello(self, participant_id: str, resumed: bool) -> dict[str, Any]:
        """A participant's first event on its events socket (at this node or, clustered, at another)."""
        return {"type": "hello", "participant_id": participant_id,
                "resume_token": self.audience.resume_token(participant_id), "resumed": resumed,
                "invited": self.orchestrator.is_invited(participant_id), **self.snapshot()}

    def snapshot(self) -> dict[str, Any]:
        """Hello's part that is the same for every participant: the broadcast as it is now (a cluster's
        edge rebuilds its sockets' hellos from it when pushes may have been lost with Redis)."""
        return {"orchestration": self.orchestration, "chat": self.audience.chat.state(), "live": self.live,
                "stream_id": self.stream_id, "prompt": self.prompt, "viewers": self.viewers,
                **self.about(),  # the channel's title, description and host name (null for a plain broadcast)
                "host": self.host, "replay_url": self.replay_url}

    def media_feed(self) -> MediaFeed:
        """A peer that takes this broadcast's media without being one of its spectators (the
        hosted-API owner peer): not counted, nor capped."""
        return self.media.feed()

    # -- the stream side -------------------------------------------------------------

    def attach_stream(
        self, stream_id: str, prompt: str, track: MediaStreamTrack, width: int, height: int, fps: int
    ) -> None:
        self.stream_id = stream_id
        self.prompt = prompt
        self.replay_url = None  # the last stream's: a live page shows the live stream
        if isinstance(track, EncodedTrack):  # a publisher's H.264: its packets are the source, never re-encoded
            self._encoded = track
            track.attach(self.media.attach_packets(track.request_keyframe, fps, stream_id))
        else:
            self.media.attach_source(stream_id, track, width, height, fps)
        self.emit({"type": "stream_started", "stream_id": stream_id, "prompt": prompt})

    async def detach_stream(self, reason: str) -> None:
        encoded, self._encoded = self._encoded, None
        if encoded is not None:
            encoded.attach(None)
        recorded = self.media.recorder is not None
        if await self.media.detach_source(reason):
            self.thumbnail.clear()
            event = {"type": "stream_ended", "stream_id": self.stream_id, "reason": reason}
            self.replay_url = self._replay_link(self.stream_id) if recorded else None
            if self.replay_url is not None:
                event["replay_url"] = self.replay_url
            self.emit(event)

    def share_replays(self, share: bool, base_url: str) -> None:
        """The host's choice: from the next stream's end on, ``stream_ended`` carries a signed link (under
        ``base_url``, the node that records) to that stream's replay page. Turning it off withdraws the
        last link from the page's state at once (a link already handed out lives until it expires)."""
        self.share_replay = share
        self._replay_base = base_url
        if not share:
            self.replay_url = None

    def _replay_link(self, stream_id: str | None) -> str | None:
        # Signed for exactly this stream's replay page: it opens that recording and its files, read-only,
        # never another recording or the owner's list (relay/api/recordings.py checks the signature).
        if not self.share_replay or self._recordings is None or stream_id is None:
            return None
        path = self._recordings.signed_url(f"/recordings/{stream_id}", ttl=self._replay_seconds)
        return self._replay_base + path

    @property
    def upstream_failed(self) -> BaseException | None:
        return self.media.source_failed or (self._encoded.failed if self._encoded is not None else None)

    def prompt_applied(self, prompt: str, source: str, participant_id: str | None = None) -> None:
        self.prompt = prompt
        event = {"type": "prompt_applied", "prompt": prompt, "source": source, "mode": self.orchestrator.mode}
        if participant_id is not None:
            event["participant_id"] = participant_id
            event["name"] = self.orchestrator.participants.get(participant_id)
        self.emit(event)

    def set_host(self, host: str) -> None:
        """The host's console left ("reconnecting") or came back ("connected"): told to the audience
        at once, so viewers read that the host is reconnecting, not that the broadcast ended."""
        if host != self.host and not self.closed:
            self.host = host
            self.audience.send({"type": "host", "host": host})

    def emit(self, event: dict[str, Any]) -> None:
        """To every participant, and into the live stream's recording when it is worth keeping."""
        self.audience.send(event)
        if event["type"] in RECORDED_EVENTS:
            self.media.record_event(event)

    def _record_audience(self, event: dict[str, Any]) -> None:
        """The audience's chat events into the live stream's recording; a cleared message is also
        cleared in its stream's log once that recording has finished, so a shared replay never shows its text."""
        self.media.record_event(event)  # the live stream's (or, before its first keyframe, kept for it)
        live = self.stream_id if self.live else None
        if self._recordings is None:
            return
        if event["type"] == "chat" and live is not None:
            self._chat_recorded[event["message_id"]] = live
            while len(self._chat_recorded) > self._chat_kept:
                self._chat_recorded.popitem(last=False)
        elif event["type"] == "chat_cleared":
            # Also when it is the live stream's: its recorder may have stopped writing (a disk that fell
            # behind), so the clear goes into the log once more after the end; the filter reads either.
            earlier = self._chat_recorded.pop(event["message_id"], None)
            if earlier is not None:
                task = asyncio.get_running_loop().create_task(
                    self._clear_after_end(self._recordings, earlier, event["message_id"]))
                self._late_clears.add(task)
                task.add_done_callback(self._late_clears.discard)

    @staticmethod
    async def _clear_after_end(store: RecordingStore, stream_id: str, message_id: str) -> None:
        recorder = store.recorder_of(stream_id)
        if recorder is not None:  # still finishing: its writer closes the log first, the line goes after
            await asyncio.wrap_future(recorder.done)
        await asyncio.to_thread(store.append_event, stream_id,
                                {"type": "chat_cleared", "message_id": message_id, "after_end": True})

    def _record_viewers(self, _here: int) -> None:
        """A viewer joined or left here: the recording logs everyone's count (the recorder keeps changes only)."""
        self.media.record_event({"type": "viewers", "count": self.viewers})

    # -- housekeeping ----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The host's control room (asked for over the control socket): who is watching and how the
        live stream is doing, its rates measured between samples at least STATUS_SPAN apart."""
        now = self._clock.monotonic()
        hub = self.media.hub
        sample = (now, hub.published, hub.published_bytes)
        last = self._status_sample
        if last is None or now - last[0] >= STATUS_SPAN:
            if last is not None:
                span = now - last[0]
                self._rates = (round((sample[1] - last[1]) / span, 1), round((sample[2] - last[2]) * 8 / span / 1000))
            self._status_sample = sample
        stream = None
        if self.live:
            fps, kbps = self._rates if self._rates is not None else (None, None)
            stream = {"stream_id": self.stream_id, "fps": fps, "bitrate_kbps": kbps,
                      "keyframes_forced": self.media.keyframes_forced}
        hls = self.hls.readers(now) if self.hls is not None else 0
        return {"type": "status", "viewers": {"webrtc": self.viewers, "hls": hls},
                "participants": self.audience.participants, "stream": stream}

    def unused_for(self, now: float) -> float:
        """How long nobody has needed it: no host, spectator session or join, events socket, HLS reader."""
        if (self.connection_id is not None or not self.spectators.idle or self.audience.participants
                or (self.hls is not None and self.hls.readers(now))):
            self.needed_at = now
        return now - self.needed_at

    async def tick(self) -> None:
        """Drop silent spectators; publish the viewer count when it changed; run the orchestration."""
        await self.spectators.tick()
        self._peak = max(self._peak, self.viewers)
        if self.viewers != self._viewers_sent:
            self._viewers_sent = self.viewers
            self.emit({"type": "viewers", "count": self._viewers_sent})
        await self.audience.tick()

    async def close(self, reason: str = "disconnected") -> None:
        """``reason`` is the connection's (disconnected, idle_timeout, expired, shutdown): the
        audience is told it last, so a page can say "the relay restarted" apart from "the host ended"."""
        if self.closed:
            return
        self.closed = True
        self.spectators.refuse_joins()
        await self.detach_stream("disconnected")
        # Before the spectators' sessions go, so a page learns why before its player fails.
        self.audience.send({"type": "disconnected", "reason": reason})
        await self.spectators.close()
        self.audience.close()
        await self.media.close()
        await asyncio.gather(*self._late_clears, return_exceptions=True)
