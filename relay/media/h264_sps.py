"""The picture size an H.264 access unit's SPS declares, read without decoding anything.

A stream whose packets pass through (a WHIP publisher's) brings its own size: the recorder needs
it for the MP4 track header before the first packet is muxed. ITU-T H.264 section 7.3.2.1.1.
"""

from __future__ import annotations

from dataclasses import dataclass

NAL_SPS = 7
NAL_PPS = 8
# profile_idc values whose SPS carries chroma format, bit depths and scaling matrices.
HIGH_PROFILES = frozenset({100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135})
MAX_SPS_BYTES = 512  # a real SPS is tens of bytes; longer is read no further
# The largest picture a publisher may send (4K UHD, either way up): an SPS declares up to 2^32 macroblocks
# a side, and the relay's decoder, recorder and spectators would each allocate for what it says.
MAX_SIDE = 4096
MAX_SAMPLES = 3840 * 2160

PROFILE_BASELINE = 66
PROFILE_MAIN = 77
PROFILE_EXTENDED = 88


@dataclass(frozen=True)
class Sps:
    profile_idc: int
    constraint_set0: bool  # the stream keeps to the baseline profile's constraints, whatever its profile
    width: int
    height: int
    reorder_frames: int | None = None  # the VUI's max_num_reorder_frames: 0 = no B-frames; None = not said
    frame_mbs_only: bool = True  # False: fields (interlaced), which a WebRTC spectator's decoder does not take

    @property
    def baseline(self) -> bool:
        """Baseline or constrained baseline: no B-frames, what every WebRTC spectator decodes. constraint_set0
        is believed of main and extended only: a high profile's SPS still brings its own tools (8x8 transform)."""
        return self.profile_idc == PROFILE_BASELINE or (
            self.constraint_set0 and self.profile_idc in (PROFILE_MAIN, PROFILE_EXTENDED))

    @property
    def passes_through(self) -> bool:
        """What a WebRTC spectator takes as it is: progressive baseline, or main that declares no B-frames."""
        return self.frame_mbs_only and (
            self.baseline or (self.profile_idc == PROFILE_MAIN and self.reorder_frames == 0))

    @property
    def fits(self) -> bool:
        """Within the largest picture the relay takes (MAX_SIDE a side, MAX_SAMPLES in all)."""
        return self.width <= MAX_SIDE and self.height <= MAX_SIDE and self.width * self.height <= MAX_SAMPLES


class _Bits:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def u(self, n: int) -> int:
        value = 0
        for _ in range(n):
            byte = self._pos >> 3
            if byte >= len(self._data):
                raise ValueError("SPS ends early")
            value = (value << 1) | ((self._data[byte] >> (7 - (self._pos & 7))) & 1)
            self._pos += 1
        return value

    def ue(self) -> int:
        zeros = 0
        while self.u(1) == 0:
            zeros += 1
            if zeros > 31:
                raise ValueError("bad exp-Golomb code")
        return (1 << zeros) - 1 + self.u(zeros)

    def se(self) -> int:
        k = self.ue()
        return (k + 1) // 2 if k & 1 else -(k // 2)


def nal_units(access_unit: bytes):
    """The NAL units of an Annex B access unit (start codes of 3 or 4 bytes)."""
    start = access_unit.find(b"\x00\x00\x01")
    while start != -1:
        begin = start + 3
        end = access_unit.find(b"\x00\x00\x01", begin)
        nal = access_unit[begin:end if end != -1 else len(access_unit)]
        yield nal.rstrip(b"\x00") if end != -1 else nal
        start = end


def _unescape(rbsp: bytes) -> bytes:
    return rbsp.replace(b"\x00\x00\x03", b"\x00\x00")


def sps_size(access_unit: bytes) -> tuple[int, int] | None:
    """(width, height) from the access unit's SPS, cropping applied; None without a readable SPS."""
    sps = read_sps(access_unit)
    return (sps.width, sps.height) if sps is not None else None


def read_sps(access_unit: bytes) -> Sps | None:
    """The access unit's SPS (its profile and picture size); None without a readable one."""
    for nal in nal_units(access_unit):
        if nal and nal[0] & 0x1F == NAL_SPS:
            try:
                return _parse(_unescape(nal[1:MAX_SPS_BYTES]))
            except ValueError:
                return None
    return None


def _parse(sps: bytes) -> Sps:
    bits = _Bits(sps)
    profile_idc = bits.u(8)
    constraint_set0 = bool(bits.u(1))
    bits.u(15)  # the other constraint flags, level_idc
    bits.ue()  # seq_parameter_set_id
    chroma_format_idc = 1
    if profile_idc in HIGH_PROFILES:
        chroma_format_idc = bits.ue()
        if chroma_format_idc == 3:
            bits.u(1)  # separate_colour_plane_flag
        bits.ue()
        bits.ue()  # bit depths
        bits.u(1)  # qpprime_y_zero_transform_bypass_flag
        if bits.u(1):  # seq_scaling_matrix_present_flag
            for i in range(12 if chroma_format_idc == 3 else 8):
                if bits.u(1):
                    _skip_scaling_list(bits, 16 if i < 6 else 64)
    bits.ue()  # log2_max_frame_num_minus4
    poc_type = bits.ue()
    if poc_type == 0:
        bits.ue()
    elif poc_type == 1:
        bits.u(1)
        bits.se()
        bits.se()
        for _ in range(min(bits.ue(), 255)):
            bits.se()
    bits.ue()  # max_num_ref_frames
    bits.u(1)  # gaps_in_frame_num_value_allowed_flag
    width_mbs = bits.ue() + 1
    height_map_units = bits.ue() + 1
    frame_mbs_only = bits.u(1)
    if not frame_mbs_only:
        bits.u(1)  # mb_adaptive_frame_field_flag
    bits.u(1)  # direct_8x8_inference_flag
    width, height = width_mbs * 16, (2 - frame_mbs_only) * height_map_units * 16
    if bits.u(1):  # frame_cropping_flag
        left, right, top, bottom = bits.ue(), bits.ue(), bits.ue(), bits.ue()
        sub_width = 2 if chroma_format_idc in (1, 2) else 1
        sub_height = 2 if chroma_format_idc == 1 else 1
        unit_x = 1 if chroma_format_idc == 0 else sub_width
        unit_y = (2 - frame_mbs_only) * (1 if chroma_format_idc == 0 else sub_height)
        width -= unit_x * (left + right)
        height -= unit_y * (top + bottom)
    if width <= 0 or height <= 0:
        raise ValueError("SPS crops the picture away")
    return Sps(profile_idc, constraint_set0, width, height, _reorder_frames(bits) if bits.u(1) else None,
               bool(frame_mbs_only))


def _reorder_frames(bits: _Bits) -> int | None:
    """max_num_reorder_frames from the VUI (Annex E.1.1), None if it does not say."""
    if bits.u(1):  # aspect_ratio_info_present_flag
        if bits.u(8) == 255:  # Extended_SAR
            bits.u(32)
    if bits.u(1):  # overscan_info_present_flag
        bits.u(1)
    if bits.u(1):  # video_signal_type_present_flag
        bits.u(4)
        if bits.u(1):  # colour_description_present_flag
            bits.u(24)
    if bits.u(1):  # chroma_loc_info_present_flag
        bits.ue()
        bits.ue()
    if bits.u(1):  # timing_info_present_flag
        bits.u(32)
        bits.u(32)
        bits.u(1)
    nal_hrd = bits.u(1)
    if nal_hrd:
        _skip_hrd(bits)
    vcl_hrd = bits.u(1)
    if vcl_hrd:
        _skip_hrd(bits)
    if nal_hrd or vcl_hrd:
        bits.u(1)  # low_delay_hrd_flag
    bits.u(1)  # pic_struct_present_flag
    if not bits.u(1):  # bitstream_restriction_flag
        return None
    bits.u(1)  # motion_vectors_over_pic_boundaries_flag
    for _ in range(4):  # max_bytes_per_pic_denom, max_bits_per_mb_denom, log2_max_mv_length h and v
        bits.ue()
    return bits.ue()


def _skip_hrd(bits: _Bits) -> None:
    cpb_count = bits.ue() + 1
    if cpb_count > 32:
        raise ValueError("bad HRD")
    bits.u(8)  # bit_rate_scale, cpb_size_scale
    for _ in range(cpb_count):
        bits.ue()
        bits.ue()
        bits.u(1)
    bits.u(20)  # four 5-bit lengths and delays


def _skip_scaling_list(bits: _Bits, size: int) -> None:
    last, next_scale = 8, 8
    for _ in range(size):
        if next_scale:
            next_scale = (last + bits.se() + 256) % 256
        last = next_scale or last
