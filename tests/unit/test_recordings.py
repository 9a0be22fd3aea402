"""relay.recordings: listing, safe paths, signed URLs, crash recovery (a real kill -9) and retention."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import av
import pytest

from relay.clock import FakeClock
from relay.media.recorder import write_json_atomic
from relay import recordings
from relay.recordings import FILES, RecordingStore, load_or_create_secret, owner_id, write_shared_events

DAY = 86400.0
NOW = 1_800_000_000.0


def store_at(tmp_path: Path, **kw) -> RecordingStore:
    return RecordingStore(tmp_path / "data", clock=FakeClock(wall=NOW), **kw)


def add(store: RecordingStore, stream_id: str, *, owner: str = "alice", started_at: float = NOW,
        status: str = "complete", files: tuple[str, ...] = ()) -> Path:
    directory = store.root / stream_id
    directory.mkdir(parents=True)
    write_json_atomic(directory / "metadata.json", {
        "stream_id": stream_id, "owner": owner, "width": 320, "height": 176, "fps": 25,
        "started_at": started_at, "ended_at": None if status == "recording" else started_at + 60,
        "duration_seconds": 60.0, "frame_count": 1500, "status": status, "error": None})
    for name in files:
        (directory / name).write_bytes(b"data")
    return directory


# ------------------------------------------------------------------------------------- listing

def test_list_is_newest_first_per_owner_with_pagination(tmp_path):
    store = store_at(tmp_path)
    for i in range(5):
        add(store, f"a{i}", started_at=NOW + i)
    add(store, "b0", owner="bob", started_at=NOW + 100)
    (store.root / "stray-file").write_text("x")  # not a recording
    (store.root / "no-metadata").mkdir()

    page, total = store.list("alice", limit=2, offset=0)
    assert total == 5 and [m["stream_id"] for m in page] == ["a4", "a3"]
    page, total = store.list("alice", limit=2, offset=4)
    assert total == 5 and [m["stream_id"] for m in page] == ["a0"]
    assert store.list("alice", limit=2, offset=10) == ([], 5)
    assert [m["stream_id"] for m in store.list("bob")[0]] == ["b0"]
    assert store.list(None, limit=100)[1] == 6

    # Changes on disk show up (the metadata cache follows the file).
    meta = store.get("a0")
    write_json_atomic(store.root / "a0" / "metadata.json", {**meta, "started_at": NOW + 50})
    assert store.list("alice", limit=1)[0][0]["stream_id"] == "a0"


def test_get_and_summary(tmp_path):
    store = store_at(tmp_path)
    add(store, "a0")
    assert store.get("a0")["frame_count"] == 1500
    assert store.get("missing") is None and store.get("../data") is None
    summary = RecordingStore.summary(store.get("a0"))
    assert summary == {"stream_id": "a0", "width": 320, "height": 176, "started_at": "2027-01-15T08:00:00.000Z",
                       "ended_at": "2027-01-15T08:01:00.000Z", "duration_seconds": 60.0}


def test_owner_id_is_a_hash_not_the_key():
    assert owner_id("secret-key") != "secret-key" and len(owner_id("secret-key")) == 64
    assert owner_id("secret-key") == owner_id("secret-key") != owner_id("other-key")


# ------------------------------------------------------------------------------------- paths

def test_only_known_files_of_valid_ids_resolve(tmp_path):
    store = store_at(tmp_path)
    add(store, "a0", files=tuple(FILES))
    outside = tmp_path / "outside.mp4"
    outside.write_bytes(b"secret")
    for name in FILES:
        assert store.path("a0", name) == (store.root / "a0" / name).resolve()
    refused = [
        ("a0", "metadata.json"), ("a0", "../a0/video.mp4"), ("a0", "/etc/passwd"), ("a0", ""),
        ("..", "video.mp4"), ("../data/recordings/a0", "video.mp4"), ("a0/../a0", "video.mp4"),
        ("a0%2f..", "video.mp4"), (".hidden", "video.mp4"), ("a" * 65, "video.mp4"), ("", "video.mp4"),
        ("missing", "video.mp4"),
    ]
    for stream_id, name in refused:
        assert store.path(stream_id, name) is None, (stream_id, name)
    # A symlink out of the store is not followed.
    add(store, "a1")
    (store.root / "a1" / "video.mp4").symlink_to(outside)
    assert store.path("a1", "video.mp4") is None
    (store.root / "a2").symlink_to(tmp_path)
    assert store.path("a2", "outside.mp4") is None and store.path("a2", "video.mp4") is None
    with pytest.raises(ValueError):
        store.directory("../x")


# -------------------------------------------------------------------------------- signed URLs

def shared_of(data: bytes, size: int | None = None) -> bytes:
    out = io.BytesIO()
    write_shared_events(io.BytesIO(data), len(data) if size is None else size, out)
    return out.getvalue()


def test_the_shared_log_drops_cleared_chat_and_torn_lines_and_follows_the_file(tmp_path):
    lines = [
        {"type": "stream_started", "offset_ms": 0, "prompt": "a harbour"},
        {"type": "chat", "offset_ms": 10, "message_id": "m1", "name": "ana", "text": "kept"},
        {"type": "chat", "offset_ms": 20, "message_id": "m2", "name": "ben", "text": "gone secret"},
        {"type": "chat", "offset_ms": 30, "message_id": ["m1"], "text": "no string id: cannot be matched"},
        {"type": "chat_cleared", "offset_ms": 40, "message_id": "m2"},
        {"type": "chat_cleared", "offset_ms": 41, "message_id": {"odd": 1}},  # not an id: names nothing
    ]
    text = "".join(json.dumps(line) + "\n" for line in lines) + '[1]\n\n{"type": "chat", "message_id": "m3", "text": "torn'
    shared = shared_of(text.encode())
    kept = [json.loads(line) for line in shared.decode().splitlines()]
    assert kept == [lines[0], lines[1], lines[4], lines[5]]
    assert b"gone secret" not in shared and b"torn" not in shared and b"no string id" not in shared
    # Only the bytes the log had when the view began: a line still being written is not half-read.
    whole = "".join(json.dumps(line) + "\n" for line in lines[:2]).encode()
    assert shared_of(whole + whole, len(whole) + 10) == whole

    store = store_at(tmp_path)
    directory = add(store, "s1")
    assert store.shared_events_view("s1") is None  # no log yet
    events = directory / "events.jsonl"
    events.write_text(text)
    view = store.shared_events_view("s1")
    assert view == directory / "events.shared.jsonl" and view.read_bytes() == shared
    with events.open("a") as log:  # a clear written later (after the stream ended) counts at once
        log.write("\n" + json.dumps({"type": "chat_cleared", "offset_ms": 60, "message_id": "m1"}) + "\n")
    assert b"kept" not in store.shared_events_view("s1").read_bytes()
    assert store.shared_events_view("../s1") is None and store.shared_events_view("nope") is None
    assert store.path("s1", "events.shared.jsonl") is None  # the view has no URL of its own
    assert [p.name for p in directory.iterdir() if p.name.endswith(".tmp")] == []


async def test_a_crowd_reading_the_shared_log_makes_one_view_remade_only_when_the_log_changes(tmp_path, monkeypatch):
    store = store_at(tmp_path)
    directory = add(store, "s1")
    chat = [{"type": "chat", "offset_ms": i, "message_id": f"m{i}", "name": "ana", "text": f"message {i} " * 8}
            for i in range(20_000)]  # ~3.5 MB: a view takes long enough for the crowd to overlap
    (directory / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in chat))
    made = []

    def counted(source, size, out):
        made.append(size)
        write_shared_events(source, size, out)
    monkeypatch.setattr(recordings, "write_shared_events", counted)

    views = await asyncio.gather(*(store.shared_events("s1") for _ in range(50)))
    assert set(views) == {directory / "events.shared.jsonl"} and len(made) == 1
    assert await store.shared_events("s1") == views[0] and len(made) == 1  # unchanged: read as it is
    assert store._sharing == {}

    assert await asyncio.to_thread(store.append_event, "s1", {"type": "chat_cleared", "message_id": "m7"})
    view = await store.shared_events("s1")
    assert len(made) == 2 and b"message 7 " not in view.read_bytes() and b"message 8 " in view.read_bytes()

    # A reader arriving while a view is being made from the log as it was before a clear does not get that
    # view: the readers who came during it look once more, together, after it.
    (directory / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in chat))
    first = asyncio.ensure_future(store.shared_events("s1"))
    await asyncio.sleep(0.01)
    assert await asyncio.to_thread(store.append_event, "s1", {"type": "chat_cleared", "message_id": "m9"})
    late = await asyncio.gather(*(store.shared_events("s1") for _ in range(10)))
    await first
    assert b"message 9 " not in late[0].read_bytes() and len(made) <= 4 and store._sharing == {}


def test_a_late_clear_is_appended_at_the_videos_end_apart_from_a_torn_line(tmp_path):
    store = store_at(tmp_path)
    directory = add(store, "s1")
    clear = {"type": "chat_cleared", "message_id": "m1", "after_end": True}
    assert store.append_event("s1", clear) is False  # no log: nothing to add to
    (directory / "events.jsonl").write_text('{"type": "chat", "message_id": "m1", "text": "late"}\n{"type": "ch')
    assert store.append_event("s1", clear) is True
    lines = (directory / "events.jsonl").read_text().splitlines()
    assert lines[1] == '{"type": "ch' and json.loads(lines[2]) == {**clear, "offset_ms": 60000}
    assert b"late" not in store.shared_events_view("s1").read_bytes()
    assert store.append_event("nope", clear) is False and store.append_event("../s1", clear) is False


def test_signed_urls_refuse_tampering_and_expiry(tmp_path):
    store = store_at(tmp_path)
    path = "/v1/recordings/a0/video.mp4"
    url = store.signed_url(path)
    query = dict(part.split("=", 1) for part in url.split("?", 1)[1].split("&"))
    expires, signature = query["expires"], query["signature"]
    assert url.startswith(path + "?") and int(expires) == int(NOW) + 3600

    assert store.verify(path, expires, signature)
    assert store.verify(path, expires, signature, now=NOW + 3599)
    assert not store.verify(path, expires, signature, now=NOW + 3600)  # an hour, no more
    assert not store.verify("/v1/recordings/a0/events.jsonl", expires, signature)  # another file
    assert not store.verify("/v1/recordings/a1/video.mp4", expires, signature)  # another recording
    assert not store.verify(path, str(int(expires) + 86400), signature)  # a longer life
    assert not store.verify(path, "0" + expires, signature)
    flipped = signature[:-1] + ("A" if signature[-1] != "A" else "B")
    assert not store.verify(path, expires, flipped)
    for bad in (None, "", "not-a-number", "1e12"):
        assert not store.verify(path, bad, signature)
    assert not store.verify(path, expires, None) and not store.verify(path, expires, "")
    # A signature from another server (another secret) is worthless here; this server's survives a restart.
    other = RecordingStore(tmp_path / "other", clock=FakeClock(wall=NOW))
    assert not other.verify(path, expires, signature)
    assert store_at(tmp_path).verify(path, expires, signature)


def test_secret_is_created_once_private(tmp_path):
    path = tmp_path / "data" / "url-signing.key"
    first = load_or_create_secret(path)
    assert len(first) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_secret(path) == first
    assert not [p for p in path.parent.iterdir() if p.name != path.name]  # no temporary file left
    path.write_text("short\n")
    with pytest.raises(ValueError):
        load_or_create_secret(path)


# ------------------------------------------------------------------------------------ retention

def test_sweep_deletes_only_what_is_past_retention(tmp_path):
    store = store_at(tmp_path, retention_days=30)
    add(store, "old", started_at=NOW - 31 * DAY)
    add(store, "young", started_at=NOW - 29 * DAY)
    add(store, "live", started_at=NOW - 40 * DAY, status="recording")  # only recover() finalizes it
    (store.root / "old" / "events.jsonl").write_text('{"type": "chat", "message_id": "m1", "text": "hi"}\n')
    assert store.shared_events_view("old").is_file()
    assert store.sweep() == ["old"]
    assert sorted(p.name for p in store.root.iterdir()) == ["live", "young"]  # the shared view went with it
    assert store.get("old") is None and store.shared_events_view("old") is None and "old" not in store._shared
    assert store_at(tmp_path, retention_days=0).sweep(now=NOW + 1000 * DAY) == []  # keep forever
    assert store.sweep(now=NOW + 2 * DAY) == ["young"]


# ------------------------------------------------------------------------------ crash recovery

CHILD = textwrap.dedent("""
    import fractions, signal, sys, time
    from relay.media.encoder import H264Encoder
    from relay.recordings import RecordingStore
    from relay.worldmodel.scene import SceneRenderer

    W, H, FPS = 320, 176, 25
    store = RecordingStore(sys.argv[1])
    rec = store.recorder("crashed1", width=W, height=H, fps=FPS, owner="alice", connection_id="c1")
    rec.log_event({"type": "stream_started", "prompt": "a meadow"})
    encoder, renderer = H264Encoder(W, H, FPS, 400, 2.0), SceneRenderer(W, H)
    for i in range(90):
        frame = renderer.render(i / FPS)
        frame.pts, frame.time_base = i * 3600, fractions.Fraction(1, 90000)
        for packet in encoder.encode(frame):
            rec.write(packet, packet.is_keyframe)
    while rec.frame_count < 90:  # everything handed to the writer; its last fragment is still open
        time.sleep(0.005)
    print("ready", flush=True)
    signal.pause()  # the test kill -9s this process here
""")


def test_kill_9_mid_stream_leaves_a_playable_partial_recording(tmp_path):
    data_dir = tmp_path / "data"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(data_dir)], stdout=subprocess.PIPE, env=env)
    try:
        assert child.stdout.readline().strip() == b"ready"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    directory = data_dir / "recordings" / "crashed1"
    assert json.loads((directory / "metadata.json").read_text())["status"] == "recording"
    # A torn write: the kill landed in the middle of the next fragment's moof.
    with open(directory / "video.mp4", "ab") as file:
        file.write(b"\x00\x00\x02\x00moof\x00\x00\x00\x10mfhd")

    store = RecordingStore(data_dir)
    assert store.recover() == ["crashed1"]
    assert store.recover() == []  # once is enough
    page, total = store.list("alice")
    assert total == 1
    meta = page[0]
    assert meta["status"] == "partial" and meta["error"]
    assert meta["connection_id"] == "c1" and meta["ended_at"] >= meta["started_at"]
    # Fragments close every second: of 90 frames (3.6 s) at least the first 3 s survive.
    assert 75 <= meta["frame_count"] <= 90
    assert abs(meta["duration_seconds"] - meta["frame_count"] / 25) < 0.05
    container = av.open(str(directory / "video.mp4"))
    frames = list(container.decode(container.streams.video[0]))
    container.close()
    assert len(frames) == meta["frame_count"] and frames[0].pts == 0
    assert (directory / "thumbnail.jpg").read_bytes()[:2] == b"\xff\xd8"
    assert (directory / "preview.mp4").stat().st_size > 0
    assert json.loads((directory / "events.jsonl").read_text().splitlines()[0])["prompt"] == "a meadow"


def test_recover_without_video_marks_failed(tmp_path):
    store = store_at(tmp_path)
    add(store, "early", status="recording")  # killed before the first keyframe
    (store.root / "early" / ".metadata.json.tmp").write_text("{")  # a torn atomic write
    assert store.recover() == ["early"]
    meta = store.get("early")
    assert meta["status"] == "failed" and meta["frame_count"] == 0 and meta["error"]
    assert not (store.root / "early" / ".metadata.json.tmp").exists()


# ----------------------------------------------------------------- a recording the disk refused

def test_a_recording_the_disk_refused_is_still_listed_as_failed(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "recordings").write_text("a file where the directory should be")
    store = RecordingStore(data_dir, clock=FakeClock(wall=NOW))
    rec = store.recorder("s1", width=320, height=176, fps=25, owner="alice")
    rec.log_event({"type": "stream_started", "prompt": "x"})
    deadline = time.monotonic() + 5
    while not rec.failed and time.monotonic() < deadline:
        time.sleep(0.01)
    live = store.get("s1")  # during the stream: failed, with the reason
    assert live["status"] == "failed" and "Not a directory" in live["error"]
    result = rec.close("ended")
    assert result.status == "failed"
    page, total = store.list("alice")
    assert total == 1 and page[0]["status"] == "failed" and page[0]["end_reason"] == "ended"
    assert store.list("bob") == ([], 0)
