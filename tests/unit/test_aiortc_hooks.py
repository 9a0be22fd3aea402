"""Every aiortc/aioice internal that relay/media/aiortc_hooks.py touches, checked on the installed
(pinned) versions: that it exists with the shape the hook relies on, and that aiortc still reaches
it the way the hook assumes (a replaced attribute nobody calls any more would fail silently).
A version bump that moves one fails here, by name, not as a frozen spectator in production."""

from __future__ import annotations

import asyncio
import inspect

import aioice.ice
import pylibsrtp
import pytest
from aioice import stun
from aiortc import RTCPeerConnection
from aiortc.rtcdtlstransport import RTCDtlsTransport
from aiortc.rtcrtpparameters import (RTCRtcpParameters, RTCRtpCodecParameters, RTCRtpHeaderExtensionParameters,
                                     RTCRtpSendParameters)
from aiortc.rtcdtlstransport import State as DtlsState
from aiortc.rtcrtpsender import RTCRtpSender
from aiortc.rtp import (RTCP_PSFB_PLI, RTCP_RTPFB_NACK, RtcpPsfbPacket, RtcpReceiverInfo, RtcpRrPacket,
                        RtcpRtpfbPacket)

from relay.media import aiortc_hooks
from relay.media.rtp_fanout import ABS_SEND_TIME_URI, IdleVideoTrack
from relay.media.webrtc import hook_sender, restrict_ice_host_addresses


def parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def names_used(function) -> set[str]:
    """Global and attribute names a function's own code looks up at call time."""
    return set(function.__code__.co_names)


@pytest.fixture
async def sender():
    """A real RTCRtpSender with its DTLS and ICE transports, never negotiated (no network)."""
    pc = RTCPeerConnection()
    transceiver = pc.addTransceiver(IdleVideoTrack(), direction="sendonly")
    yield transceiver.sender
    await pc.close()


# ----------------------------------------------------------------- each patched attribute


def test_aioice_host_address_lookup_is_a_module_function_looked_up_at_each_gathering():
    assert callable(aioice.ice.get_host_addresses)
    assert parameters(aioice.ice.get_host_addresses) == ["use_ipv4", "use_ipv6"]  # called by keyword
    assert "get_host_addresses" in names_used(aioice.ice.Connection.gather_candidates)


def test_sender_keyframe_request_takes_no_argument_and_pli_reaches_it():
    assert parameters(RTCRtpSender._send_keyframe) == ["self"]
    assert "_send_keyframe" in names_used(RTCRtpSender._handle_rtcp_packet)


def test_sender_rtcp_handler_is_a_coroutine_of_one_packet_awaited_by_the_dtls_transport():
    assert inspect.iscoroutinefunction(RTCRtpSender._handle_rtcp_packet)
    assert parameters(RTCRtpSender._handle_rtcp_packet) == ["self", "packet"]
    assert "_handle_rtcp_packet" in names_used(RTCDtlsTransport._handle_rtcp_data)


def test_sender_retransmit_is_a_coroutine_of_one_sequence_number_called_per_nack():
    assert inspect.iscoroutinefunction(RTCRtpSender._retransmit)
    assert parameters(RTCRtpSender._retransmit) == ["self", "sequence_number"]
    assert "_retransmit" in names_used(RTCRtpSender._handle_rtcp_packet)


def test_sender_send_is_a_coroutine_of_the_parameters():
    assert inspect.iscoroutinefunction(RTCRtpSender.send)
    assert parameters(RTCRtpSender.send) == ["self", "parameters"]


def test_ice_connection_request_received_is_what_the_stun_protocol_calls():
    assert parameters(aioice.ice.Connection.request_received) == ["self", "message", "addr", "protocol"]
    assert "request_received" in names_used(aioice.ice.StunProtocol.datagram_received)


REPORT_COUNTERS = ["_RTCRtpSender__ntp_timestamp", "_RTCRtpSender__rtp_timestamp",
                   "_RTCRtpSender__packet_count", "_RTCRtpSender__octet_count"]


async def test_sender_ssrc_and_report_counters_exist_and_feed_its_sender_reports(sender):
    assert isinstance(sender._ssrc, int)
    for counter in REPORT_COUNTERS:
        assert isinstance(getattr(sender, counter), int), counter
        assert counter in names_used(RTCRtpSender._run_rtcp), counter


def test_sender_reports_are_taken_from_a_task_send_starts_and_stop_waits_for():
    """take_over_sender_reports replaces ``_run_rtcp`` (started by send(), flagged to stop()) and
    SenderLink.report keeps what aiortc's loop kept: the counters, the CNAME, LSR for the RTT."""
    assert "_run_rtcp" in names_used(RTCRtpSender.send) and "_RTCRtpSender__cname" in names_used(RTCRtpSender.send)
    flags = {"_RTCRtpSender__rtcp_started", "_RTCRtpSender__rtcp_exited"}
    assert flags <= names_used(RTCRtpSender.stop)
    rtcp_loop = names_used(RTCRtpSender._run_rtcp)
    assert flags | {"_RTCRtpSender__cname", "_RTCRtpSender__lsr", "_RTCRtpSender__lsr_time", "_send_rtcp"} <= rtcp_loop
    assert {"_RTCRtpSender__lsr", "_RTCRtpSender__lsr_time"} <= names_used(RTCRtpSender._handle_rtcp_packet)
    assert {"_RTCRtpSender__packet_count", "_RTCRtpSender__octet_count"} <= names_used(RTCRtpSender.getStats)
    assert inspect.iscoroutinefunction(RTCRtpSender._send_rtcp) and parameters(RTCRtpSender._send_rtcp) == [
        "self", "packets"]
    assert callable(pylibsrtp.Session.protect_rtcp) and "protect_rtcp" in names_used(RTCDtlsTransport._send_rtp)


async def test_a_sender_whose_reports_are_taken_over_starts_and_stops_without_its_rtcp_loop(sender):
    aiortc_hooks.take_over_sender_reports(sender)
    sent = []

    async def send_rtcp(packets) -> None:
        sent.extend(packets)

    sender._send_rtcp = send_rtcp
    sender.transport._register_rtp_sender = lambda *args: None  # no DTLS here: only the tasks are under test
    sender.transport._unregister_rtp_sender = lambda *args: None
    await sender.send(RTCRtpSendParameters(codecs=[RTCRtpCodecParameters(
        mimeType="video/H264", clockRate=90000, payloadType=102)], rtcp=RTCRtcpParameters(cname="c")))
    await asyncio.wait_for(sender.stop(), 2)  # returns once our task has said BYE
    assert [type(p).__name__ for p in sent] == ["RtcpByePacket"] and sent[0].sources == [sender._ssrc]


async def test_dtls_state_srtp_session_and_ice_connection_under_a_sender(sender):
    dtls = sender.transport
    assert dtls._state == DtlsState.NEW and DtlsState.CONNECTED.name == "CONNECTED"
    assert dtls._tx_srtp is None  # a pylibsrtp Session once DTLS completes
    assert "_tx_srtp" in names_used(RTCDtlsTransport._setup_srtp) and callable(pylibsrtp.Session.protect)
    ice = sender.transport.transport._connection
    assert isinstance(ice, aioice.ice.Connection)
    assert ice._nominated == {} and "_nominated" in names_used(aioice.ice.Connection.sendto)


def test_a_nominated_pair_has_its_protocol_and_remote_address():
    candidate = aioice.Candidate("1", 1, "udp", 1, "192.0.2.1", 5000, "host")
    pair = aioice.ice.CandidatePair(protocol=object(), remote_candidate=candidate)
    assert pair.protocol is not None and pair.remote_addr == ("192.0.2.1", 5000)
    assert "transport" in aioice.ice.StunProtocol.__annotations__  # set by connection_made


# ----------------------------------------------------------------- each hook, on a real sender


async def test_keyframe_requests_and_rtcp_reach_the_hooks_and_aiortc_still_handles_them(sender):
    keyframes, heard = [], []
    hook_sender(sender, lambda: keyframes.append(1), lambda: heard.append(1))
    await sender._handle_rtcp_packet(RtcpPsfbPacket(fmt=RTCP_PSFB_PLI, ssrc=1, media_ssrc=sender._ssrc))
    assert keyframes == [1] and heard == [1]
    report = RtcpReceiverInfo(ssrc=sender._ssrc, fraction_lost=0, packets_lost=0, highest_sequence=1,
                              jitter=0, lsr=0, dlsr=0)
    await sender._handle_rtcp_packet(RtcpRrPacket(ssrc=1, reports=[report]))  # aiortc files it in its stats
    assert heard == [1, 1] and keyframes == [1]


async def test_retransmissions_and_send_parameters_are_routed(sender):
    nacked, seen = [], []

    async def retransmit(seq: int) -> None:
        nacked.append(seq)

    aiortc_hooks.route_retransmissions(sender, retransmit)
    await sender._handle_rtcp_packet(RtcpRtpfbPacket(fmt=RTCP_RTPFB_NACK, ssrc=1, media_ssrc=sender._ssrc,
                                                      lost=[7, 9]))
    assert nacked == [7, 9]
    aiortc_hooks.observe_send_parameters(sender, seen.append)
    sent = RTCRtpSendParameters(
        codecs=[RTCRtpCodecParameters(mimeType="video/H264", clockRate=90000, payloadType=102)],
        headerExtensions=[RTCRtpHeaderExtensionParameters(id=3, uri=ABS_SEND_TIME_URI)],
        muxId="0", rtcp=RTCRtcpParameters(cname="relay"))
    await sender.send(sent)  # aiortc starts its RTP and RTCP loops; the fixture's close stops them
    assert seen == [sent]


async def test_stun_requests_reach_the_hook_and_aioice_still_answers(sender):
    heard, sent = [], []

    class Transport(asyncio.DatagramTransport):
        def sendto(self, data, addr=None):
            sent.append((data, addr))

    aiortc_hooks.observe_stun_requests(sender, lambda: heard.append(1))
    protocol = aioice.ice.StunProtocol(sender.transport.transport._connection)
    protocol.connection_made(Transport())
    request = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    protocol.datagram_received(bytes(request), ("192.0.2.1", 5000))  # unauthenticated: aioice refuses
    assert heard == [1]
    (answer, addr), = sent
    assert stun.parse_message(answer).attributes["ERROR-CODE"][0] == 400 and addr == ("192.0.2.1", 5000)


async def test_host_address_lookup_is_replaced_for_the_whole_process(monkeypatch):
    monkeypatch.setattr(aioice.ice, "get_host_addresses", aioice.ice.get_host_addresses)  # restored after
    restrict_ice_host_addresses(("127.0.0.1", "::1"))
    assert aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=False) == ["127.0.0.1"]
    assert aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=True) == ["127.0.0.1", "::1"]
    connection = aioice.Connection(ice_controlling=True)
    await connection.gather_candidates()
    assert {c.host for c in connection.local_candidates} == {"127.0.0.1", "::1"}
    await connection.close()


async def test_a_sender_link_is_not_ready_before_dtls_and_has_no_report_to_send(sender):
    link = aiortc_hooks.SenderLink(sender)
    assert link.ssrc == sender._ssrc and link.path() is None
    assert link.report(ntp=1 << 40, rtp_timestamp=90000, packets=3, octets=3000) is None


# ----------------------------------------------------------------- the receiver (a cluster edge's feed)


def test_receiver_rtp_handler_is_awaited_by_the_dtls_transport_and_fills_the_decoder_queue():
    from aiortc.rtcrtpreceiver import RTCRtpReceiver
    assert parameters(RTCRtpReceiver._handle_rtp_packet) == ["self", "packet", "arrival_time_ms"]
    assert inspect.iscoroutinefunction(RTCRtpReceiver._handle_rtp_packet)
    assert "_handle_rtp_packet" in names_used(RTCDtlsTransport._handle_rtp_data)
    # Complete frames go to the private decoder queue, which receive() hands to the decoder thread.
    assert "_RTCRtpReceiver__decoder_queue" in names_used(RTCRtpReceiver._handle_rtp_packet)
    assert "_RTCRtpReceiver__decoder_queue" in names_used(RTCRtpReceiver.receive)
    assert parameters(RTCRtpReceiver._send_rtcp_pli) == ["self", "media_ssrc"]
    assert inspect.iscoroutinefunction(RTCRtpReceiver._send_rtcp_pli)


async def test_an_undecoded_receiver_shows_packets_first_decodes_nothing_and_ends_its_thread():
    from aiortc.rtcrtpparameters import RTCRtpReceiveParameters
    from aiortc.rtp import RtpPacket
    pc = RTCPeerConnection()
    receiver = pc.addTransceiver("video", direction="recvonly").receiver
    seen = []
    aiortc_hooks.receive_rtp_undecoded(receiver, seen.append)
    codec = RTCRtpCodecParameters(mimeType="video/H264", clockRate=90000, payloadType=102)
    receiver._track = __import__("aiortc.rtcrtpreceiver", fromlist=["RemoteStreamTrack"]).RemoteStreamTrack("video")
    await receiver.receive(RTCRtpReceiveParameters(codecs=[codec]))
    try:
        decoder_queue = receiver._RTCRtpReceiver__decoder_queue
        for seq, ts in ((1, 0), (2, 3600), (3, 7200)):  # frames complete as the next one starts
            packet = RtpPacket(payload_type=102, sequence_number=seq, timestamp=ts, marker=1,
                               payload=b"\x65\x88\x84\x00")  # a single-NAL IDR slice
            await receiver._handle_rtp_packet(packet, arrival_time_ms=0)
        assert [p.sequence_number for p in seen] == [1, 2, 3]
        assert decoder_queue.qsize() == 0  # nothing queued for decoding
    finally:
        await receiver.stop()
        await pc.close()
    assert receiver._RTCRtpReceiver__decoder_thread is None  # the end marker passed: thread joined
