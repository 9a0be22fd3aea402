"""The job spec: one attempt at a job, everything its worker process needs and nothing else.

Frozen and typed, made of plain values, so it crosses the process pool by pickling and the worker reads
named fields instead of a dict's keys. ``job_spec`` is the one place where the relay's settings become it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..config import Settings, hosted_api_key
from .script import Script
from .store import Job

__all__ = ["HostedSource", "JobSpec", "VideoSpec", "job_spec"]


@dataclass(frozen=True)
class VideoSpec:
    """The video a script is recorded as: frame size and rate, the H.264 encoder's settings, and the
    recording's preview and writer queue. An imported video keeps its own size and rate (``replace``)."""

    width: int
    height: int
    fps: int
    bitrate_kbps: int
    keyframe_interval_seconds: float
    preset: str = "superfast"
    preview_seconds: float = 5.0
    preview_width: int = 320
    writer_queue_packets: int = 512


@dataclass(frozen=True)
class HostedSource:
    """``[world_model] kind = "hosted"``: the hosted API renders the job and the worker imports its videos."""

    url: str
    api_key: str = field(repr=False)  # a spec in a log line or a traceback does not show the key
    api_key_env: str


@dataclass(frozen=True)
class JobSpec:
    job_id: str
    owner: str  # owner_id(api_key): the recordings' owner
    scripts: tuple[Script, ...]
    stream_ids: tuple[str, ...]  # this attempt's, one per script
    portrait: bool
    video: VideoSpec
    db_path: str  # the job store, where the worker marks the job processing
    data_dir: str  # recordings/ and the hosted downloads' scratch folder are under it
    hosted: HostedSource | None = None


def job_spec(job: Job, settings: Settings, db_path: Path) -> JobSpec:
    """The spec of ``job``'s attempt (it has been claimed: its stream ids are chosen)."""
    wm, media, rec = settings.world_model, settings.media, settings.recordings
    long_side, short_side = max(wm.width, wm.height), min(wm.width, wm.height)
    width, height = (short_side, long_side) if job.portrait else (long_side, short_side)  # as live streams
    hosted = None
    if wm.kind == "hosted":  # the hosted model renders it: the worker submits and imports the result
        hosted = HostedSource(url=wm.url, api_key=hosted_api_key(settings), api_key_env=wm.api_key_env)
    video = VideoSpec(width=width, height=height, fps=wm.fps, bitrate_kbps=media.bitrate_kbps,
                      keyframe_interval_seconds=media.keyframe_interval_seconds,
                      preset=settings.simulations.encoder_preset, preview_seconds=rec.preview_seconds,
                      preview_width=rec.preview_width, writer_queue_packets=rec.writer_queue_packets)
    return JobSpec(job_id=job.job_id, owner=job.owner, scripts=tuple(job.scripts), stream_ids=tuple(job.stream_ids),
                   portrait=job.portrait, video=video, db_path=str(db_path), data_dir=str(settings.server.data_dir),
                   hosted=hosted)
