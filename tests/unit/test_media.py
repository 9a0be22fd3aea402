"""The media path's rules, tested on real packets from the real encoder (no network)."""

from __future__ import annotations

import fractions
import json

import av
import numpy as np

from relay.config import Settings
from relay.media.encoder import VIDEO_TIME_BASE, H264Encoder
from relay.media.graph import EARLY_EVENTS, MediaGraph
from relay.media.hls import HLS_READERS_KEPT, READER_TARGET_DURATIONS, HlsPublisher
from relay.media.hub import FanoutHub
from relay.media.pipeline import KEYFRAME_MIN_INTERVAL, StreamPipeline
from relay.media.recorder import StreamRecorder
from relay.media.rtp_fanout import HISTORY, RtpFanout
from relay.clock import FakeClock
from relay.worldmodel.synthetic import SyntheticTrack


def encoded_packets(
    n: int, keyframes_at: set[int] = frozenset(), size: tuple[int, int] = (64, 48), noisy: bool = False,
) -> list[av.Packet]:
    """Real H.264 packets, one per frame at 25 fps; noisy frames span several RTP packets each."""
    width, height = size
    encoder = H264Encoder(width, height, 25, 2000 if noisy else 300, keyframe_interval_seconds=2.0)
    noise = np.random.default_rng(13)
    packets = []
    for i in range(n):
        pixels = (noise.integers(0, 256, (height, width, 3), np.uint8) if noisy
                  else np.full((height, width, 3), (i * 7) % 255, np.uint8))
        frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
        frame.pts, frame.time_base = i * 3600, fractions.Fraction(1, 90000)
        packets += encoder.encode(frame, force_keyframe=i in keyframes_at)
    encoder.close()
    return packets


async def test_spectator_starts_on_a_keyframe_and_a_slow_one_skips_to_the_next():
    requests = []
    hub = FanoutHub(max_queue=4)
    hub.attach_source(lambda: requests.append(1), fps=25)
    packets = encoded_packets(60, keyframes_at={20, 40})
    for p in packets[:5]:
        hub.publish(p, p.is_keyframe)
    track = hub.subscribe()  # joins mid-GOP
    for p in packets[5:12]:
        hub.publish(p, p.is_keyframe)
    assert requests, "a join asks for a keyframe"
    assert track.dropped == 7 and not track._queue  # nothing until a keyframe
    hub.publish(packets[20], True)
    assert (await track.recv()).is_keyframe
    # Never read: the queue fills, then everything up to the next keyframe is dropped.
    requests.clear()
    for p in packets[21:30]:
        hub.publish(p, p.is_keyframe)
    assert len(track._queue) <= 4 and requests, "overflow asks for a keyframe"
    hub.publish(packets[40], True)
    first = await track.recv()
    assert first.is_keyframe, "after overflow the spectator restarts on a keyframe"
    track.stop()
    assert hub.subscribers == 0


def test_timestamps_continue_across_streams():
    hub = FanoutHub()
    seen = []
    hub.add_sink(lambda item, keyframe: seen.append(item.pts))
    for _stream in range(2):
        hub.attach_source(None, fps=25)
        for p in encoded_packets(10):
            hub.publish(p, p.is_keyframe)
    assert seen == sorted(seen) and len(set(seen)) == 20
    assert seen[10] - seen[9] == 3600  # the next stream starts one frame after the last


async def test_a_joining_crowd_costs_at_most_two_keyframes_a_second():
    clock = FakeClock()
    source = SyntheticTrack(64, 48, 25)
    hub = FanoutHub()
    pipeline = StreamPipeline(source, hub, width=64, height=48, fps=25, clock=clock.monotonic)
    pipeline.start()
    try:
        forced = 0
        for _ in range(50):  # 50 joins spread over one second
            pipeline.request_keyframe()
            forced += pipeline._take_keyframe_request()
            clock.advance(0.02)
        assert forced == 2  # at 0 s and 0.6 s
        assert KEYFRAME_MIN_INTERVAL >= 0.5
    finally:
        await pipeline.close()


def test_rtp_history_serves_nacks_by_sequence_number():
    fanout = RtpFanout(lambda: None)
    packets = encoded_packets(30)
    for p in packets:
        fanout.publish(p, p.is_keyframe)
    total = fanout._index
    assert fanout.lookup((total - 1) & 0xFFFF) is not None
    marker, _, payload = fanout.lookup((total - 1) & 0xFFFF)
    assert marker and payload
    assert fanout.lookup((total + 5) & 0xFFFF) is None  # not sent yet
    if total > HISTORY:
        assert fanout.lookup(0) is None  # fell out of the history


def test_hls_segments_cut_at_keyframes_within_a_fixed_target_and_count_discontinuities():

    encoder = H264Encoder(64, 48, 25, 300, 1.0, preset="ultrafast")  # a keyframe every 25 frames
    hls = HlsPublisher(target_seconds=1.0, window=3, fps=25)
    assert hls.target_duration == 2  # 1.5 intervals, rounded up: the longest a segment can be
    hls.new_stream(64, 48, 25)
    pts = 0

    def feed(frames: int, forced: set[int]) -> None:
        nonlocal pts
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i, np.uint8), format="rgb24")
            frame.pts, frame.time_base = pts, VIDEO_TIME_BASE
            for packet in encoder.encode(frame, force_keyframe=i in forced):
                hls.write(packet, packet.is_keyframe)
            pts += 3600

    # Keyframes at 0, 25, 30 (forced: under half a segment in, no cut), 40 (forced: cuts),
    # then x264 counts from there: 65, 90.
    feed(100, forced={0, 30, 40})
    assert [hls.segment(n).duration for n in range(4)] == [1.0, 0.6, 1.0, 1.0] and hls.segment(4) is None
    hls.end_stream()  # the stream's tail is published at once, not when the next one starts
    assert hls.segment(4).duration == 0.4
    hls.new_stream(64, 48, 25)  # the next stream's first segment is marked
    feed(50, forced={0})
    assert hls.segment(5).discontinuity and not hls.segment(4).discontinuity
    playlist = hls.playlist("?token=t")
    assert "#EXT-X-TARGETDURATION:2\n" in playlist and "#EXT-X-MEDIA-SEQUENCE:0\n" in playlist
    assert playlist.count("#EXT-X-DISCONTINUITY\n") == 1 and "\n5.ts?token=t\n" in playlist
    feed(200, forced=set())  # 8 s more: the marked segment leaves; 6 s (3 targets) stay listed
    playlist = hls.playlist()
    assert "#EXT-X-DISCONTINUITY\n" not in playlist and "#EXT-X-DISCONTINUITY-SEQUENCE:1\n" in playlist
    assert "#EXT-X-TARGETDURATION:2\n" in playlist and playlist.count("#EXTINF:1.000,") == 6
    assert hls.segments == 6 + 3
    hls.close()
    assert hls.segments == 0


def test_hls_counts_the_addresses_still_reading_its_playlist():
    hls = HlsPublisher(target_seconds=1.0, window=3, fps=25)
    gone_after = READER_TARGET_DURATIONS * hls.target_duration
    hls.note_reader("10.0.0.1", 100.0)
    hls.note_reader("10.0.0.2", 100.0)
    hls.note_reader("10.0.0.1", 100.5)  # the same player re-reading: still one viewer
    assert hls.readers(101.0) == 2
    hls.note_reader("10.0.0.1", 100.0 + gone_after)
    assert hls.readers(100.1 + gone_after) == 1  # .2 stopped reading: gone
    for n in range(HLS_READERS_KEPT + 5):  # a crowd of addresses: remembered up to the bound
        hls.note_reader(f"a{n}", 200.0)
    assert hls.readers(200.0) == HLS_READERS_KEPT
    hls.close()


async def test_a_message_cleared_before_a_packet_streams_recording_began_is_never_written(tmp_path):
    # A packet source's recorder starts at its first keyframe; the events before it wait, EARLY_EVENTS at
    # most. A clear arriving once that room is full must still keep its message's text out of the log.
    def new_recorder(stream_id, *, width, height, fps):
        return StreamRecorder(tmp_path / stream_id, stream_id=stream_id, width=width, height=height, fps=fps)
    graph = MediaGraph(Settings(), FakeClock(), recorder=new_recorder)
    publish = graph.attach_packets(lambda: None, 25, "s1")
    graph.record_event({"type": "chat", "message_id": "m1", "name": "ana", "text": "secret early"})
    graph.record_event({"type": "chat", "message_id": "m2", "name": "ana", "text": "kept early"})
    for count in range(EARLY_EVENTS):
        graph.record_event({"type": "viewers", "count": count})
    graph.record_event({"type": "chat_cleared", "message_id": "m1"})
    for packet in encoded_packets(5):
        publish(packet, packet.is_keyframe)
    recorder = graph.recorder
    assert recorder is not None
    await graph.detach_source("ended")
    await recorder.aclose()
    text = (tmp_path / "s1" / "events.jsonl").read_text()
    assert "secret early" not in text and "kept early" in text
    kinds = [json.loads(line)["type"] for line in text.splitlines()]
    assert kinds[-1] == "stream_ended" and len(kinds) - 1 == EARLY_EVENTS  # the room stayed bounded
    assert kinds[0] == "chat" and kinds[-2] == "chat_cleared"  # the clear took its message's place
