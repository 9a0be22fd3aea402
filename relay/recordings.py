"""Recordings on disk: data_dir/recordings/<stream_id>/{video.mp4, events.jsonl, thumbnail.jpg, preview.mp4, metadata.json}
(and events.shared.jsonl, the shared link's view of events.jsonl, made when a link first reads it).

The store knows no HTTP: it lists and finds recordings (from each one's metadata.json), hands out
paths only for the known file names of a well-formed stream id, signs and verifies the URLs the API
gives to browsers, finalizes what a crash left behind (``recover``) and deletes what is past its
retention (``sweep``). Its methods do blocking file I/O: call them from a thread
(``asyncio.to_thread``) where a directory may be large or the disk slow; ``recover`` at start-up runs
a demuxer over each unfinished video.

A recording's metadata (metadata.json) holds: stream_id, owner, connection_id, broadcast_id, width,
height, fps, started_at and ended_at (wall-clock seconds; ended_at null while recording),
duration_seconds, frame_count, peak_spectators, end_reason, status ("recording" | "complete" |
"failed" | "partial") and error.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import shutil
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from .clock import SYSTEM_CLOCK, Clock, iso
from .media.recorder import (
    EVENTS_FILE,
    METADATA_FILE,
    PREVIEW_FILE,
    STATUS_COMPLETE,
    STATUS_FAILED,
    STATUS_PARTIAL,
    STATUS_RECORDING,
    THUMBNAIL_FILE,
    VIDEO_FILE,
    StreamRecorder,
    make_previews,
    probe_video,
    repair_video,
    save_metadata,
)

__all__ = ["RecordingStore", "owner_id", "load_or_create_secret", "write_shared_events", "FILES", "URL_TTL_SECONDS",
           "STREAM_ID", "SHARED_EVENTS_PATH", "SHARED_EVENTS_FILE"]

log = logging.getLogger(__name__)

# The files a recording serves, with their content types; nothing else under the root is reachable.
FILES: dict[str, str] = {
    VIDEO_FILE: "video/mp4",
    EVENTS_FILE: "application/x-ndjson; charset=utf-8",
    THUMBNAIL_FILE: "image/jpeg",
    PREVIEW_FILE: "video/mp4",
}
# The recording object's link to each of them (docs/api.md).
LINKED_FILES = {"video_url": VIDEO_FILE, "events_url": EVENTS_FILE, "thumbnail_url": THUMBNAIL_FILE,
                "preview_url": PREVIEW_FILE}

# A link's view of events.jsonl (relay/api/recordings.py): under the replay page's path, so the signature a
# link's info hands out can never open the raw log, which keeps the text of chat the host cleared.
SHARED_EVENTS_PATH = "/recordings/{stream_id}/" + EVENTS_FILE
# What that path serves: the log less cleared chat, written beside it (not in FILES: no other URL opens it)
# and rewritten when the log changes, so a crowd reading one link costs one pass over the log, not one each.
SHARED_EVENTS_FILE = "events.shared.jsonl"
# Which version of each log its view was made from, remembered for this many streams (the least recently
# read forgotten first: its view is then made once more, nothing else).
_SHARED_EVENTS_KEPT = 4096

# Stream ids are uuid4().hex; accept any plain token of that kind, never a dot or a slash.
STREAM_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")

URL_TTL_SECONDS = 3600
SECRET_FILE = "url-signing.key"
_SECRET_BYTES = 32
# Finished recordings whose metadata.json could not be written (full disk...), still shown from memory.
_UNSAVED_KEPT = 256


def owner_id(api_key: str) -> str:
    """What a recording stores for its owner: never the API key itself, a hash of it."""
    return hashlib.sha256(api_key.encode()).hexdigest()


def load_or_create_secret(path: str | os.PathLike[str]) -> bytes:
    """The server's signing secret: created once (0600, atomically, first writer wins), then read."""
    path = Path(path)
    try:
        return _read_secret(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as file:
            file.write(secrets.token_hex(_SECRET_BYTES) + "\n")
            file.flush()
            os.fsync(file.fileno())
        try:
            os.link(tmp, path)  # unlike rename, never replaces a secret another process just made
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)
    return _read_secret(path)


def _read_secret(path: Path) -> bytes:
    text = path.read_text().strip()
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        secret = b""
    if len(secret) < 16:
        raise ValueError(f"{path}: not a signing secret (expected at least 32 hex digits); delete it to make a new one")
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o600)
    return secret


class RecordingStore:
    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        retention_days: float = 30.0,
        preview_seconds: float = 5.0,
        preview_width: int = 320,
        writer_queue_packets: int = 512,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.root = self.data_dir / "recordings"
        self.retention_days = retention_days
        self.preview_seconds = preview_seconds
        self.preview_width = preview_width
        self.writer_queue_packets = writer_queue_packets
        self._clock = clock
        self._secret: bytes | None = None
        # stream_id -> ((mtime_ns, size) of metadata.json, metadata): list() re-reads only what changed.
        self._cache: dict[str, tuple[tuple[int, int], dict[str, Any]]] = {}
        # This process's recorders: live ones, and finished ones the disk refused. Their state in
        # memory is fresher than (or stands in for) their metadata.json.
        self._recorders: OrderedDict[str, StreamRecorder] = OrderedDict()
        # stream_id -> (mtime_ns, size) of the events.jsonl its SHARED_EVENTS_FILE was made from, most recent last.
        self._shared: OrderedDict[str, tuple[int, int]] = OrderedDict()
        # stream_id -> the one look at (or making of) its shared view under way: a crowd waits on it together.
        self._sharing: dict[str, asyncio.Future[Path | None]] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Any, clock: Clock = SYSTEM_CLOCK) -> RecordingStore:
        rec = settings.recordings
        return cls(settings.server.data_dir, retention_days=rec.retention_days, preview_seconds=rec.preview_seconds,
                   preview_width=rec.preview_width, writer_queue_packets=rec.writer_queue_packets, clock=clock)

    # -- recording ------------------------------------------------------------------------

    def recorder(
        self,
        stream_id: str,
        *,
        width: int,
        height: int,
        fps: int,
        owner: str,
        connection_id: str | None = None,
        broadcast_id: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> StreamRecorder:
        """A recorder writing into this store (its writer thread creates the directory).

        Until it has finished and saved its metadata, ``get`` and ``list`` show its live state.
        """
        recorder = StreamRecorder(
            self.directory(stream_id),
            stream_id=stream_id,
            width=width,
            height=height,
            fps=fps,
            owner=owner,
            connection_id=connection_id,
            broadcast_id=broadcast_id,
            extra=extra,
            preview_seconds=self.preview_seconds,
            preview_width=self.preview_width,
            max_queue=self.writer_queue_packets,
            clock=self._clock,
        )
        with self._lock:
            self._recorders[stream_id] = recorder
        recorder.done.add_done_callback(lambda _: self._finished(recorder))
        return recorder

    def _finished(self, recorder: StreamRecorder) -> None:
        with self._lock:
            if recorder.saved and self._recorders.get(recorder.stream_id) is recorder:
                del self._recorders[recorder.stream_id]
            unsaved = [r for r in self._recorders.values() if r.done.done()]
            for old in unsaved[:max(0, len(unsaved) - _UNSAVED_KEPT)]:
                del self._recorders[old.stream_id]

    def recorder_of(self, stream_id: str) -> StreamRecorder | None:
        """This process's recorder of that stream while it records, finishes or waits to save its metadata."""
        with self._lock:
            return self._recorders.get(stream_id)

    def _in_memory(self) -> dict[str, StreamRecorder]:
        with self._lock:
            return dict(self._recorders)

    def directory(self, stream_id: str) -> Path:
        if not valid_stream_id(stream_id):
            raise ValueError(f"not a stream id: {stream_id!r}")
        return self.root / stream_id

    # -- reading ----------------------------------------------------------------------------

    def get(self, stream_id: str) -> dict[str, Any] | None:
        """The recording's metadata, or None (unknown or malformed id, or no metadata yet)."""
        if not valid_stream_id(stream_id):
            return None
        recorder = self._in_memory().get(stream_id)
        return recorder.metadata() if recorder is not None else self._load(stream_id)

    def list(self, owner: str | None, limit: int = 20, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
        """(one page of metadata, newest first; total) for ``owner`` (None: everyone's)."""
        memory = self._in_memory()
        found = [r.metadata() for r in memory.values()]
        seen = set()
        try:
            entries = list(os.scandir(self.root))
        except OSError:  # no recordings yet, or a root the disk refuses
            entries = []
        for entry in entries:
            if not (valid_stream_id(entry.name) and entry.is_dir(follow_symlinks=False)):
                continue
            seen.add(entry.name)
            if entry.name in memory:
                continue
            meta = self._load(entry.name)
            if meta is not None:
                found.append(meta)
        for gone in self._cache.keys() - seen:
            self._cache.pop(gone, None)
        found = [m for m in found if owner is None or m.get("owner") == owner]
        found.sort(key=lambda m: (_number(m.get("started_at")), m.get("stream_id", "")), reverse=True)
        offset, limit = max(0, offset), max(0, limit)
        return found[offset:offset + limit], len(found)

    def path(self, stream_id: str, name: str) -> Path | None:
        """The file ``name`` of a recording, if it is one of FILES and exists; never anything else."""
        if name not in FILES or not valid_stream_id(stream_id):
            return None
        path = self.root / stream_id / name
        try:
            resolved = path.resolve(strict=True)
            root = self.root.resolve(strict=True)
        except (FileNotFoundError, RuntimeError, OSError):
            return None
        if resolved.parent.parent != root or not resolved.is_file():
            return None  # a symlink pointing out of the store
        return resolved

    @staticmethod
    def summary(meta: dict[str, Any]) -> dict[str, Any]:
        """The list entry of docs/api.md: {stream_id, width, height, started_at, ended_at, duration_seconds}."""
        return {
            "stream_id": meta.get("stream_id"),
            "width": meta.get("width"),
            "height": meta.get("height"),
            "started_at": iso(meta.get("started_at")),
            "ended_at": iso(meta.get("ended_at")),
            "duration_seconds": meta.get("duration_seconds"),
        }

    def body(self, meta: dict[str, Any], base_url: str, expires_at: int | None = None) -> dict[str, Any]:
        """The recording object of docs/api.md, its links signed under ``base_url``: fresh ones (an hour)
        for the owner's authenticated calls, or ones expiring at ``expires_at``, the expiry of the link
        that asked (a link never renews itself). Through a link, ``events_url`` is the shared view of
        the log (``shared_events``), never the raw file."""
        stream_id = meta["stream_id"]

        def signed(path: str) -> str:
            signed_path = self.signed_url(path) if expires_at is None else self.signed_until(path, expires_at)
            return base_url + signed_path

        body: dict[str, Any] = {"stream_id": stream_id}
        for field, name in LINKED_FILES.items():
            body[field] = signed(f"/v1/recordings/{stream_id}/{name}")
        if expires_at is not None:
            body["events_url"] = signed(SHARED_EVENTS_PATH.format(stream_id=stream_id))
        body.update({
            "frame_count": meta.get("frame_count"),
            "duration_seconds": meta.get("duration_seconds"),
            "status": meta.get("status"),
            "error": meta.get("error"),
            "replay_url": signed(f"/recordings/{stream_id}"),
            **RecordingStore.summary(meta),
        })
        return body

    async def shared_events(self, stream_id: str) -> Path | None:
        """The file a shared link reads for events.jsonl (``shared_events_view``); None when there is no log.
        Callers at the same time share one look (and at most one rewrite) in a thread."""
        sharing = self._sharing.get(stream_id)
        if sharing is not None and not sharing.done():
            # Begun before this call: the log may have changed since (a late clear), so once it is
            # done the callers that waited share one more look, quick when nothing changed.
            await asyncio.wait([sharing])
            sharing = self._sharing.get(stream_id)
        if sharing is None or sharing.done():
            sharing = asyncio.ensure_future(asyncio.to_thread(self.shared_events_view, stream_id))
            self._sharing[stream_id] = sharing
            sharing.add_done_callback(lambda done: self._shared_done(stream_id, done))
        return await asyncio.shield(sharing)  # one caller leaving does not cancel the others' look

    def _shared_done(self, stream_id: str, done: asyncio.Future[Path | None]) -> None:
        if self._sharing.get(stream_id) is done:  # not the look that may have followed it
            del self._sharing[stream_id]
        if not done.cancelled():
            done.exception()  # read: a refusal every waiter left before hearing is not "never retrieved"

    def shared_events_view(self, stream_id: str) -> Path | None:
        """SHARED_EVENTS_FILE, rewritten first (atomically) if the log changed since it was made; None
        when there is no log. Raises OSError when the disk refuses the view."""
        log_path = self.path(stream_id, EVENTS_FILE)
        if log_path is None:
            return None
        view = log_path.with_name(SHARED_EVENTS_FILE)
        try:
            with open(log_path, "rb") as source:
                st = os.fstat(source.fileno())
                key = (st.st_mtime_ns, st.st_size)
                with self._lock:
                    made_from = self._shared.get(stream_id)
                if made_from == key and view.is_file():
                    return view
                tmp = view.with_name(f".{SHARED_EVENTS_FILE}.{secrets.token_hex(4)}.tmp")
                try:
                    with open(tmp, "wb") as out:
                        write_shared_events(source, st.st_size, out)
                    os.replace(tmp, view)
                finally:
                    tmp.unlink(missing_ok=True)
        except FileNotFoundError:  # deleted meanwhile (retention)
            return None
        with self._lock:
            self._shared[stream_id] = key
            self._shared.move_to_end(stream_id)
            while len(self._shared) > _SHARED_EVENTS_KEPT:
                self._shared.popitem(last=False)
        return view

    def append_event(self, stream_id: str, event: dict[str, Any]) -> bool:
        """One more line in a finished recording's events log (a chat message the host cleared after the
        stream ended), at the video's end (``offset_ms``); False when there is no log or the disk refused."""
        path = self.path(stream_id, EVENTS_FILE)
        meta = self.get(stream_id)
        if path is None or meta is None:
            return False
        end_ms = int(round(_number(meta.get("duration_seconds")) * 1000))
        line = json.dumps({"type": event["type"], "offset_ms": end_ms, **event}, ensure_ascii=False) + "\n"
        try:
            with open(path, "ab+") as file:  # appends, whatever was read before
                size = file.seek(0, os.SEEK_END)
                if size:
                    file.seek(size - 1)
                    if file.read(1) != b"\n":
                        line = "\n" + line  # a line torn by a crash stays torn, and apart from this one
                file.write(line.encode())
        except OSError as exc:
            log.warning("could not add to a recording's events log: %s", exc, extra={"stream_id": stream_id})
            return False
        return True

    def _load(self, stream_id: str) -> dict[str, Any] | None:
        path = self.root / stream_id / METADATA_FILE
        try:
            st = path.stat()
        except OSError:
            self._cache.pop(stream_id, None)
            return None
        key = (st.st_mtime_ns, st.st_size)
        cached = self._cache.get(stream_id)
        if cached is not None and cached[0] == key:
            return dict(cached[1])
        meta = _read_json(path)
        if meta is None or meta.get("stream_id") != stream_id:
            return None
        self._cache[stream_id] = (key, meta)
        return dict(meta)

    # -- signed URLs ------------------------------------------------------------------------

    @property
    def secret(self) -> bytes:
        if self._secret is None:
            self._secret = load_or_create_secret(self.data_dir / SECRET_FILE)
        return self._secret

    def use_secret(self, secret: bytes) -> None:
        """A cluster's key (derived from its shared secret) instead of this data_dir's: a link signed at
        one node holds at every node, so any node checks it before asking the others for the file."""
        self._secret = secret

    def sign(self, path: str, expires_at: int) -> str:
        message = f"{int(expires_at)}:{path}".encode()
        digest = hmac.new(self.secret, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def verify(self, path: str, expires: str | int | None, signature: str | None, now: float | None = None) -> bool:
        """True only for an untampered signature of exactly ``path`` that has not expired."""
        if expires is None or signature is None:
            return False
        try:
            expires_at = int(expires)
        except (TypeError, ValueError):
            return False
        if str(expires).strip() != str(expires_at):
            return False  # "+123", " 123", "0123": one spelling per signature
        expected = self.sign(path, expires_at)
        if not hmac.compare_digest(expected.encode(), str(signature).encode()):
            return False
        return (self._clock.time() if now is None else now) < expires_at

    def signed_url(self, path: str, now: float | None = None, ttl: float = URL_TTL_SECONDS) -> str:
        """``path?expires=…&signature=…``, valid for ``ttl`` seconds (an hour)."""
        return self.signed_until(path, int((self._clock.time() if now is None else now) + ttl))

    def signed_until(self, path: str, expires_at: int) -> str:
        """``path?expires=…&signature=…``, valid until ``expires_at`` (seconds since the epoch)."""
        return f"{path}?expires={int(expires_at)}&signature={self.sign(path, int(expires_at))}"

    # -- start-up and upkeep ----------------------------------------------------------------

    def recover(self) -> list[str]:
        """Finalize what a crash left: recordings still "recording" or with no metadata. Returns their ids.

        Call once at start-up, before any recorder of this process runs (it would look unfinished).
        """
        recovered = []
        try:
            entries = sorted(os.scandir(self.root), key=lambda e: e.name)
        except OSError:
            return recovered
        mine = self._in_memory()
        for entry in entries:
            if not (valid_stream_id(entry.name) and entry.is_dir(follow_symlinks=False)) or entry.name in mine:
                continue
            meta = _read_json(Path(entry.path) / METADATA_FILE)
            if meta is not None and meta.get("status") != STATUS_RECORDING:
                continue
            try:
                self._finalize(Path(entry.path), entry.name, meta)
            except Exception:
                log.exception("recovering a recording failed", extra={"stream_id": entry.name})
                continue
            recovered.append(entry.name)
        return recovered

    def _finalize(self, directory: Path, stream_id: str, meta: dict[str, Any] | None) -> None:
        meta = dict(meta or {})
        meta.setdefault("owner", "")
        meta["stream_id"] = stream_id
        for leftover in directory.glob(".*.tmp"):
            leftover.unlink(missing_ok=True)
        video = directory / VIDEO_FILE
        info = None
        error = None
        try:
            if repair_video(video):
                info = probe_video(video)
        except Exception as exc:
            error = f"video.mp4 is unreadable: {exc}"
        if info is not None and info.frame_count > 0:
            meta.update(frame_count=info.frame_count, duration_seconds=info.duration_seconds)
            meta.setdefault("width", info.width)
            meta.setdefault("height", info.height)
            # The trailer is written on close: if it is there, only the metadata missed the crash.
            status = STATUS_COMPLETE if info.finished else STATUS_PARTIAL
            meta["error"] = None if info.finished else "the relay stopped while recording; kept up to its last second"
            if not (directory / PREVIEW_FILE).exists() or not (directory / THUMBNAIL_FILE).exists():
                try:
                    make_previews(directory, preview_seconds=self.preview_seconds, width=self.preview_width)
                except Exception as exc:
                    log.warning("no thumbnail or preview for a recovered recording: %s", exc,
                                extra={"stream_id": stream_id})
        else:
            status = STATUS_FAILED
            meta.update(frame_count=0, duration_seconds=0.0)
            meta["error"] = error or "the relay stopped before any video was recorded"
        if meta.get("ended_at") is None:
            try:
                meta["ended_at"] = video.stat().st_mtime
            except OSError:
                meta["ended_at"] = meta.get("started_at") or (directory / METADATA_FILE).stat().st_mtime
        if not _number(meta.get("started_at")):
            meta["started_at"] = meta["ended_at"] - float(meta.get("duration_seconds") or 0)
        meta["status"] = status
        meta.setdefault("end_reason", None)
        meta["end_reason"] = meta["end_reason"] or "relay_stopped"
        save_metadata(directory / METADATA_FILE, meta)  # refused even in place: the next start tries again

    def save_unsaved(self) -> list[str]:
        """Write again the metadata of finished recordings the disk refused (it may have room now).
        Returns the ids now saved; those stay shown from memory until then."""
        saved = [r for r in self._in_memory().values() if r.done.done() and not r.saved and r.save()]
        with self._lock:
            for recorder in saved:
                if self._recorders.get(recorder.stream_id) is recorder:
                    del self._recorders[recorder.stream_id]
        return [r.stream_id for r in saved]

    def sweep(self, now: float | None = None) -> list[str]:
        """Delete recordings that ended more than ``retention_days`` ago (0: keep forever). Returns their ids.

        First retries the metadata the disk refused (``save_unsaved``): upkeep that runs hourly anyway.
        """
        self.save_unsaved()
        if self.retention_days <= 0:
            return []
        now = self._clock.time() if now is None else now
        cutoff = now - self.retention_days * 86400
        deleted = []
        try:
            entries = list(os.scandir(self.root))
        except OSError:
            return deleted
        mine = self._in_memory()
        for entry in entries:
            if not (valid_stream_id(entry.name) and entry.is_dir(follow_symlinks=False)):
                continue
            if entry.name in mine and not mine[entry.name].done.done():
                continue
            meta = _read_json(Path(entry.path) / METADATA_FILE)
            if meta is not None and meta.get("status") == STATUS_RECORDING:
                continue  # live (or awaiting recover): never swept from under its writer
            when = _number((meta or {}).get("ended_at")) or _number((meta or {}).get("started_at"))
            if not when:
                try:
                    when = entry.stat(follow_symlinks=False).st_mtime
                except OSError:
                    continue
            if when < cutoff:
                shutil.rmtree(entry.path, ignore_errors=True)  # the shared view with the rest
                self._cache.pop(entry.name, None)
                with self._lock:
                    self._shared.pop(entry.name, None)
                deleted.append(entry.name)
        return deleted


def write_shared_events(source: BinaryIO, size: int, out: BinaryIO) -> None:
    """The first ``size`` bytes of an events log (``source``) into ``out`` as a shared link may read them:
    less every chat message the host cleared (a ``chat_cleared`` anywhere in them names it) and every line
    that does not parse (a line torn by a crash could be one of those messages); the rest as written.
    Two passes, one line in memory at a time: only the cleared ids are kept."""
    cleared = {event["message_id"] for event, _ in _events(source, size)
               if event.get("type") == "chat_cleared" and isinstance(event.get("message_id"), str)}
    for event, line in _events(source, size):
        if event.get("type") != "chat" or (isinstance(event.get("message_id"), str)
                                           and event["message_id"] not in cleared):
            out.write(line.rstrip(b"\r\n") + b"\n")


def _events(source: BinaryIO, size: int) -> Iterator[tuple[dict[str, Any], bytes]]:
    """(event, its line) for each line of the first ``size`` bytes that parses to an object."""
    source.seek(0)
    left = size
    while left > 0:
        line = source.readline(left)
        if not line:
            return
        left -= len(line)
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            yield event, line


def valid_stream_id(stream_id: Any) -> bool:
    return isinstance(stream_id, str) and STREAM_ID.fullmatch(stream_id) is not None


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
