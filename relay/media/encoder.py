"""The shared H.264 encoder: runs once per stream, whatever the number of spectators.

Output is what every WebRTC H.264 decoder (browsers included) accepts and what aiortc's
RTCRtpSender can packetize without re-encoding: constrained baseline (profile-level-id
42e01f), Annex B, SPS/PPS repeated in every keyframe (so a joiner can start on any IDR),
no B-frames, zero-latency tuning (no lookahead: a frame in is a packet out).
"""

from __future__ import annotations

import fractions

import av
from av.video.frame import PictureType

from ..worldmodel.base import VIDEO_TIME_BASE


class H264Encoder:
    """Not thread-safe: the pipeline calls it from one dedicated thread."""

    def __init__(
        self,
        width: int,
        height: int,
        fps: int,
        bitrate_kbps: int,
        keyframe_interval_seconds: float,
        preset: str = "veryfast",
    ) -> None:
        self.width = width
        self.height = height
        gop = max(1, round(fps * keyframe_interval_seconds))
        ctx = av.CodecContext.create("libx264", "w")
        ctx.width = width
        ctx.height = height
        ctx.pix_fmt = "yuv420p"
        ctx.framerate = fractions.Fraction(fps, 1)
        # Frames arrive with pts in the RTP video clock; keep it so packets need no rescaling.
        ctx.time_base = VIDEO_TIME_BASE
        ctx.bit_rate = bitrate_kbps * 1000
        ctx.profile = "Baseline"
        ctx.options = {
            "preset": preset,
            "tune": "zerolatency",
            "level": "31",
            "forced-idr": "1",
            # One thread per encoder: each stream owns one core-slice; a box with several
            # streams scales by streams, and sliced threads would only add latency jitter here.
            "threads": "1",
            # VBV caps bursts so keyframes do not blow past what a spectator's link absorbs.
            "x264-params": (
                f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes=0:repeat-headers=1:"
                f"vbv-maxrate={bitrate_kbps}:vbv-bufsize={bitrate_kbps // 2}"
            ),
        }
        self._ctx = ctx
        self._closed = False

    def encode(self, frame: av.VideoFrame, force_keyframe: bool = False) -> list[av.Packet]:
        if frame.width != self.width or frame.height != self.height:
            frame = frame.reformat(width=self.width, height=self.height, format="yuv420p")
        elif frame.format.name != "yuv420p":
            frame = frame.reformat(format="yuv420p")
        frame.pict_type = PictureType.I if force_keyframe else PictureType.NONE
        packets = self._ctx.encode(frame)
        for packet in packets:
            packet.time_base = VIDEO_TIME_BASE
        return packets

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._ctx.encode(None)  # flush; x264 frees its lookahead
        except av.error.FFmpegError:
            pass
