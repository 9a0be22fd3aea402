"""The compiled send loop (relay/media/_fastsend.c) against the Python loop, byte for byte.

Two outputs with the same SSRC, payload type and SRTP key send the same frames over real loopback
UDP sockets, one through each loop; SRTP is deterministic for the same key, SSRC and sequence
numbers, so the datagrams must be identical, and each must unprotect to the RTP the Python loop
writes. Where the extension was not built (no C compiler) the compiled half cannot run: the Python
loop is then what the relay uses, and tests/unit/test_rtp_output.py covers it.
"""

from __future__ import annotations

import os
import socket

import pytest
from aiortc.rtp import HeaderExtensionsMap, RtcpPacket, RtcpSenderInfo, RtcpSrPacket, RtpPacket
from aiortc.rtcrtpparameters import RTCRtpHeaderExtensionParameters, RTCRtpSendParameters
from pylibsrtp import Policy, Session

from relay.media import rtp_fanout
from relay.media.aiortc_hooks import srtp_session_address
from relay.media.rtp_fanout import ABS_SEND_TIME_URI, RtpFanout, RtpOutput
from tests.unit.test_media import encoded_packets

needs_compiled = pytest.mark.skipif(rtp_fanout._fastsend is None,
                                    reason="relay/media/_fastsend.c was not built here (no C compiler)")
KEY = bytes(range(30))  # AES-128 key + salt
SSRC = 0x1234ABCD


def srtp_pair() -> tuple[Session, Session]:
    tx = Session(Policy(key=KEY, ssrc_type=Policy.SSRC_ANY_OUTBOUND))
    rx = Session(Policy(key=KEY, ssrc_type=Policy.SSRC_ANY_INBOUND))
    return tx, rx


class UdpLink:
    """A spectator's link over a real loopback socket and a real libsrtp session."""

    def __init__(self) -> None:
        self.ssrc = SSRC
        self.session, self.rx = srtp_pair()
        self.out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.out.setblocking(False)
        self.inbox = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.inbox.bind(("127.0.0.1", 0))
        self.inbox.settimeout(2)
        self.addr = self.inbox.getsockname()
        self.reports: list[tuple[int, int, int]] = []

    def path(self):
        return self.session.protect, self, self.addr

    def native_path(self, sockaddr):
        return self.out.fileno(), sockaddr(*self.addr), srtp_session_address(self.session)

    def get_write_buffer_size(self) -> int:
        return 0

    def sendto(self, data: bytes, addr) -> None:
        self.out.sendto(data, addr)

    def report(self, ntp: int, rtp_timestamp: int, packets: int, octets: int) -> bytes:
        """A real SRTCP sender report; its NTP time left out, so that both loops send the same bytes."""
        self.reports.append((rtp_timestamp, packets, octets))
        info = RtcpSenderInfo(ntp_timestamp=0, rtp_timestamp=rtp_timestamp, packet_count=packets, octet_count=octets)
        return self.session.protect_rtcp(bytes(RtcpSrPacket(ssrc=self.ssrc, sender_info=info)))

    def received(self, count: int) -> list[bytes]:
        return [self.inbox.recv(4096) for _ in range(count)]

    def close(self) -> None:
        self.out.close()
        self.inbox.close()


def send_frames(compiled: bool, frames, abs_send_time_id: int | None):
    fanout = RtpFanout(lambda: None, compiled=compiled)
    if abs_send_time_id is not None:
        fanout.lower = RtpFanout(lambda: None, compiled=compiled)  # abs-send-time is written with layers only
    link = UdpLink()
    output = RtpOutput(fanout, link)
    output._seq_offset, output._ts_origin = 65530, 0xFFFFFF00  # both wrap within the test
    fanout.adopt(output)
    output.configure(96, abs_send_time_id)
    total, first_frame = 0, None
    for packet in frames:
        before = output.packets_sent
        fanout.publish(packet, packet.is_keyframe)
        total += output.packets_sent - before
        first_frame = first_frame or output.packets_sent
    # The frames follow each other faster than a report interval: only the first frame carries one.
    assert len(link.reports) == 1 and link.reports[0][1] == first_frame
    received = link.received(total + 1)
    reports = [i for i, d in enumerate(received) if d[1] == 200]  # RTCP SR (the header is not encrypted)
    assert reports == [first_frame], "the sender report leaves right after the first frame's packets"
    rtcp = received.pop(first_frame)
    report = RtcpPacket.parse(link.rx.unprotect_rtcp(rtcp))[0]
    assert (report.ssrc, report.sender_info.rtp_timestamp, report.sender_info.packet_count,
            report.sender_info.octet_count) == (SSRC, *link.reports[0])
    plain = [link.rx.unprotect(d) for d in received]
    link.close()
    return received + [rtcp], plain, output


@needs_compiled
@pytest.mark.parametrize("abs_send_time_id", [None, 3])
def test_the_compiled_loop_sends_exactly_the_python_loops_datagrams(abs_send_time_id):
    frames = encoded_packets(8, noisy=True)  # a keyframe, then deltas: several packets each, large frames many
    compiled, compiled_plain, out_c = send_frames(True, frames, abs_send_time_id)
    python, python_plain, out_p = send_frames(False, frames, abs_send_time_id)
    assert len(compiled) == len(python) > len(frames)
    if abs_send_time_id is None:
        assert compiled == python  # same key, SSRC, sequence numbers: same ciphertext and tags
    else:  # abs-send-time is the clock at sending (header bytes 17-19): equal apart from it
        def masked(plain):
            return [p[:17] + p[20:] for p in plain]
        assert masked(compiled_plain) == masked(python_plain)
        assert [len(d) for d in compiled] == [len(d) for d in python]
    assert out_c.packets_sent == out_p.packets_sent and out_c.bytes_sent == out_p.bytes_sent
    extensions = HeaderExtensionsMap()
    if abs_send_time_id is not None:
        extensions.configure(RTCRtpSendParameters(headerExtensions=[
            RTCRtpHeaderExtensionParameters(id=abs_send_time_id, uri=ABS_SEND_TIME_URI)]))
    packets = [RtpPacket.parse(p, extensions) for p in compiled_plain]
    seqs = [p.sequence_number for p in packets]
    assert seqs == [(65530 + i) & 0xFFFF for i in range(len(packets))]  # gapless through the wrap
    assert all(p.ssrc == SSRC and p.payload_type == 96 for p in packets)
    assert sum(p.marker for p in packets) == len(frames)  # one marker per frame, on its last packet
    if abs_send_time_id is not None:
        assert all(p.extensions.abs_send_time is not None for p in packets)


@needs_compiled
def test_the_build_is_of_the_c_source_this_module_calls():
    assert rtp_fanout._fastsend.API == rtp_fanout.FASTSEND_API  # else rtp_fanout falls back to Python


def test_the_python_loop_is_chosen_when_asked_or_when_nothing_was_built():
    assert RtpFanout(lambda: None, compiled=False).compiled is False
    assert RtpFanout(lambda: None).compiled is (rtp_fanout._fastsend is not None)


@needs_compiled
def test_the_compiled_loop_refuses_what_is_not_a_payload():
    link = UdpLink()
    native = link.native_path(rtp_fanout._fastsend.sockaddr)
    with pytest.raises(ValueError):
        rtp_fanout._fastsend.send_frame(*native, [b"x" * 5000], 96, 0, 0, SSRC, -1, True)
    with pytest.raises(ValueError):
        rtp_fanout._fastsend.send_frame(*native, ["text"], 96, 0, 0, SSRC, -1, True)
    with pytest.raises(ValueError):
        rtp_fanout._fastsend.sockaddr("not an address", 1)
    assert rtp_fanout._fastsend.sockaddr("::1", 9)[:2] == socket.AF_INET6.to_bytes(2, "little")
    link.close()
    assert os.path.exists(rtp_fanout._fastsend.__file__)


def output_for(link, compiled: bool = True) -> tuple[RtpFanout, RtpOutput, list[int]]:
    asked: list[int] = []
    fanout = RtpFanout(lambda: asked.append(1), compiled=compiled)
    output = RtpOutput(fanout, link)
    fanout.adopt(output)
    output.configure(96)
    return fanout, output, asked


@needs_compiled
def test_a_route_that_refuses_gso_gets_every_datagram_without_it():
    # SO_NO_CHECK (no UDP checksums) makes the kernel refuse UDP GSO with EINVAL: the compiled loop sends the
    # frame again one datagram per message and keeps GSO off for this spectator only.
    frames = encoded_packets(3, noisy=True)
    link = UdpLink()
    link.out.setsockopt(socket.SOL_SOCKET, 11, 1)  # SO_NO_CHECK
    fanout, output, asked = output_for(link)
    other = UdpLink()
    fanout_b, output_b, _ = output_for(other)
    for packet in frames:
        fanout.publish(packet, packet.is_keyframe)
        fanout_b.publish(packet, packet.is_keyframe)
    assert output._gso is False and output_b._gso is True
    assert output.packets_sent == output_b.packets_sent > len(frames) and not asked
    assert len(link.received(output.packets_sent)) == output.packets_sent
    link.close()
    other.close()


@needs_compiled
def test_a_failing_route_loses_the_frame_but_never_reuses_a_sequence_number_or_asks_for_keyframes():
    # A broadcast address without SO_BROADCAST: EACCES from the kernel on every send, as a broken route.
    frames = encoded_packets(3, noisy=True)
    link = UdpLink()
    link.addr = ("255.255.255.255", 9)
    fanout, output, asked = output_for(link)
    for packet in frames:
        fanout.publish(packet, packet.is_keyframe)
    expected = sum(len(fanout._packer.pack(p)[0]) for p in frames)  # as if lost on the way
    assert output._next_seq_index - output._seq_offset == expected
    assert not asked and not output._waiting_for_keyframe and output.bytes_sent == 0
    link.close()
