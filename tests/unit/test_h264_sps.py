"""The SPS size reader against real x264 streams (baseline and high, with and without cropping)."""

from __future__ import annotations

import av
import numpy as np
import pytest

from relay.media.encoder import H264Encoder
from relay.media.h264_sps import read_sps, sps_size


def first_keyframe(width: int, height: int, profile: str, bframes: int = 0) -> bytes:
    ctx = av.CodecContext.create("libx264", "w")
    ctx.width, ctx.height, ctx.pix_fmt, ctx.profile = width, height, "yuv420p", profile
    # ultrafast would be baseline whatever the profile; zerolatency would turn B-frames off
    ctx.options = {"preset": "veryfast", "x264-params": f"bframes={bframes}"}
    frame = av.VideoFrame.from_ndarray(np.zeros((height, width, 3), np.uint8), format="rgb24")
    packets = ctx.encode(frame) + ctx.encode(None)
    return bytes(packets[0])


@pytest.mark.parametrize("width,height", [(320, 176), (1280, 720), (642, 362), (1920, 1080)])
@pytest.mark.parametrize("profile", ["Baseline", "High"])
def test_reads_the_size_and_profile_x264_declares(width, height, profile):
    assert sps_size(first_keyframe(width, height, profile)) == (width, height)
    assert read_sps(first_keyframe(width, height, profile)).baseline is (profile == "Baseline")


@pytest.mark.parametrize("profile,bframes,passes", [("Baseline", 0, True), ("Main", 0, True), ("Main", 2, False),
                                                   ("High", 0, False), ("High", 3, False)])
def test_what_passes_through(profile, bframes, passes):
    sps = read_sps(first_keyframe(320, 176, profile, bframes))
    assert sps.passes_through is passes, sps
    if profile != "Baseline":  # x264 declares its reordering in the VUI
        assert (sps.reorder_frames > 0) == (bframes > 0)


def test_the_relays_own_encoder_output():
    encoder = H264Encoder(1280, 704, 25, 2000, 2.0)
    frame = av.VideoFrame.from_ndarray(np.zeros((704, 1280, 3), np.uint8), format="rgb24")
    frame.pts = 0
    packet = encoder.encode(frame, force_keyframe=True)[0]
    encoder.close()
    assert sps_size(bytes(packet)) == (1280, 704)


@pytest.mark.parametrize("data", [b"", b"\x00\x00\x01", b"\x00\x00\x01\x67", b"\x00\x00\x01\x67" + b"\x00" * 40,
                                  b"\x00\x00\x01\x65\xff\xff", b"\x00\x00\x00\x01\x67\x42\xc0\x1f" + b"\x80" + b"\x00" * 600])
def test_no_readable_sps_is_none(data):
    assert sps_size(data) is None
