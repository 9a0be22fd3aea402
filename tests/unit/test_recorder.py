"""relay.media.recorder: the shared packets muxed into fragmented MP4, events, thumbnail, preview, failures."""

from __future__ import annotations

import asyncio
import errno
import fractions
import json
import struct
import threading
import time

import av
import pytest

from relay.clock import FakeClock
from relay.media.encoder import H264Encoder
from relay.media.recorder import StreamRecorder, probe_video, repair_video
from relay.worldmodel.scene import SceneRenderer

W, H, FPS = 320, 176, 25
TB = fractions.Fraction(1, 90000)


def encode(frames: int, pts_offset: int = 0) -> list[av.Packet]:
    """A real stream's packets: the relay's encoder (2 s GOP) over the synthetic world."""
    encoder = H264Encoder(W, H, FPS, 400, 2.0)
    renderer = SceneRenderer(W, H)
    packets = []
    for i in range(frames):
        frame = renderer.render(i / FPS)
        frame.pts, frame.time_base = i * 3600, TB
        packets += encoder.encode(frame)
    encoder.close()
    for packet in packets:  # as the hub hands them on: on its continuous broadcast clock
        packet.pts = packet.dts = packet.pts + pts_offset
    return packets


@pytest.fixture(scope="module")
def packets() -> list[av.Packet]:
    return encode(100, pts_offset=7_654_321)


def boxes(path) -> list[tuple[bytes, int, int]]:
    data = path.read_bytes()
    out, pos = [], 0
    while pos + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        out.append((kind, pos, size))
        pos += size
    return out


def decode(path) -> list[av.VideoFrame]:
    with av.open(str(path)) as container:
        return list(container.decode(container.streams.video[0]))


def recorder(directory, clock=None, **kw) -> StreamRecorder:
    return StreamRecorder(directory, stream_id="s1", width=W, height=H, fps=FPS, owner="owner-1",
                          connection_id="c1", broadcast_id="b1", clock=clock or FakeClock(), **kw)


# ---------------------------------------------------------------------------------- a whole stream

@pytest.fixture(scope="module")
def recording(packets, tmp_path_factory):
    """A 4 s stream (100 frames at 25 fps, fed as fast as they come) with prompts and spectators."""
    directory = tmp_path_factory.mktemp("rec") / "s1"
    clock = FakeClock()
    before = [(p.pts, p.dts, bytes(p)) for p in packets]
    rec = recorder(directory, clock, preview_seconds=2.0)
    rec.log_event({"type": "stream_started", "prompt": "a meadow"})
    counts = {10: 0, 20: 3, 30: 3, 40: 5, 60: 2}
    for i, packet in enumerate(packets):
        rec.write(packet, packet.is_keyframe)
        if i == 50:
            rec.log_event({"type": "prompt_applied", "prompt": "night", "source": "host", "mode": "host"})
        if i == 75:
            rec.log_event({"type": "prompt_applied", "prompt": "rain", "source": "participant",
                           "participant_id": "p7", "mode": "queue"})
        if i in counts:
            rec.log_event({"type": "viewers", "count": counts[i]})
        clock.advance(1 / FPS)
    result = rec.close("ended")
    after = [(p.pts, p.dts, bytes(p)) for p in packets]
    return directory, result, before == after, rec


def test_video_decodes_as_h264_of_the_right_length(recording):
    directory, result, _, _ = recording
    meta = json.loads((directory / "metadata.json").read_text())
    container = av.open(str(directory / "video.mp4"))
    stream = container.streams.video[0]
    assert stream.codec_context.name == "h264"
    assert (stream.codec_context.width, stream.codec_context.height) == (W, H)
    assert abs(container.duration / 1e6 - 4.0) <= 0.5
    frames = list(container.decode(stream))
    container.close()
    assert abs(len(frames) - 100) <= 5
    assert len(frames) == meta["frame_count"] == result.frame_count
    assert frames[0].pts == 0 and frames[0].time == 0  # starts at zero, whatever the hub's clock said
    assert abs(meta["duration_seconds"] - 4.0) <= 0.5
    assert result.status == meta["status"] == "complete" and meta["error"] is None


def test_video_is_fragmented_with_avcc_and_moov_first(recording):
    directory = recording[0]
    kinds = [kind for kind, _, _ in boxes(directory / "video.mp4")]
    assert kinds[:2] == [b"ftyp", b"moov"]
    assert kinds.count(b"moof") >= 4  # a fragment at least every second: a crash loses one at most
    assert kinds[-1] == b"mfra"  # closed properly
    data = (directory / "video.mp4").read_bytes()
    assert b"avcC\x01\x42" in data  # avcC, constrained baseline (profile_idc 66)


def test_packets_are_not_touched(recording):
    assert recording[2], "the recorder changed a packet the spectators share"


def test_events_log_in_order_with_offsets(recording):
    directory = recording[0]
    events = [json.loads(line) for line in (directory / "events.jsonl").read_text().splitlines()]
    assert [e["type"] for e in events] == [
        "stream_started", "viewers", "viewers", "viewers", "prompt_applied", "viewers", "prompt_applied",
        "stream_ended"]
    assert events[0]["prompt"] == "a meadow"
    prompts = [e for e in events if e["type"] == "prompt_applied"]
    assert [p["prompt"] for p in prompts] == ["night", "rain"]
    assert prompts[1]["participant_id"] == "p7" and prompts[1]["mode"] == "queue"
    assert [e["count"] for e in events if e["type"] == "viewers"] == [0, 3, 5, 2]  # changes only
    assert events[-1]["reason"] == "ended"
    offsets = [e["offset_ms"] for e in events]
    assert offsets == sorted(offsets) and offsets[0] == 0
    assert abs(prompts[0]["offset_ms"] - 2000) <= 40  # on the video's timeline: frame 50 is at 2 s


def test_metadata(recording):
    directory, _, _, rec = recording
    meta = json.loads((directory / "metadata.json").read_text())
    assert meta["stream_id"] == "s1" and meta["owner"] == "owner-1"
    assert (meta["connection_id"], meta["broadcast_id"]) == ("c1", "b1")
    assert (meta["width"], meta["height"], meta["fps"]) == (W, H, FPS)
    assert meta["peak_spectators"] == 5
    assert meta["ended_at"] >= meta["started_at"] > 0
    assert meta["end_reason"] == "ended"
    assert not list(directory.glob(".*"))  # no temporary files left


def test_thumbnail_is_a_jpeg_of_the_stream_aspect(recording):
    path = recording[0] / "thumbnail.jpg"
    assert path.read_bytes()[:3] == b"\xff\xd8\xff"
    frames = decode(path)
    assert frames[0].width == 320
    assert abs(frames[0].width / frames[0].height - W / H) < 0.02


def test_preview_is_short_small_and_browser_friendly(recording):
    path = recording[0] / "preview.mp4"
    container = av.open(str(path))
    stream = container.streams.video[0]
    assert stream.codec_context.name == "h264"
    assert stream.codec_context.profile == "Constrained Baseline"
    frames = list(container.decode(stream))
    container.close()
    assert frames[0].format.name == "yuv420p" and frames[0].width <= 320
    assert abs(len(frames) - 2 * FPS) <= 2  # preview_seconds=2.0
    kinds = [kind for kind, _, _ in boxes(path)]
    assert kinds.index(b"moov") < kinds.index(b"mdat")  # +faststart: plays while downloading


# ------------------------------------------------------------------------------- starts and ends

def test_skips_to_the_first_keyframe(packets, tmp_path):
    rec = recorder(tmp_path / "s1")
    for packet in packets[1:]:  # joined mid-GOP: the next keyframe is frame 50
        rec.write(packet, packet.is_keyframe)
    result = rec.close("ended")
    assert rec.packets_skipped == 49
    assert result.frame_count == 50 and result.status == "complete"
    frames = decode(tmp_path / "s1" / "video.mp4")
    assert len(frames) == 50 and frames[0].pts == 0


def test_close_is_safe_twice_and_async(packets, tmp_path):
    async def run():
        rec = recorder(tmp_path / "s1")
        for packet in packets[:30]:
            rec.write(packet, packet.is_keyframe)
        first = await rec.aclose("ended")
        rec.write(packets[30], False)  # after the end: ignored
        rec.log_event({"type": "prompt_applied", "prompt": "late"})
        return first, rec.close("other"), await rec.aclose()

    first, second, third = asyncio.run(run())
    assert first == second == third and first.frame_count == 30
    assert "late" not in (tmp_path / "s1" / "events.jsonl").read_text()


def test_a_stream_without_a_keyframe_records_nothing(packets, tmp_path):
    rec = recorder(tmp_path / "s1")
    for packet in packets[1:40]:
        rec.write(packet, False)
    result = rec.close("ended")
    assert result.status == "failed" and "keyframe" in result.error
    assert json.loads((tmp_path / "s1" / "metadata.json").read_text())["status"] == "failed"


# -------------------------------------------------------------------------- failures stay local

def test_unwritable_directory_marks_the_recorder_failed(packets, tmp_path):
    (tmp_path / "file").write_text("not a directory")
    rec = recorder(tmp_path / "file" / "s1")  # root can write anywhere, but not under a file
    rec.log_event({"type": "stream_started", "prompt": "x"})
    for packet in packets:
        rec.write(packet, packet.is_keyframe)  # must not raise
    result = rec.close("ended")
    assert rec.failed and result.status == "failed"
    assert "Not a directory" in result.error


class FailingRecorder(StreamRecorder):
    """The disk fills up after 30 frames."""

    def _mux(self, data, pts, keyframe):
        if self.frame_count == 30:
            raise OSError(errno.ENOSPC, "No space left on device")
        super()._mux(data, pts, keyframe)


def test_disk_full_stops_only_the_recording(packets, tmp_path):
    rec = FailingRecorder(tmp_path / "s1", stream_id="s1", width=W, height=H, fps=FPS)
    for packet in packets:
        rec.write(packet, packet.is_keyframe)
    result = rec.close("ended")
    assert result.status == "failed" and "No space left on device" in result.error
    meta = json.loads((tmp_path / "s1" / "metadata.json").read_text())
    assert meta["status"] == "failed" and "No space left" in meta["error"]
    frames = decode(tmp_path / "s1" / "video.mp4")  # what was written before still plays
    assert len(frames) == 30


class StuckRecorder(StreamRecorder):
    release = threading.Event()

    def _mux(self, data, pts, keyframe):
        self.release.wait(5)
        super()._mux(data, pts, keyframe)


def test_a_stuck_disk_never_blocks_the_caller(packets, tmp_path):
    rec = StuckRecorder(tmp_path / "s1", stream_id="s1", width=W, height=H, fps=FPS, max_queue=16)
    started = time.perf_counter()
    for packet in packets:
        rec.write(packet, packet.is_keyframe)
    elapsed = time.perf_counter() - started
    assert elapsed < 0.1
    assert rec.failed and "behind" in rec.error
    rec.release.set()
    assert rec.close("ended").status == "failed"


# ------------------------------------------------------------------------- the file after a crash

def test_repair_cuts_back_to_the_last_whole_fragment(recording, tmp_path):
    data = (recording[0] / "video.mp4").read_bytes()
    moofs = [(pos, size) for kind, pos, size in boxes(recording[0] / "video.mp4") if kind == b"moof"]
    pos, size = moofs[2]
    for cut in (pos + size // 2, pos + size + 100):  # inside the third moof, inside its mdat
        path = tmp_path / "cut.mp4"
        path.write_bytes(data[:cut])
        assert repair_video(path)
        assert path.stat().st_size == pos
        info = probe_video(path)
        frames = decode(path)
        assert len(frames) == info.frame_count == 50 and not info.finished
        assert abs(info.duration_seconds - 2.0) < 0.05
    path.write_bytes(data[:moofs[0][0] - 10])  # the moov cut short: nothing to keep
    assert not repair_video(path)
