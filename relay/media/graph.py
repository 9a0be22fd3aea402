"""A broadcast's media graph: one source at a time, any number of readers.

Built once per broadcast for the configured ``[media] mode``, it outlives the streams that feed
it, the way MediaMTX's stream outlives its publishers. A *source* attaches and detaches: today the
world-model pipeline of the live stream (frames, encoded once); later a cluster edge feed or a WHIP
publisher. *Readers* attach and detach: each WebRTC peer's :class:`MediaFeed`, the HLS publisher,
and the recorder of the live stream. Following a frame from the world model to a spectator:

    source track -> StreamPipeline (pipeline.py: encode once) -> FanoutHub (hub.py: one clock)
        hub -> RtpFanout (rtp_fanout.py: packetize once) -> each feed's RtpOutput -> its spectator
        hub -> HlsPublisher (hls.py)      hub -> StreamRecorder (recorder.py, the live stream's)
        pipeline -> low hub -> low RtpFanout ([media] low_layer: half size; layers.py picks per feed)

The comparison modes that bench/fanout.py measures are chosen here and nowhere else (MODES): the rest
of the relay reads as the default path, with packets encoded once and packetized once.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Callable

import av
from aiortc import RTCRtpSender
from aiortc.mediastreams import MediaStreamTrack

from .. import metrics
from ..clock import SYSTEM_CLOCK, Clock
from ..config import Settings
from .h264_sps import sps_size
from .hls import HlsPublisher
from .hub import FanoutHub
from .pipeline import StreamPipeline
from .recorder import StreamRecorder
from .rtp_fanout import IdleVideoTrack, RtpFanout, RtpOutput, hook_output
from .webrtc import hook_sender


@dataclass(frozen=True)
class MediaMode:
    """What a ``[media] mode`` changes in the graph (the other modes exist for the benchmark)."""

    # Encode once per stream. Without (per-spectator): the hub carries decoded frames, every peer's
    # RTCRtpSender encodes its own copy, and there are no packets for HLS or the recorder to read.
    encode: bool
    # Packetize once (RtpFanout) and only write headers per peer. Without: every peer's RTCRtpSender
    # packetizes a track from the hub (aiortc's usual path).
    fanout: bool


MODES = {
    "encode-once": MediaMode(encode=True, fanout=True),
    "encode-once-sender": MediaMode(encode=True, fanout=False),
    "per-spectator": MediaMode(encode=False, fanout=False),
}
# A sender that encodes for itself wants the newest frame, not a backlog of them.
FRAME_QUEUE = 2
EARLY_EVENTS = 64  # events kept for a recorder that starts at its stream's first keyframe

# (stream_id, *, width, height, fps) -> the recorder of that stream
RecorderFactory = Callable[..., StreamRecorder]


@dataclass(eq=False)
class MediaFeed:
    """One peer's share of the media (a spectator's, or the hosted-API owner peer's): the track its
    transceiver holds and the hooks that make its RTCRtpSender part of the graph."""

    track: MediaStreamTrack
    keyframes: Callable[[], None] | None  # where the peer's PLI/FIR go; None: its sender encodes itself
    fanout: RtpFanout | None  # sends for this peer; None: its sender packetizes the track
    output: RtpOutput | None = None

    def attach(self, sender: RTCRtpSender, on_heard: Callable[[], None] | None = None) -> None:
        """Hook the sender before its description is applied: keyframes, liveness, the fan-out."""
        hook_sender(sender, self.keyframes, on_heard or (lambda: None))
        if self.fanout is not None:
            self.output = self.fanout.add(sender)
            hook_output(sender, self.output)

    def close(self) -> None:
        if self.output is not None:
            self.output.close()
        self.track.stop()


class MediaGraph:
    def __init__(self, settings: Settings, clock: Clock = SYSTEM_CLOCK,
                 recorder: RecorderFactory | None = None) -> None:
        media = settings.media
        self._settings = settings
        self._clock = clock
        self.mode = MODES[media.mode]
        self.hub = FanoutHub(max_queue=media.spectator_queue_packets if self.mode.encode else FRAME_QUEUE)
        self.fanout: RtpFanout | None = None
        # The optional lower layer (half size): its own hub, on the main hub's clock, and its own
        # packetizer; feeds' outputs move between the two by their bandwidth estimates.
        self.low_hub: FanoutHub | None = None
        self.low_fanout: RtpFanout | None = None
        if self.mode.fanout:
            if media.low_layer:
                self.low_hub = FanoutHub(clock_of=self.hub)
                self.low_fanout = RtpFanout(self.low_hub.request_keyframe, on_sent=metrics.count_sent,
                                            compiled=media.send_loop == "auto")
                self.low_hub.add_sink(self.low_fanout.publish)
            self.fanout = RtpFanout(self.hub.request_keyframe, on_sent=metrics.count_sent, lower=self.low_fanout,
                                    compiled=media.send_loop == "auto")
            self.hub.add_sink(self.fanout.publish)
        # Live HLS: one more reader of the hub's packets, for players and CDNs (nothing per viewer).
        self.hls: HlsPublisher | None = None
        if media.hls and self.mode.encode:
            self.hls = HlsPublisher(target_seconds=media.keyframe_interval_seconds,
                                    window=media.hls_window_segments, fps=settings.world_model.fps,
                                    on_segment=metrics.HLS_SEGMENTS.inc)
            self.hub.add_sink(self.hls.write)
        # Recording is one more reader of the stream's packets, never a second encode.
        self._new_recorder = recorder if self.mode.encode else None
        self.recorder: StreamRecorder | None = None  # the live stream's
        self._finishing: set[StreamRecorder] = set()
        self._pipeline: StreamPipeline | None = None
        self._packets_attached = False  # a source of ready-made packets (a cluster edge's feed)
        # A recorded packet stream's recorder starts at its first keyframe: the events before it wait here.
        self._early_events: list[dict] | None = None

    # -- the source ----------------------------------------------------------------------

    @property
    def live(self) -> bool:
        return self._pipeline is not None or self._packets_attached

    @property
    def source_failed(self) -> BaseException | None:
        return self._pipeline.failed if self._pipeline is not None else None

    def attach_source(self, stream_id: str, track: MediaStreamTrack, width: int, height: int, fps: int) -> None:
        """A stream's world-model track feeds the graph from now on (through its own pipeline)."""
        media = self._settings.media
        self._pipeline = StreamPipeline(
            track,
            self.hub,
            width=width,
            height=height,
            fps=fps,
            encode=self.mode.encode,
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
        if self._new_recorder is not None:
            self.recorder = self._new_recorder(stream_id, width=width, height=height, fps=fps)
            self.hub.add_sink(self.recorder.write)
        if self.hls is not None:
            self.hls.new_stream(width, height, fps)
        self._pipeline.start()

    def attach_packets(self, request_keyframe: Callable[[], None], fps: int,
                       stream_id: str | None = None) -> Callable[[av.Packet, bool], None]:
        """A source of ready-made encoded packets (a cluster edge's feed from its origin, a WHIP
        publisher's H.264) feeds the graph from now on, with no pipeline and no encode: it calls the
        returned function once per access unit (keyframe first), and the readers' keyframe requests
        reach ``request_keyframe``. With ``stream_id`` the stream is recorded, at the size its first
        keyframe's SPS declares (the source's own, whatever the config says)."""
        self.hub.attach_source(request_keyframe, fps)
        self._packets_attached = True
        if self.fanout is not None:
            self.fanout.pin(True)  # [media] low_layer: no encoder here makes the lower layer
        if self.hls is not None:
            self.hls.new_stream(0, 0, fps)  # the size is in the stream's own SPS; the muxer needs no other
        if stream_id is None or self._new_recorder is None:
            return self.hub.publish
        new_recorder, publish = self._new_recorder, self.hub.publish
        self._early_events = []

        def publish_recorded(packet: av.Packet, keyframe: bool) -> None:
            if keyframe and self.recorder is None and self._packets_attached:
                size = sps_size(bytes(packet))
                if size is not None:  # a sink added now gets this keyframe first
                    self.recorder = new_recorder(stream_id, width=size[0], height=size[1], fps=fps)
                    self.hub.add_sink(self.recorder.write)
                    events, self._early_events = self._early_events or [], None
                    for event in events:
                        self.recorder.log_event(event)
            publish(packet, keyframe)
        return publish_recorded

    async def detach_source(self, reason: str) -> bool:
        """Stop the live source (False if none was attached); its recording finishes on its own thread."""
        if self._packets_attached:
            self._packets_attached = False
            self._early_events = None
            self.hub.detach_source()
            if self.fanout is not None:
                self.fanout.pin(False)
        else:
            pipeline, self._pipeline = self._pipeline, None
            if pipeline is None:
                return False
            await pipeline.close()
        if self.hls is not None:
            self.hls.end_stream()
        recorder, self.recorder = self.recorder, None
        if recorder is not None:
            self.hub.remove_sink(recorder.write)
            recorder.stop(reason)  # trailer, thumbnail, preview: on its own thread
            self._finishing.add(recorder)
            recorder.done.add_done_callback(lambda _: self._finishing.discard(recorder))
        return True

    @property
    def keyframes_forced(self) -> int:
        """Keyframes the live stream's encoder was asked for (joins, PLI/FIR), after coalescing."""
        return self._pipeline.keyframes_forced if self._pipeline is not None else 0

    def record_event(self, event: dict) -> None:
        """Into the live stream's recording (its events log), if it is being recorded."""
        if self.recorder is not None:
            self.recorder.log_event(event)
        elif self._early_events is not None:
            if event.get("type") == "chat_cleared":
                # The message cleared before the recording began is never written: with the waiting
                # room full, the clear itself would be lost while the text stays.
                cleared = event.get("message_id")
                self._early_events = [e for e in self._early_events
                                      if not (e.get("type") == "chat" and e.get("message_id") == cleared)]
            if len(self._early_events) < EARLY_EVENTS:
                self._early_events.append(event)

    # -- readers -------------------------------------------------------------------------

    def feed(self) -> MediaFeed:
        """A new peer's share: on the default path an idle track on its transceiver (the fan-out
        sends for it); in the comparison modes a track from the hub that its sender reads."""
        if self.fanout is not None:
            return MediaFeed(IdleVideoTrack(), self.hub.request_keyframe, self.fanout)
        return MediaFeed(self.hub.subscribe(), self.hub.request_keyframe if self.mode.encode else None, None)

    async def close(self) -> None:
        """After the source is detached and the feeds closed. A recording finishes even when its
        broadcast goes: this waits for its files."""
        self.hub.close()
        if self.hls is not None:
            self.hls.close()
        if self.low_hub is not None:
            self.low_hub.close()
        await asyncio.gather(*(r.aclose() for r in list(self._finishing)), return_exceptions=True)
