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


def crafted_sps(profile_idc: int, width_mbs: int, height_map_units: int, *, constraint_set0: bool = False,
                frame_mbs_only: bool = True) -> bytes:
    """An access unit holding only an SPS written bit by bit (what no encoder here would make)."""
    bits = [int(b) for b in f"{profile_idc:08b}"] + [int(constraint_set0)] + [0] * 7 + [int(b) for b in f"{40:08b}"]

    def ue(value: int) -> None:
        code = f"{value + 1:b}"
        bits.extend([0] * (len(code) - 1) + [int(b) for b in code])

    ue(0)  # seq_parameter_set_id
    if profile_idc in (100, 110, 122, 244):
        ue(1)  # chroma_format_idc 4:2:0
        ue(0)
        ue(0)  # bit depths
        bits.extend([0, 0])  # qpprime_y_zero_transform_bypass_flag, seq_scaling_matrix_present_flag
    ue(0)  # log2_max_frame_num_minus4
    ue(2)  # pic_order_cnt_type
    ue(1)  # max_num_ref_frames
    bits.append(0)  # gaps_in_frame_num_value_allowed_flag
    ue(width_mbs - 1)
    ue(height_map_units - 1)
    bits.append(int(frame_mbs_only))
    if not frame_mbs_only:
        bits.append(0)  # mb_adaptive_frame_field_flag
    bits.extend([1, 0, 0, 1])  # direct_8x8_inference_flag, no cropping, no VUI, rbsp stop bit
    bits.extend([0] * (-len(bits) % 8))
    payload = bytes(int("".join(map(str, bits[i:i + 8])), 2) for i in range(0, len(bits), 8))
    return b"\x00\x00\x00\x01\x67" + payload.replace(b"\x00\x00", b"\x00\x00\x03")


def test_a_picture_beyond_4k_does_not_fit():
    assert read_sps(crafted_sps(66, 240, 135)).fits  # 3840x2160
    assert read_sps(crafted_sps(66, 135, 240)).fits  # and portrait
    huge = read_sps(crafted_sps(66, 20001, 20001))
    assert (huge.width, huge.height) == (320016, 320016) and not huge.fits
    assert not read_sps(crafted_sps(66, 320, 8)).fits  # 5120 wide, however few rows


def test_pass_through_needs_progressive_frames_and_a_profile_that_keeps_constraint_set0():
    assert read_sps(crafted_sps(66, 20, 11)).passes_through
    assert read_sps(crafted_sps(77, 20, 11, constraint_set0=True)).passes_through
    interlaced = read_sps(crafted_sps(66, 20, 11, frame_mbs_only=False))
    assert interlaced.height == 352 and not interlaced.passes_through
    assert not read_sps(crafted_sps(100, 20, 11, constraint_set0=True)).passes_through
