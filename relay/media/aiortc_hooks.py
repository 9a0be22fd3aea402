"""Every place the relay reaches into aiortc's and aioice's internals, and why aiortc needs it.

aiortc is built for a peer that encodes and sends its own media. The relay encodes once and
writes every spectator's RTP itself (rtp_fanout.py), learns that a spectator is alive from
packets aiortc keeps to itself, and chooses which local addresses ICE offers. aiortc has no
public API for any of that, so a few private attributes are read, replaced or wrapped: all of
them here, one named function (or SenderLink) each, so that a new aiortc or aioice breaks this
module only. tests/unit/test_aiortc_hooks.py checks every attribute named here on the pinned
versions (pyproject.toml); move the pin only with that test green.

What the relay does with each hook (route keyframe requests to the shared encoder, count a
spectator as heard, map NACKs into the shared history) stays with the caller: webrtc.py and
rtp_fanout.py.
"""

from __future__ import annotations

import asyncio
import queue
import time
from typing import Any, Awaitable, Callable

import aioice.ice
import pylibsrtp
from pylibsrtp._binding import ffi as srtp_ffi, lib as srtp_lib
from aiortc.rtcdtlstransport import State as DtlsState
from aiortc.rtcrtpparameters import RTCRtpSendParameters
from aiortc.rtcrtpreceiver import RTCRtpReceiver
from aiortc.rtcrtpsender import RTCRtpSender
from aiortc.rtp import (AnyRtcpPacket, RtcpByePacket, RtcpSdesPacket, RtcpSenderInfo, RtcpSourceInfo, RtcpSrPacket,
                       RtpPacket)

RTP_COMPONENT = 1  # aiortc bundles and muxes RTCP: one ICE component carries everything


def replace_host_address_lookup(lookup: Callable[..., list[str]]) -> None:
    """aioice gathers host candidates on the addresses ``get_host_addresses(use_ipv4=, use_ipv6=)``
    returns (every interface but loopback) and has no option to choose them. Its Connection
    looks the function up in its module at each gathering, so replacing it there applies to
    every peer connection of this process."""
    aioice.ice.get_host_addresses = lookup


def route_keyframe_requests(sender: RTCRtpSender, on_request: Callable[[], None]) -> None:
    """RTCRtpSender answers a PLI/FIR by calling its ``_send_keyframe()``, which flags its own
    encoder; a sender fed ready-made packets has none, so the request would be lost."""
    sender._send_keyframe = on_request  # type: ignore[method-assign]


def observe_rtcp(sender: RTCRtpSender, observe: Callable[[AnyRtcpPacket], None]) -> None:
    """Show every RTCP packet routed to this sender to ``observe`` before aiortc handles it.
    aiortc raises no event for RTCP: its DTLS transport awaits ``_handle_rtcp_packet(packet)``
    on the sender, which keeps receiver reports for its stats and reads REMB only to retune its
    own encoder. Each call wraps once more: every observer sees every packet."""
    handle = sender._handle_rtcp_packet

    async def handle_rtcp(packet: AnyRtcpPacket) -> None:
        observe(packet)
        await handle(packet)

    sender._handle_rtcp_packet = handle_rtcp  # type: ignore[method-assign]


def observe_stun_requests(sender: RTCRtpSender, observe: Callable[[], None]) -> None:
    """Call ``observe`` on every STUN request (ICE consent check) that reaches the ICE
    connection under this sender. aiortc keeps aioice's Connection behind its ICE transport and
    passes none of them on; aioice's StunProtocol calls ``request_received`` on it per request."""
    ice = _ice_connection(sender)
    received = ice.request_received

    def request_received(*args: Any) -> None:
        observe()
        return received(*args)

    ice.request_received = request_received  # type: ignore[method-assign]


def observe_send_parameters(sender: RTCRtpSender, observe: Callable[[RTCRtpSendParameters], None]) -> None:
    """Show the negotiated send parameters (payload type, header extension ids) to ``observe``
    before the sender starts. aiortc applies them in ``send(parameters)`` and exposes them
    nowhere else; whoever writes the RTP headers needs them."""
    start = sender.send

    async def send(parameters: RTCRtpSendParameters) -> None:
        observe(parameters)
        await start(parameters)

    sender.send = send  # type: ignore[method-assign]


def take_over_sender_reports(sender: RTCRtpSender) -> None:
    """aiortc's ``send()`` starts ``_run_rtcp()`` per sender: a task that wakes every 0.5-1.5 s, builds
    a sender report (SR + SDES CNAME) from the counters its own RTP loop keeps and sends it in a
    syscall of its own (per spectator: a timer, objects and a sendmsg each second). Whoever sends the
    media sends the reports with it instead (SenderLink.report); this task then only waits for
    ``stop()`` to cancel it and sends the BYE, as aiortc's does. Call it before ``send()``."""

    async def run_rtcp() -> None:
        sender._RTCRtpSender__rtcp_started.set()  # type: ignore[attr-defined]  # stop() awaits it
        try:
            await asyncio.get_running_loop().create_future()  # never set: only cancel() ends it
        except asyncio.CancelledError:
            pass
        await sender._send_rtcp([RtcpByePacket(sources=[sender._ssrc])])
        sender._RTCRtpSender__rtcp_exited.set()  # type: ignore[attr-defined]

    sender._run_rtcp = run_rtcp  # type: ignore[method-assign]


def route_retransmissions(sender: RTCRtpSender, retransmit: Callable[[int], Awaitable[None]]) -> None:
    """aiortc answers each NACKed sequence number with ``await _retransmit(seq)`` from the
    history its own RTP loop fills; when another sender writes the packets, that history is empty."""
    sender._retransmit = retransmit  # type: ignore[method-assign]


class _NoDecoding(queue.Queue):
    """The receiver's decoder queue, minus the decoding: assembled frames are dropped at the
    door; only the end marker (None) passes, so the idle decoder thread still ends on close."""

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        if item is None:
            super().put(item, block, timeout)


def receive_rtp_undecoded(receiver: RTCRtpReceiver, on_packet: Callable[[RtpPacket], None]) -> None:
    """Show every RTP packet the receiver gets to ``on_packet`` (first, before aiortc's jitter
    buffer holds it back a frame), and never decode: a cluster edge forwards the origin's H.264 as
    it is. aiortc has no packet-level API on a receiver: its DTLS transport awaits
    ``_handle_rtp_packet(packet, arrival_time_ms=)`` per packet, which keeps the receiver reports'
    statistics and sends NACKs (wanted), then hands complete frames to a decoder thread through the
    private ``__decoder_queue`` that ``receive()`` passes to the thread it starts. Call this before
    the remote description is applied (before ``receive()``): the thread then takes the queue that
    decodes nothing."""
    receiver._RTCRtpReceiver__decoder_queue = _NoDecoding()  # type: ignore[attr-defined]
    handle = receiver._handle_rtp_packet

    async def handle_rtp(packet: RtpPacket, arrival_time_ms: int) -> None:
        on_packet(packet)
        await handle(packet, arrival_time_ms)

    receiver._handle_rtp_packet = handle_rtp  # type: ignore[method-assign]


async def send_picture_loss(receiver: RTCRtpReceiver, media_ssrc: int) -> None:
    """Ask the sender of ``media_ssrc`` for a keyframe (RTCP PLI). aiortc's receiver sends one only
    on its own decoder's errors, through ``_send_rtcp_pli`` (a no-op until its RTCP SSRC is set);
    an edge that never decodes asks on behalf of its own spectators."""
    await receiver._send_rtcp_pli(media_ssrc)


class SenderLink:
    """What a sender that bypasses RTCRtpSender's RTP loop needs of it: the SSRC aiortc chose
    (and signalled in the SDP), a synchronous way to send (the sender's SRTP session and the
    nominated ICE pair's socket; aiortc itself awaits three coroutines per datagram), and its sender
    reports (see take_over_sender_reports)."""

    __slots__ = ("_sender", "_dtls", "_ice", "ssrc", "_native_for", "_native")

    def __init__(self, sender: RTCRtpSender) -> None:
        self._sender = sender
        self._dtls = sender.transport
        self._ice = _ice_connection(sender)
        self.ssrc: int = sender._ssrc  # random, public only through stats and the SDP
        self._native_for: tuple = (None, None, None)  # the (pair, transport, session) _native was computed for
        self._native: tuple[int, bytes, int] | None = None

    def path(self) -> tuple[Callable[[bytes], bytes], Any, tuple[str, int]] | None:
        """(protect, datagram transport, remote address) once DTLS is connected and ICE has
        nominated a pair with an open socket, else None."""
        if self._dtls._state != DtlsState.CONNECTED:
            return None
        pair = self._ice._nominated.get(RTP_COMPONENT)
        if pair is None or pair.protocol.transport is None:
            return None
        return self._dtls._tx_srtp.protect, pair.protocol.transport, pair.remote_addr

    def native_path(self, sockaddr: Callable[[str, int], bytes]) -> tuple[int, bytes, int] | None:
        """The same path for the compiled send loop (media/_fastsend.c): (the nominated pair's socket
        fd, its remote address packed by ``sockaddr``, the address of the sender's libsrtp session,
        which pylibsrtp keeps as a cffi pointer), computed again only when the pair or session changes.
        Called per frame per spectator: identity checks only (a pair's remote address never changes)."""
        if self._dtls._state != DtlsState.CONNECTED:
            return None
        pair = self._ice._nominated.get(RTP_COMPONENT)
        if pair is None:
            return None
        transport = pair.protocol.transport
        if transport is None:
            return None
        session = self._dtls._tx_srtp
        cached_pair, cached_transport, cached_session = self._native_for
        if pair is not cached_pair or transport is not cached_transport or session is not cached_session:
            fd = transport.get_extra_info("socket").fileno()
            self._native = (fd, sockaddr(*pair.remote_addr[:2]), srtp_session_address(session))
            self._native_for = (pair, transport, session)
        return self._native

    def report(self, ntp: int, rtp_timestamp: int, packets: int, octets: int) -> bytes | None:
        """The sender report (SR + SDES CNAME, SRTCP-protected) for this clock and these counters,
        as aiortc's ``_run_rtcp`` builds it, or None before DTLS is up. The sender keeps what its
        stats and RTT estimate read (name-mangled, so written by their mangled names): the counters
        for getStats, and when the last report left (LSR) for the receivers' replies."""
        if self._dtls._state != DtlsState.CONNECTED:
            return None
        sender = self._sender
        packets &= 0xFFFFFFFF
        octets &= 0xFFFFFFFF
        data = bytes(RtcpSrPacket(ssrc=self.ssrc, sender_info=RtcpSenderInfo(
            ntp_timestamp=ntp, rtp_timestamp=rtp_timestamp, packet_count=packets, octet_count=octets)))
        cname = sender._RTCRtpSender__cname  # type: ignore[attr-defined]
        if cname is not None:
            data += bytes(RtcpSdesPacket(chunks=[RtcpSourceInfo(ssrc=self.ssrc, items=[(1, cname.encode())])]))
        sender._RTCRtpSender__ntp_timestamp = ntp  # type: ignore[attr-defined]
        sender._RTCRtpSender__rtp_timestamp = rtp_timestamp  # type: ignore[attr-defined]
        sender._RTCRtpSender__packet_count = packets  # type: ignore[attr-defined]
        sender._RTCRtpSender__octet_count = octets  # type: ignore[attr-defined]
        sender._RTCRtpSender__lsr = (ntp >> 16) & 0xFFFFFFFF  # type: ignore[attr-defined]
        sender._RTCRtpSender__lsr_time = time.time()  # type: ignore[attr-defined]
        return self._dtls._tx_srtp.protect_rtcp(data)


def srtp_protect_address() -> int:
    """libsrtp's srtp_protect as a C function pointer: pylibsrtp links libsrtp into its cffi
    binding, so the compiled send loop calls the very code (and session) aiortc negotiated."""
    return int(srtp_ffi.cast("uintptr_t", srtp_ffi.addressof(srtp_lib, "srtp_protect")))


def srtp_session_address(session: pylibsrtp.Session) -> int:
    """The libsrtp context (srtp_t) behind a pylibsrtp Session: its private ``_srtp`` (srtp_t *)."""
    return int(srtp_ffi.cast("uintptr_t", session._srtp[0]))


def _ice_connection(sender: RTCRtpSender) -> aioice.ice.Connection:
    """The aioice Connection under the sender's DTLS and ICE transports (aiortc keeps it private)."""
    return sender.transport.transport._connection
