"""A stream's recording: the stream's own H.264 packets muxed (never re-encoded) into fragmented MP4.

The recorder is one more reader of the packets the hub fans out (``hub.add_sink(recorder.write)``).
Everything that touches the disk runs on the recorder's own writer thread: on the event loop
``write`` only copies the packet's bytes and timestamp into a queue, so a slow or full disk costs
the recording, never the live stream. The queue is bounded; a recording that falls that far behind
stops and is marked failed rather than let memory grow.

The file (checked with PyAV 18 / FFmpeg 8 and Chromium):
- ``add_mux_stream("h264")`` (no codec context, so no encoder is opened) and Annex B packets as the
  encoder emits them. With no extradata the mp4 muxer holds ``moov`` back until the first packet,
  builds ``avcC`` from that keyframe's SPS/PPS and rewrites every sample to length-prefixed NAL
  units itself: no bitstream filter, no SPS parsing here. The first packet must be a keyframe.
- ``movflags=frag_keyframe+empty_moov+default_base_moof`` with ``frag_duration=1000000`` (a fragment at
  each keyframe and at least every second) and ``flush_packets=1``: each fragment (moof + mdat)
  reaches the OS as soon as it is complete. Without ``flush_packets`` it sits in a 32 KB AVIO buffer
  and a kill -9 loses it. So a crash loses at most the last second.
- A kill can still cut a fragment in two; :func:`repair_video` truncates the file to its last whole
  fragment (the mov demuxer refuses a file whose last ``moof`` is cut short).

After the stream ends, still on the writer thread: the trailer (``mfra``), ``thumbnail.jpg`` and
``preview.mp4`` (:func:`make_previews`) and ``metadata.json`` (written atomically, as it is at start,
with status "recording", so a crash leaves something :class:`relay.recordings.RecordingStore` can
finalize on the next start).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import fractions
import json
import logging
import os
import queue
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import av

from ..clock import SYSTEM_CLOCK, Clock
from .thumbnail import even, jpeg_bytes

__all__ = [
    "StreamRecorder",
    "RecordingResult",
    "VideoInfo",
    "make_previews",
    "probe_video",
    "repair_video",
    "write_json_atomic",
    "save_metadata",
    "MP4_OPTIONS",
    "VIDEO_FILE",
    "EVENTS_FILE",
    "THUMBNAIL_FILE",
    "PREVIEW_FILE",
    "METADATA_FILE",
]

log = logging.getLogger(__name__)

VIDEO_FILE = "video.mp4"
EVENTS_FILE = "events.jsonl"
THUMBNAIL_FILE = "thumbnail.jpg"
PREVIEW_FILE = "preview.mp4"
METADATA_FILE = "metadata.json"

STATUS_RECORDING = "recording"
STATUS_COMPLETE = "complete"
STATUS_FAILED = "failed"
STATUS_PARTIAL = "partial"

VIDEO_TIME_BASE = fractions.Fraction(1, 90000)

MP4_OPTIONS = {
    "movflags": "frag_keyframe+empty_moov+default_base_moof",
    "frag_duration": "1000000",  # microseconds
    "flush_packets": "1",
}

# Spectator-count events: logged only when the count changes; their maximum is the peak.
SPECTATOR_EVENTS = ("spectators", "viewers")

THUMBNAIL_AT_SECONDS = 1.0


@dataclass(frozen=True)
class RecordingResult:
    stream_id: str
    status: str  # "complete" | "failed"
    frame_count: int
    duration_seconds: float
    error: str | None


_CLOSE = object()
_PACKET = 0
_EVENT = 1


class StreamRecorder:
    """Records one stream into ``directory``: video.mp4, events.jsonl, then thumbnail, preview, metadata.

    ``write``, ``log_event`` and ``stop`` are for the event loop (they never block and never raise);
    ``close`` blocks until everything is on disk; ``aclose`` awaits the same without blocking the loop.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        stream_id: str,
        width: int,
        height: int,
        fps: int,
        owner: str = "",
        connection_id: str | None = None,
        broadcast_id: str | None = None,
        extra: Mapping[str, Any] | None = None,
        preview_seconds: float = 5.0,
        preview_width: int = 320,
        max_queue: int = 512,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.directory = Path(directory)
        self.stream_id = stream_id
        self.width, self.height, self.fps = width, height, max(1, int(fps))
        self._metadata: dict[str, Any] = {
            **(extra or {}),
            "stream_id": stream_id,
            "owner": owner,
            "connection_id": connection_id,
            "broadcast_id": broadcast_id,
            "width": width,
            "height": height,
            "fps": self.fps,
        }
        self._preview_seconds = preview_seconds
        self._preview_width = preview_width
        self._max_queue = max_queue
        self._clock = clock
        self.started_at = clock.time()
        self.ended_at: float | None = None
        self.end_reason: str | None = None
        self.peak_spectators = 0
        self.packets_skipped = 0  # before the first keyframe
        self.error: str | None = None  # set once, by either thread: the recording has stopped
        # Event-loop side.
        self._t0: float | None = None  # monotonic time of the first recorded frame: video t = 0
        self._accepting = True
        self._spectators: int | None = None
        # Writer side.
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._container: Any = None
        self._video: Any = None  # video.mp4, the container's file
        self._stream: Any = None
        self._events: Any = None
        self._frame_ticks = round(90000 / self.fps)
        self._base_pts: int | None = None
        self._last_pts = -1
        self.frame_count = 0  # packets in video.mp4 (written by the writer thread)
        self.saved = False  # metadata.json holds the latest state
        self._done: concurrent.futures.Future[RecordingResult] = concurrent.futures.Future()
        # A daemon: a process that exits without closing its recorders leaves what recover() handles.
        self._thread = threading.Thread(target=self._run, name=f"relay-recorder-{stream_id[:8]}", daemon=True)
        try:
            self._thread.start()
        except RuntimeError as exc:  # out of threads: no recording, the stream goes on
            self._accepting = False
            self._fail(f"cannot start the recording's writer thread: {exc}")
            self._done.set_result(self._result())

    # -- event loop side ------------------------------------------------------------------

    @property
    def failed(self) -> bool:
        return self.error is not None

    @property
    def done(self) -> concurrent.futures.Future[RecordingResult]:
        """Resolves once the recording is finalized (files and metadata on disk)."""
        return self._done

    def write(self, packet: av.Packet, keyframe: bool | None = None) -> None:
        """Take one encoded packet (a hub sink). Never blocks, never raises, never touches ``packet``."""
        if not self._accepting or self.error is not None or not isinstance(packet, av.Packet):
            return  # a decoded frame (per-spectator mode) has nothing to mux
        try:
            pts = packet.pts
            if pts is None:
                return
            if keyframe is None:
                keyframe = packet.is_keyframe
            if self._t0 is None:
                if not keyframe:
                    self.packets_skipped += 1
                    return
                self._t0 = self._clock.monotonic()
            time_base = packet.time_base
            if time_base is not None and time_base != VIDEO_TIME_BASE:
                pts = round(pts * time_base / VIDEO_TIME_BASE)
            self._put((_PACKET, bytes(packet), int(pts), bool(keyframe)))
        except Exception as exc:  # a recorder bug must not reach the hub, which feeds the spectators
            self._fail(f"could not queue a packet: {exc}")

    def log_event(self, event: Mapping[str, Any]) -> None:
        """Append ``{"type", "offset_ms", ...event}`` to events.jsonl.

        ``offset_ms`` is on the video's timeline (ms since its first frame; 0 before it), so a
        player can seek straight to an event. Spectator counts ("viewers" / "spectators" events
        with ``count``) are logged only when they change, and give ``peak_spectators``.
        """
        if not self._accepting or self.error is not None:
            return
        try:
            kind = event.get("type")
            if kind in SPECTATOR_EVENTS:
                count = event.get("count")
                if count == self._spectators:
                    return
                self._spectators = count
                if isinstance(count, int):
                    self.peak_spectators = max(self.peak_spectators, count)
            elif kind == "stream_ended":
                self.end_reason = event.get("reason")
            record = {"type": kind, "offset_ms": self.offset_ms()}
            record.update((k, v) for k, v in event.items() if k not in record)
            line = json.dumps(record, ensure_ascii=False, default=str, separators=(",", ":")) + "\n"
            self._put((_EVENT, line))
        except Exception as exc:
            self._fail(f"could not queue an event: {exc}")

    def offset_ms(self) -> int:
        if self._t0 is None:
            return 0
        return max(0, round((self._clock.monotonic() - self._t0) * 1000))

    def stop(self, reason: str | None = None) -> None:
        """The stream ended: log ``stream_ended`` (if ``reason`` and not logged yet) and finish in the background."""
        if not self._accepting:
            return
        if reason is not None and self.end_reason is None:
            self.log_event({"type": "stream_ended", "reason": reason})
            self.end_reason = reason  # also when the log is no longer written
        self._accepting = False
        self.ended_at = self._clock.time()
        self._queue.put(_CLOSE)  # unbounded on purpose: the end always gets through

    def close(self, reason: str | None = None, timeout: float | None = None) -> RecordingResult:
        """Stop and wait for the files; safe to call twice. Blocks: not for the event loop."""
        self.stop(reason)
        return self._done.result(timeout)

    async def aclose(self, reason: str | None = None) -> RecordingResult:
        self.stop(reason)
        return await asyncio.wrap_future(self._done)

    def _put(self, item: tuple[Any, ...]) -> None:
        if self._queue.qsize() >= self._max_queue:
            self._fail(f"the recording fell {self._max_queue} items behind the stream (disk too slow)")
            return
        self._queue.put(item)

    def _fail(self, message: str) -> None:
        if self.error is None:
            self.error = message
            log.error("recording stopped: %s", message, extra={"stream_id": self.stream_id})

    # -- writer thread --------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._begin()
        except Exception as exc:
            self._fail(f"cannot write the recording in {self.directory}: {_describe(exc)}")
        while True:
            item = self._queue.get()
            if item is _CLOSE:
                break
            if self.error is not None:
                continue  # stopped: drain until the end without touching the disk
            try:
                if item[0] == _PACKET:
                    self._mux(item[1], item[2], item[3])
                else:
                    self._events.write(item[1])
                    self._events.flush()
            except Exception as exc:
                self._fail(f"writing the recording failed: {_describe(exc)}")
        try:
            result = self._finish()
        except Exception as exc:  # never leave close() waiting
            log.exception("finishing the recording failed", extra={"stream_id": self.stream_id})
            self._fail(f"finishing the recording failed: {_describe(exc)}")
            result = self._result()
        self._done.set_result(result)

    def _begin(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._write_metadata(STATUS_RECORDING)
        # backslashreplace: a string no encoder takes (a lone surrogate) is written as its JSON escape
        # ("\\ud800"), so the line stays valid JSON and the log cannot fail on any text.
        self._events = open(self.directory / EVENTS_FILE, "a", encoding="utf-8", errors="backslashreplace")

    def _mux(self, data: bytes, pts: int, keyframe: bool) -> None:
        if self._container is None:
            # Opened here, not by FFmpeg: a muxer that fails before its header (a full disk) never
            # closes a file it opened itself. Unbuffered, so each flushed fragment reaches the OS at once.
            self._video = open(self.directory / VIDEO_FILE, "wb", buffering=0)
            self._container = av.open(self._video, "w", format="mp4", options=MP4_OPTIONS)
            self._stream = self._container.add_mux_stream("h264", rate=self.fps, width=self.width, height=self.height)
            self._stream.time_base = VIDEO_TIME_BASE
        if self._base_pts is None:
            self._base_pts = pts
        pts -= self._base_pts
        if pts <= self._last_pts:  # mp4 needs strictly increasing timestamps
            pts = self._last_pts + 1
        packet = av.Packet(data)
        packet.pts = packet.dts = pts
        packet.duration = self._frame_ticks
        packet.time_base = VIDEO_TIME_BASE
        packet.is_keyframe = keyframe
        packet.stream = self._stream
        self._container.mux(packet)
        self._last_pts = pts
        self.frame_count += 1

    def _finish(self) -> RecordingResult:
        if self._container is not None:
            container, self._container = self._container, None
            try:
                container.close()  # the trailer; every fragment is already on disk
            except Exception as exc:
                self._fail(f"finishing video.mp4 failed: {_describe(exc)}")
        if self._video is not None:
            video, self._video = self._video, None
            video.close()  # FileIO, unbuffered: closing cannot fail to write
        if self._events is not None:
            events, self._events = self._events, None
            try:
                events.close()
            except Exception as exc:
                self._fail(f"writing events.jsonl failed: {_describe(exc)}")
        if self.frame_count == 0 and self.error is None:
            self._fail("the stream ended before its first keyframe: nothing was recorded")
        if self.frame_count > 0 and (self.directory / VIDEO_FILE).exists():
            try:
                make_previews(self.directory, preview_seconds=self._preview_seconds, width=self._preview_width)
            except Exception as exc:  # the recording itself is fine; only its previews are missing
                log.warning("making the thumbnail and preview failed: %s", _describe(exc),
                            extra={"stream_id": self.stream_id})
        status = STATUS_FAILED if self.error is not None else STATUS_COMPLETE
        try:
            self._write_metadata(status)
        except Exception as exc:
            self._fail(f"writing metadata.json failed: {_describe(exc)}")
        return self._result()

    def _duration(self) -> float:
        return round((self._last_pts + self._frame_ticks) / 90000, 3) if self.frame_count else 0.0

    def _result(self) -> RecordingResult:
        status = STATUS_FAILED if self.error is not None else STATUS_COMPLETE
        return RecordingResult(self.stream_id, status, self.frame_count, self._duration(), self.error)

    def metadata(self) -> dict[str, Any]:
        """What metadata.json says, as of now (also when the disk refused it: the API can still show it)."""
        if self._done.done():
            status = self._done.result().status
        else:
            status = STATUS_FAILED if self.error is not None else STATUS_RECORDING
        return self._snapshot(status)

    def _snapshot(self, status: str) -> dict[str, Any]:
        meta = dict(self._metadata)
        meta.update(
            started_at=self.started_at,
            ended_at=self.ended_at if status != STATUS_RECORDING else None,
            duration_seconds=self._duration(),
            frame_count=self.frame_count,
            peak_spectators=self.peak_spectators,
            end_reason=self.end_reason,
            status=status,
            error=self.error,
        )
        return meta

    def _write_metadata(self, status: str) -> None:
        self.saved = False
        save_metadata(self.directory / METADATA_FILE, self._snapshot(status))
        self.saved = True

    def save(self) -> bool:
        """Try again to write a finished recording's metadata the disk refused; True once it is on disk."""
        if not self._done.done():
            return False
        if not self.saved:
            try:
                self._write_metadata(self._done.result().status)
            except OSError:
                return False
        return True


# ------------------------------------------------------------------------------------- helpers

def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return str(exc) or type(exc).__name__


def write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    """Replace ``path`` with ``data`` all at once: readers see the old file or the new one, never half.

    On failure (a full disk) the temporary file is closed and removed and the old file is untouched.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as file:
            json.dump(data, file, ensure_ascii=False, indent=1, default=str)
            file.write("\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def save_metadata(path: Path, data: Mapping[str, Any]) -> None:
    """``write_json_atomic``, or, when the disk refuses a new file, ``data`` written over the old one.

    A full disk still lets a file be rewritten within the blocks it already holds: a recording's
    metadata.json (written at its start) can then say "failed" instead of "recording" forever. One
    pwrite of a few hundred bytes, padded with spaces to the old length (JSON ignores them), so even a
    kill -9 leaves the old text or the new. Raises the first error if even that is refused.
    """
    try:
        write_json_atomic(path, data)
    except OSError as first:
        text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), default=str).encode("utf-8") + b"\n"
        try:
            fd = os.open(path, os.O_WRONLY)
        except OSError:
            raise first from None
        try:
            st = os.fstat(fd)
            if len(text) > max(st.st_size, st.st_blocks * 512):
                raise first  # it would need a block the disk no longer has
            text = text.ljust(st.st_size, b" ")
            if os.pwrite(fd, text, 0) != len(text):
                raise first
            os.fsync(fd)
        except OSError:
            raise first from None
        finally:
            os.close(fd)
        log.warning("%s: the disk refused a new file; rewritten in place", path)


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def make_previews(directory: str | os.PathLike[str], *, preview_seconds: float = 5.0, width: int = 320) -> None:
    """thumbnail.jpg (the frame ~1 s in, or the last one) and preview.mp4 (the first seconds, small).

    One decoding pass over the start of video.mp4; both files are written to a temporary name and
    renamed into place. preview.mp4 is H.264 constrained baseline, yuv420p, moov first (+faststart).
    """
    directory = Path(directory)
    preview_tmp = directory / f".{PREVIEW_FILE}.tmp"
    try:
        last, thumb = _write_preview(directory / VIDEO_FILE, preview_tmp, preview_seconds, width)
        if last is None:
            raise ValueError("video.mp4 has no decodable frame")
        os.replace(preview_tmp, directory / PREVIEW_FILE)
    except BaseException:
        _remove(preview_tmp)  # a full disk leaves no half preview behind
        raise
    _write_jpeg(thumb if thumb is not None else last, directory / THUMBNAIL_FILE)


def _write_preview(source_path: Path, preview_tmp: Path, preview_seconds: float,
                   width: int) -> tuple[av.VideoFrame | None, av.VideoFrame | None]:
    """Encode preview.mp4 into ``preview_tmp``; (last frame, thumbnail frame) of those taken."""
    thumb = None
    last = None
    with av.open(str(source_path)) as source:
        video = source.streams.video[0]
        video.codec_context.thread_count = 1  # a background job: leave the cores to live streams
        src_w, src_h = video.codec_context.width, video.codec_context.height
        out_w = even(min(width, src_w))
        out_h = even(out_w * src_h / src_w)
        fps = video.average_rate or video.guessed_rate or 25
        # The file is opened here, not by FFmpeg: a muxer that fails before its header is written
        # never closes a file it opened, and the fd would outlive the failure.
        with open(preview_tmp, "w+b", buffering=0) as file:
            out = av.open(file, "w", format="mp4", options={"movflags": "+faststart"})
            try:
                encoder = out.add_stream("libx264", rate=fps)
                encoder.width, encoder.height, encoder.pix_fmt = out_w, out_h, "yuv420p"
                encoder.codec_context.profile = "Baseline"
                encoder.codec_context.options = {"preset": "veryfast", "crf": "30", "threads": "1", "level": "30"}
                time_base = 1 / fractions.Fraction(fps)
                count = 0
                for frame in _decoded(source, video):
                    t = frame.time if frame.time is not None else count / float(fps)
                    if t >= preview_seconds:
                        break
                    small = frame.reformat(width=out_w, height=out_h, format="yuv420p")
                    if thumb is None and t >= THUMBNAIL_AT_SECONDS:
                        thumb = small
                    last = small
                    small.pts, small.time_base = count, time_base
                    count += 1
                    out.mux(encoder.encode(small))
                out.mux(encoder.encode(None))
            finally:
                out.close()
    return last, thumb


def _decoded(container: Any, video: Any):
    """Frames in order, skipping what a damaged packet (the cut end of a partial file) cannot give."""
    for packet in container.demux(video):
        try:
            yield from packet.decode()
        except av.error.FFmpegError:
            continue


def _write_jpeg(frame: av.VideoFrame, path: Path) -> None:
    data = jpeg_bytes(frame)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


# -------------------------------------------------------------------- the file after a crash

@dataclass(frozen=True)
class VideoInfo:
    frame_count: int
    duration_seconds: float
    width: int
    height: int
    finished: bool  # the muxer wrote its trailer (mfra): the recorder closed the file itself


def _boxes(file: Any, size: int):
    """(type, start, end) of each top-level MP4 box, stopping at the first one cut short."""
    pos = 0
    while pos + 8 <= size:
        file.seek(pos)
        header = file.read(16)
        length, kind = struct.unpack(">I4s", header[:8])
        if length == 1 and len(header) == 16:
            length = struct.unpack(">Q", header[8:16])[0]
        elif length == 0:
            length = size - pos
        if length < 8 or pos + length > size:
            return
        yield kind, pos, pos + length
        pos += length


def repair_video(path: str | os.PathLike[str]) -> bool:
    """Cut a fragmented MP4 left by a crash back to its last whole fragment.

    Returns False when nothing playable is left (no complete moov with a first fragment).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return False
    good = 0
    moov = fragments = False
    pending_moof = False
    with open(path, "rb") as file:
        for kind, _start, end in _boxes(file, size):
            if kind == b"moof":
                pending_moof = True
                continue
            if kind == b"mdat":
                if pending_moof:
                    fragments = True
                    good = end
                pending_moof = False
                continue
            if pending_moof:
                break  # a moof must be followed by its mdat
            if kind == b"moov":
                moov = True
            good = end
    if not (moov and fragments):
        return False
    if good < size:
        os.truncate(path, good)
    return True


def probe_video(path: str | os.PathLike[str]) -> VideoInfo:
    """Frame count and duration from the packets themselves (a partial file has no totals)."""
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        first = last = None
        count = 0
        for packet in container.demux(video):
            if packet.pts is None or packet.size == 0:
                continue
            count += 1
            first = packet.pts if first is None else min(first, packet.pts)
            last = packet.pts if last is None else max(last, packet.pts)
        rate = video.average_rate or video.guessed_rate or 25
        duration = 0.0
        if count:
            duration = float((last - first) * video.time_base) + 1 / float(rate)
        width, height = video.codec_context.width, video.codec_context.height
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        finished = any(kind == b"mfra" for kind, _, _ in _boxes(file, size))
    return VideoInfo(count, round(duration, 3), width, height, finished)
