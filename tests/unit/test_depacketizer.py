"""H264Depacketizer on real encoder output packetized by aiortc's own packer (as the origin's
fan-out does): access units come back byte for byte at their marker bit, reordered packets are
waited for, a loss past the gap time skips to the next keyframe and asks for one, and the
result decodes."""

from __future__ import annotations

import av
from aiortc.codecs.h264 import H264Encoder as AiortcH264

from relay.media.depacketizer import H264Depacketizer, begins_idr, starts_keyframe
from tests.unit.test_media import encoded_packets


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def rtp_packets(packets: list[av.Packet], first_seq: int = 65500, first_ts: int = 2**32 - 7200):
    """(seq, timestamp, marker, payload) per RTP packet, sequence numbers and timestamps wrapping."""
    packer = AiortcH264()
    out, seq = [], first_seq
    for packet in packets:
        payloads, _ = packer.pack(packet)
        ts = (first_ts + packet.pts) & 0xFFFFFFFF
        for i, payload in enumerate(payloads):
            out.append((seq & 0xFFFF, ts, i == len(payloads) - 1, payload))
            seq += 1
    return out


def nals(data) -> bytes:
    """An access unit with every start code spelled the same (aiortc writes 4 bytes, x264 often 3)."""
    return bytes(data).replace(b"\x00\x00\x00\x01", b"\x00\x00\x01")


def collect(**kwargs):
    frames, losses, clock = [], [], Clock()
    depacketizer = H264Depacketizer(lambda p, k: frames.append((p, k)), lambda: losses.append(1),
                                    clock=clock, **kwargs)
    return depacketizer, frames, losses, clock


def test_access_units_come_back_whole_at_their_marker_across_wraps():
    source = encoded_packets(30, keyframes_at={10}, noisy=True)  # several RTP packets a frame
    rtp = rtp_packets(source)
    depacketizer, frames, losses, _ = collect()
    for i, entry in enumerate(rtp):
        depacketizer.add(*entry)
        if entry[2]:  # the marker completes the frame at once, not when the next one starts
            assert len(frames) == sum(1 for e in rtp[:i + 1] if e[2])
    assert [nals(p) for p, _ in frames] == [nals(p) for p in source]
    assert [k for _, k in frames] == [p.is_keyframe for p in source]
    assert [p.pts for p, _ in frames] == [i * 3600 for i in range(30)]  # unwrapped past 2**32
    assert not losses
    assert not depacketizer._packets  # nothing held once emitted: memory stays bounded
    decoder = av.CodecContext.create("h264", "r")
    decoded = [f for p, _ in frames for f in decoder.decode(p)]
    assert len(decoded) >= 28


def test_reordered_packets_are_waited_for():
    rtp = rtp_packets(encoded_packets(6, noisy=True))
    reordered = rtp[:3] + [rtp[4], rtp[3]] + rtp[5:]
    depacketizer, frames, losses, _ = collect()
    for entry in reordered:
        depacketizer.add(*entry)
    assert len(frames) == 6 and not losses


def test_a_loss_skips_to_the_next_keyframe_and_asks_for_one():
    source = encoded_packets(30, keyframes_at={15}, noisy=True)
    rtp = rtp_packets(source)
    lost = next(i for i, e in enumerate(rtp) if not e[2] and i > 20 and not starts_keyframe(e[3]))
    depacketizer, frames, losses, clock = collect(gap_seconds=0.5)
    before_loss = sum(1 for e in rtp[:lost] if e[2])
    for i, entry in enumerate(rtp):
        if i == lost:
            continue
        clock.now += 0.01
        depacketizer.add(*entry)
        if i < lost:
            continue
        if not losses:  # still within the NACK window: nothing after the gap goes out
            assert len(frames) == before_loss
        clock.now += 0.04
    assert losses, "the gap outlived gap_seconds: a keyframe must be asked for"
    assert depacketizer.dropped >= 1
    emitted = [nals(p) for p, _ in frames]
    keyframe = nals(source[15])
    # Everything up to the loss, nothing until the next keyframe, then from it on.
    assert emitted[:before_loss] == [nals(p) for p in source[:before_loss]]
    assert emitted[before_loss] == keyframe and emitted[before_loss:] == [nals(p) for p in source[15:]]


def test_joining_mid_stream_starts_at_a_keyframe():
    source = encoded_packets(20, keyframes_at={8})
    depacketizer, frames, losses, _ = collect()
    for entry in rtp_packets(source)[3:]:  # the first frames' packets never arrived
        depacketizer.add(*entry)
    assert frames[0][1] and nals(frames[0][0]) == nals(source[8])
    assert len(frames) == 12


def test_a_whip_keyframe_is_its_idr_wherever_it_sits():
    aud, sei, sps, pps = b"\x09\xf0", b"\x06\x05\x01\x00", b"\x67\x42\xc0\x1f\x80", b"\x68\xce\x3c\x80"
    idr_first, idr_next, p_slice = b"\x65\x88\x84", b"\x65\x08\x84", b"\x41\x9a\x02"

    def stap(*nals: bytes) -> bytes:
        return b"\x18" + b"".join(len(n).to_bytes(2, "big") + n for n in nals)

    assert begins_idr(idr_first) and begins_idr(sps) and begins_idr(stap(aud, sei, sps, pps))
    assert begins_idr(stap(aud, idr_first)) and begins_idr(b"\x7c\x85\x88\x84")  # FU-A: IDR's first fragment
    assert not begins_idr(idr_next) and not begins_idr(p_slice) and not begins_idr(stap(aud, sei))
    assert not begins_idr(b"\x7c\x05\x88\x84") and not begins_idr(b"\x7c\x81\x9a\x02")  # a middle one; a P slice

    # An access unit that opens with an AUD and a SEI, its IDR in a later packet: found, whole, as a keyframe.
    units = []
    depacketizer = H264Depacketizer(lambda packet, keyframe: units.append((bytes(packet), keyframe)),
                                    lambda: None, clock=Clock(), keyframe_start=begins_idr)
    depacketizer.add(10, 3000, False, p_slice)  # the tail of a frame before: no start
    depacketizer.add(11, 3000, True, p_slice)
    depacketizer.add(12, 6000, False, stap(aud, sei))
    depacketizer.add(13, 6000, True, idr_first)
    depacketizer.add(14, 9000, True, p_slice)
    assert [keyframe for _, keyframe in units] == [True, False]
    assert units[0][0].startswith(b"\x00\x00\x00\x01" + aud) and units[0][0].endswith(idr_first)
