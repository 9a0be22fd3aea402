"""RtpOutput.send_frame and retransmit byte for byte, through an injected link (no sockets):
each spectator's headers rewritten over the shared payloads, sequence numbers gapless across
skipped frames and layer switches, and NACKs answered from the right layer's history. Every
datagram is read back with aiortc's own RTP parser."""

from __future__ import annotations

import pytest
from aiortc import RTCPeerConnection
from aiortc.codecs.h264 import H264Encoder as AiortcH264
from aiortc.rtcrtpparameters import RTCRtpHeaderExtensionParameters, RTCRtpSendParameters
from aiortc.rtp import RTCP_RTPFB_NACK, HeaderExtensionsMap, RtcpRtpfbPacket, RtpPacket

from relay.media import rtp_fanout
from relay.media.layers import LOW, MAIN
from relay.media.rtp_fanout import (ABS_SEND_TIME_URI, NTP_SECOND, WRITE_BUFFER_LIMIT, IdleVideoTrack, RtpFanout,
                                    RtpOutput, hook_output)
from tests.unit.test_media import encoded_packets

ADDRESS = ("192.0.2.7", 40000)
AUTH_TAG = b"\xa5" * 10  # what SRTP (HMAC-SHA1-80) appends: marks each datagram as protected once
FRAME_TICKS = 3600  # 25 fps on the 90 kHz video clock
AST_ID = 3


class Link:
    """An output's link with no network: records each datagram, stands in for the SRTP session
    and the socket's write buffer, and keeps what the sender report would carry."""

    def __init__(self, ssrc: int) -> None:
        self.ssrc = ssrc
        self.ready = True
        self.backlog = 0  # bytes the 'kernel' has not sent yet
        self.datagrams: list[bytes] = []
        self.reports: list[tuple[int, int, int, int]] = []
        self.sends_reports = False  # when True, each report is a datagram b"SR<n>" sent with the media

    def path(self):
        return (self.protect, self, ADDRESS) if self.ready else None

    def native_path(self, sockaddr):
        # These tests read the Python loop's bytes (compiled=False); test_fastsend.py compares the two loops.
        raise AssertionError("the compiled loop was asked for")

    def protect(self, packet: bytes) -> bytes:
        return packet + AUTH_TAG

    def get_write_buffer_size(self) -> int:
        return self.backlog

    def sendto(self, data: bytes, address) -> None:
        assert address == ADDRESS and data.endswith(AUTH_TAG)
        self.datagrams.append(data[: -len(AUTH_TAG)])

    def report(self, ntp: int, rtp_timestamp: int, packets: int, octets: int) -> bytes | None:
        self.reports.append((ntp, rtp_timestamp, packets, octets))
        return self.protect(b"SR%d" % len(self.reports)) if self.sends_reports else None

    def packets(self, extensions: HeaderExtensionsMap | None = None) -> list[RtpPacket]:
        return [RtpPacket.parse(d, extensions or HeaderExtensionsMap()) for d in self.datagrams]


class Steer:
    """A layer policy that moves the spectator where the test says (layers.py has its own tests)."""

    layer = MAIN

    def update(self, estimate, main_rate, low_rate, now) -> int:
        return self.layer


def output_on(fanout: RtpFanout, link: Link, payload_type: int, abs_send_time_id: int | None = None) -> RtpOutput:
    output = RtpOutput(fanout, link)
    fanout.adopt(output)
    output.configure(payload_type, abs_send_time_id)
    return output


def payloads_of(packets) -> list[list[bytes]]:
    """Each frame's RTP payloads as the fan-out cuts them (aiortc's packetizer)."""
    packer = AiortcH264()
    return [packer.pack(p)[0] for p in packets]


def assert_gapless(packets: list[RtpPacket]) -> None:
    first = packets[0].sequence_number
    assert [p.sequence_number for p in packets] == [(first + i) & 0xFFFF for i in range(len(packets))]


def frames_of(packets: list[RtpPacket]) -> list[list[RtpPacket]]:
    """Group by frame: a frame's packets share a timestamp and only its last carries the marker."""
    frames, current = [], []
    for packet in packets:
        current.append(packet)
        if packet.marker:
            frames.append(current)
            current = []
    assert not current, "a frame's last packet lacks the marker"
    return frames


def test_each_output_writes_its_own_header_over_the_shared_payloads():
    packets = encoded_packets(8, size=(160, 96), noisy=True)
    expected = payloads_of(packets)
    assert all(len(p) > 1 for p in expected), "noisy frames span several RTP packets"
    fanout = RtpFanout(lambda: None, compiled=False)
    links = Link(0x0A0A0A0A), Link(0x0B0B0B0B)
    outputs = output_on(fanout, links[0], 102), output_on(fanout, links[1], 96)
    for packet in packets:
        fanout.publish(packet, packet.is_keyframe)

    for link, output, payload_type in zip(links, outputs, (102, 96)):
        assert all(d[0] == 0x80 for d in link.datagrams)  # RTP v2, no padding, extension or CSRC: 12 bytes
        sent = link.packets()
        assert_gapless(sent)
        frames = frames_of(sent)
        assert [[p.payload for p in f] for f in frames] == expected
        for i, frame in enumerate(frames):
            assert {(p.ssrc, p.payload_type) for p in frame} == {(link.ssrc, payload_type)}
            assert {p.timestamp for p in frame} == {(sent[0].timestamp + i * FRAME_TICKS) & 0xFFFFFFFF}
        # The first frame took the first sender report along: its clock and the counters up to it.
        assert link.reports[0][1:] == (frames[0][0].timestamp, len(frames[0]), sum(map(len, expected[0])))
        octets = sum(map(len, sum(expected, [])))
        assert (output.packets_sent, output.bytes_sent) == (len(sent), octets)
    # Sequence numbers and timestamps start at random points per spectator.
    a, b = (link.packets()[0] for link in links)
    assert (a.sequence_number, a.timestamp) != (b.sequence_number, b.timestamp)


def test_a_joiner_starts_on_a_keyframe_and_a_backed_up_socket_skips_to_the_next_without_a_gap():
    packets = encoded_packets(12, keyframes_at={0, 9}, size=(160, 96), noisy=True)
    expected = payloads_of(packets)
    requests = []
    fanout = RtpFanout(lambda: requests.append(1), compiled=False)
    link = Link(0x1234)
    link.ready = False  # DTLS still connecting
    output_on(fanout, link, 102)
    for packet in packets[:3]:
        fanout.publish(packet, packet.is_keyframe)
    assert not link.datagrams
    link.ready = True  # up mid-GOP, just after a keyframe: the recent frames are replayed first
    fanout.publish(packets[3], False)
    assert fanout.replays == 1 and not requests
    for packet in packets[4:6]:
        fanout.publish(packet, packet.is_keyframe)
    link.backlog = WRITE_BUFFER_LIMIT + 1  # the kernel cannot take more: skip to a keyframe
    fanout.publish(packets[6], False)
    assert requests == [1]
    link.backlog = 0
    for packet in packets[7:]:
        fanout.publish(packet, packet.is_keyframe)

    sent = link.packets()
    assert_gapless(sent)  # the receiver must not NACK frames it was never meant to get
    frames = frames_of(sent)
    assert [[p.payload for p in f] for f in frames] == expected[:6] + expected[9:]
    start = sent[0].timestamp
    assert [f[0].timestamp - start for f in frames] == [i * FRAME_TICKS for i in [*range(6), 9, 10, 11]]


async def test_layer_switches_keep_sequence_numbers_gapless_and_nacks_find_the_right_layer():
    main_packets = encoded_packets(30, keyframes_at={0, 20}, size=(160, 96), noisy=True)
    low_packets = encoded_packets(30, keyframes_at={0, 10}, size=(80, 48), noisy=True)
    main_payloads, low_payloads = payloads_of(main_packets), payloads_of(low_packets)
    requests = {MAIN: 0, LOW: 0}
    low = RtpFanout(lambda: requests.__setitem__(LOW, requests[LOW] + 1), compiled=False)
    main = RtpFanout(lambda: requests.__setitem__(MAIN, requests[MAIN] + 1), lower=low, compiled=False)
    link = Link(0x5EED)
    output = output_on(main, link, 102, abs_send_time_id=AST_ID)
    output.policy = steer = Steer()
    extensions = HeaderExtensionsMap()
    extensions.configure(RTCRtpSendParameters(
        headerExtensions=[RTCRtpHeaderExtensionParameters(id=AST_ID, uri=ABS_SEND_TIME_URI)]))
    nack_checks = []

    async def nack(frame_payloads, frames, index) -> None:
        """NACK the first packet of sent frame ``index``: the same packet must come back."""
        original = frames[index][0]
        before = len(link.datagrams)
        await output.retransmit(original.sequence_number)
        (resent,) = link.packets()[before:]
        del link.datagrams[before:]  # keep the stream's own datagrams apart from the resends
        assert (resent.sequence_number, resent.timestamp, resent.ssrc, resent.payload_type, resent.marker) == \
            (original.sequence_number, original.timestamp, original.ssrc, original.payload_type, original.marker)
        assert resent.payload == original.payload == frame_payloads[0]
        nack_checks.append(index)

    for i in range(30):
        if i in (5, 15):  # the estimate says: down at frame 5, back up at frame 15
            steer.layer = LOW if i == 5 else MAIN
            output.update_estimate(100_000)
            assert output.layer == steer.layer
        main.publish(main_packets[i], main_packets[i].is_keyframe)
        low.publish(low_packets[i], low_packets[i].is_keyframe)
        frames = frames_of(link.packets(extensions))
        if i == 12:  # on the low layer: NACKs before the switch are served from the main layer
            await nack(main_payloads[2], frames, 2)
            await nack(low_payloads[11], frames, 6)  # sent frames: main 0-4, low 10-12
        if i == 22:  # back on main: the low layer's packets still resend from its history
            await nack(low_payloads[12], frames, 7)
            await nack(main_payloads[21], frames, 11)  # sent frames: main 0-4, low 10-14, main 20-22
    assert nack_checks == [2, 6, 7, 11]
    assert requests == {MAIN: 1, LOW: 1}  # each switch asks the new layer for a keyframe

    sent = link.packets(extensions)
    assert_gapless(sent)
    frames = frames_of(sent)
    layer_of = [*[MAIN] * 5, *[LOW] * 5, *[MAIN] * 10]
    indices = [*range(5), *range(10, 15), *range(20, 30)]  # each switch waits for the new layer's keyframe
    assert [[p.payload for p in f] for f in frames] == [
        (main_payloads if layer == MAIN else low_payloads)[i] for layer, i in zip(layer_of, indices)]
    # Both layers stamp a frame alike: the timestamps run on as if nothing switched.
    assert [f[0].timestamp - sent[0].timestamp for f in frames] == [i * FRAME_TICKS for i in indices]
    assert all(d[0] == 0x90 and p.extensions.abs_send_time is not None for d, p in zip(link.datagrams, sent))
    assert main.outputs == 1 and low.outputs == 0


async def test_a_nack_through_aiortcs_sender_resends_the_packet_byte_for_byte():
    packets = encoded_packets(10, size=(160, 96), noisy=True)
    fanout = RtpFanout(lambda: None, compiled=False)
    pc = RTCPeerConnection()
    try:
        sender = pc.addTransceiver(IdleVideoTrack(), direction="sendonly").sender
        link = Link(sender._ssrc)
        output = output_on(fanout, link, 102)
        hook_output(sender, output)
        for packet in packets:
            fanout.publish(packet, packet.is_keyframe)
        sent = list(link.datagrams)
        wanted = [RtpPacket.parse(sent[i]).sequence_number for i in (3, len(sent) - 1)]
        never_sent = (wanted[1] + 100) & 0xFFFF
        await sender._handle_rtcp_packet(  # as aiortc's DTLS transport hands over a NACK
            RtcpRtpfbPacket(fmt=RTCP_RTPFB_NACK, ssrc=1, media_ssrc=sender._ssrc, lost=[*wanted, never_sent]))
        assert link.datagrams[len(sent):] == [sent[3], sent[-1]]
    finally:
        await pc.close()


@pytest.mark.parametrize("ready", [False, True])
async def test_nothing_is_sent_before_the_answer_gives_the_payload_type(ready):
    fanout = RtpFanout(lambda: None, compiled=False)
    link = Link(1)
    link.ready = ready
    output = RtpOutput(fanout, link)
    fanout.adopt(output)
    for packet in encoded_packets(3):
        fanout.publish(packet, packet.is_keyframe)
    await output.retransmit(0)
    assert not link.datagrams and not link.reports


def test_sender_reports_leave_after_a_frames_packets_about_once_a_second_counting_that_frame(monkeypatch):
    clock = [1 << 40]  # NTP time, stepped by the test: 0.3 s per frame
    monkeypatch.setattr(rtp_fanout, "current_ntp_time", lambda: clock[0])
    packets = encoded_packets(12, size=(160, 96), noisy=True)
    fanout = RtpFanout(lambda: None, compiled=False)
    link = Link(0x0C0C0C0C)
    link.sends_reports = True
    output_on(fanout, link, 96)
    for i, packet in enumerate(packets):
        clock[0] = (1 << 40) + i * 3 * NTP_SECOND // 10
        fanout.publish(packet, packet.is_keyframe)
    sent, reports = [], []
    for datagram in link.datagrams:
        if datagram.startswith(b"SR"):  # right after the last packet of the frame it counts
            reports.append(datagram)
            assert sent[-1].marker and link.reports[len(reports) - 1][2] == len(sent)
        else:
            sent.append(RtpPacket.parse(datagram))
    assert reports == [b"SR%d" % (i + 1) for i in range(len(link.reports))]
    assert link.reports[0][0] == 1 << 40  # the first goes with the first frame
    times = [ntp for ntp, *_ in link.reports]
    gaps = [(b - a) / NTP_SECOND for a, b in zip(times, times[1:])]
    assert len(gaps) >= 2 and all(0.5 <= gap < 1.5 + 0.3 for gap in gaps), gaps  # RFC 3550's 0.5-1.5 s
    frames = frames_of(sent)
    for ntp, rtp_timestamp, packets_sent, octets in link.reports:
        upto = frames[: round((ntp - (1 << 40)) * 10 / (3 * NTP_SECOND)) + 1]  # up to the frame sent at ntp
        assert rtp_timestamp == upto[-1][0].timestamp
        assert (packets_sent, octets) == (sum(map(len, upto)), sum(len(p.payload) for f in upto for p in f))
