"""Packetize once, send to many: the relay's default per-spectator media path.

aiortc's RTCRtpSender, even when handed a ready-made packet, repacketizes it, builds RTP
objects, stamps an NTP clock per packet and awaits three coroutines per datagram: about
1.5% of a core per spectator (docs/architecture.md). Here each encoded frame is split into RTP payloads
once per stream; then, per spectator, only the 12-byte header (its SSRC, sequence, timestamp,
marker) is written, SRTP-protected and sent, in one synchronous loop over spectators.

aiortc still owns everything else for each spectator: SDP, ICE, DTLS, the SRTP keys, and
RTCP. We hook its sender (through aiortc_hooks.py) so that NACKs are served from the shared
packet history and PLI/FIR reach the shared encoder; its sender reports, built from our counters,
leave with a frame's packets (in the same sendmmsg on the compiled path) instead of from a timer
task and a syscall of their own per spectator.
An output sends through a link (aiortc_hooks.SenderLink for a real sender), so its bytes can be
tested without sockets.

With ``[media] low_layer`` the broadcast has a second RtpFanout for the half-size layer; each
output then writes the abs-send-time extension (so the receiver estimates its bandwidth and
sends REMB) and moves between the two fan-outs as its estimate dictates (see layers.py).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import random
import struct
import time
from typing import Any, Callable, Protocol

import av
from aiortc.clock import current_ntp_time
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.codecs.h264 import H264Encoder as AiortcH264
from aiortc.rtcrtpsender import RTCRtpSender
from aiortc.rtp import RTCP_PSFB_APP, RtcpPsfbPacket, unpack_remb_fci

from .aiortc_hooks import (SenderLink, observe_rtcp, observe_send_parameters, route_retransmissions,
                           srtp_protect_address, take_over_sender_reports)
from .layers import LayerPolicy

log = logging.getLogger(__name__)
FASTSEND_API = 3  # the _fastsend.c this module calls (3: per-spectator GSO, errors answered, a sender report)

try:  # the compiled send loop (setup.py builds it where a C compiler is; see _fastsend.c)
    from . import _fastsend
except ImportError:
    _fastsend = None
else:
    if getattr(_fastsend, "API", 1) != FASTSEND_API:  # a build left from another _fastsend.c
        log.warning("relay/media/_fastsend was built from another version (rebuild: python setup.py build_ext "
                    "--inplace, or pip install -e .); using the Python send loop")
        _fastsend = None
    else:
        _fastsend.set_protect(srtp_protect_address())

BACKED_UP = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS})  # the kernel's buffer is full: wait
COMPILED_SEND = _fastsend is not None  # [media] send_loop = "auto" uses it when it was built

HISTORY = 1024  # packets kept for NACKs (~4 s at 2 Mbps); divides 2**16 so slots map cleanly
# A spectator that becomes ready shortly after a keyframe starts at once from a replay of that
# keyframe and the few frames since (a burst this short costs no noticeable latency); later
# than this it asks for a keyframe, which the encoder coalesces across a joining crowd.
JOIN_REPLAY_MAX_AGE = 0.4  # seconds: with forced keyframes >= 0.6 s apart, a joiner waits <= 0.2 s
JOIN_REPLAY_MAX_FRAMES = 12
WRITE_BUFFER_LIMIT = 256 * 1024  # a spectator whose socket backs up this far restarts at a keyframe
_HEADER = struct.Struct("!BBHII")
# The same header with one RFC 8285 one-byte extension element: abs-send-time (3 bytes), which
# lets the receiver estimate its bandwidth and send REMB. Packed in one call: no extra copy.
_HEADER_AST = struct.Struct("!BBHIIHHI")
ABS_SEND_TIME_URI = "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time"
RATE_WINDOW = 2.0  # seconds over which a layer's sending rate is measured (spans a keyframe)
NTP_SECOND = 1 << 32  # NTP timestamps are 32.32 fixed-point seconds


class Link(Protocol):
    """Where an output's packets go: SenderLink for an aiortc sender, a recorder in unit tests."""

    ssrc: int

    def path(self) -> tuple[Callable[[bytes], bytes], Any, tuple[str, int]] | None:
        """(protect, datagram transport, address) while the peer can receive, else None."""

    def native_path(self, sockaddr: Callable[[str, int], bytes]) -> tuple[int, bytes, int] | None:
        """(socket fd, packed address, libsrtp session address) for the compiled loop, else None."""

    def report(self, ntp: int, rtp_timestamp: int, packets: int, octets: int) -> bytes | None:
        """The peer's RTCP sender report for this clock and these counters, protected and ready to
        send, or None when there is none to send."""


class RtpOutput:
    """One spectator's sending state: SSRC, payload type, sequence continuity, its link."""

    def __init__(self, fanout: "RtpFanout", link: Link) -> None:
        self._fanout = fanout
        self._link = link
        self.ssrc = link.ssrc
        self.payload_type: int | None = None  # known once the answer is applied
        self._seq_offset = int.from_bytes(os.urandom(2), "big")
        self._ts_origin = int.from_bytes(os.urandom(4), "big")
        self._next_seq_index: int | None = None
        self._waiting_for_keyframe = True
        self._was_ready = False
        self.packets_sent = 0
        self.bytes_sent = 0
        self._gso = True  # UDP GSO in the compiled loop, until this spectator's route refuses it
        self.closed = False
        # Layers (only when the broadcast has a lower one): the policy picks, REMB feeds it.
        self._layers = (fanout, fanout.lower) if fanout.lower is not None else None
        self.policy = LayerPolicy() if self._layers else None
        self.estimated_bitrate: int | None = None  # bits/s, from the receiver's latest REMB
        self._abs_send_time_word: int | None = None  # the extension's id byte, shifted into place
        # NACKs after a switch may name packets of the previous layer: (its fanout, its seq offset),
        # used for sequence numbers before the current layer's first packet (_layer_start).
        self._previous: tuple[RtpFanout, int] | None = None
        self._layer_started = False
        self._layer_start = 0
        self._report_at = 0  # NTP time of the next sender report: the first goes with the first frame

    def configure(self, payload_type: int, abs_send_time_id: int | None = None) -> None:
        self.payload_type = payload_type
        # abs-send-time only where an estimate is used: without layers the header stays 12 bytes.
        if self.policy is not None and abs_send_time_id is not None:
            self._abs_send_time_word = ((abs_send_time_id << 4) | 2) << 24

    @property
    def layer(self) -> int:
        return self.policy.layer if self.policy is not None else 0

    def update_estimate(self, bitrate: int) -> None:
        """The receiver's estimate of what it can take (a REMB): may move it to another layer."""
        self.estimated_bitrate = bitrate
        if self.policy is None or self.closed:
            return
        main, low = self._layers
        if main.pinned:  # nothing is encoded for the lower layer now: it stays empty
            return
        target = self._layers[self.policy.update(bitrate, main.bitrate, low.bitrate, time.monotonic())]
        if target is not self._fanout:
            self._switch(target)

    def _switch(self, target: "RtpFanout") -> None:
        # Leave the old layer at once and start the new one at its next keyframe (asked for, and
        # coalesced by the encoder); no replay of older frames, whose timestamps would run back.
        # Sequence numbers stay gapless (the _next_seq_index logic in send_frame); timestamps
        # continue because both layers stamp a frame identically.
        if self._layer_started:
            self._previous = (self._fanout, self._seq_offset)
        self._layer_started = False
        self._fanout.remove(self)
        self._fanout = target
        target.adopt(self)
        self._waiting_for_keyframe = True
        target.request_keyframe()

    def _path(self):
        """(protect, datagram transport, address) when this spectator can receive, else None."""
        if self.payload_type is None:
            return None
        return self._link.path()

    def send_frame(self, first_index: int, payloads: list[bytes], timestamp: int, keyframe: bool, ntp: int) -> None:
        # One lookup per frame: the compiled loop needs only its native path (and sees a full socket
        # itself, as a short send), the Python loop the transport.
        if self.payload_type is None:
            return
        native = path = None
        if self._fanout.compiled:
            native = self._link.native_path(_fastsend.sockaddr)
            if native is None:
                return
        else:
            path = self._link.path()
            if path is None:
                return
        if not self._was_ready:
            self._was_ready = True  # DTLS just came up: start this spectator on a keyframe
            if not keyframe and not self._fanout.replay_to(self):
                self._fanout.request_keyframe()
        if self._waiting_for_keyframe:
            if not keyframe:
                return
            self._waiting_for_keyframe = False
            if self._next_seq_index is not None:
                # Frames were skipped for this spectator: keep its sequence numbers gapless so
                # it does not NACK packets it was never meant to get.
                self._seq_offset = self._next_seq_index - first_index
            if not self._layer_started:
                self._layer_started = True
                self._layer_start = (first_index + self._seq_offset) & 0xFFFF
        elif path is not None and path[1].get_write_buffer_size() > WRITE_BUFFER_LIMIT:
            self._waiting_for_keyframe = True  # the kernel cannot take more: skip to a keyframe
            self._next_seq_index = first_index + self._seq_offset
            self._fanout.request_keyframe()
            return
        rtp_ts = (timestamp + self._ts_origin) & 0xFFFFFFFF
        seq = first_index + self._seq_offset
        ast = self._abs_send_time_word
        if ast is not None:
            ast |= (ntp >> 14) & 0xFFFFFF  # 6.18 fixed-point seconds, once per frame
        report = None
        if ntp >= self._report_at:  # about once a second, randomized over 0.5-1.5 s as RFC 3550 (and aiortc) do
            self._report_at = ntp + int((0.5 + random.random()) * NTP_SECOND)
            report = self._link.report(ntp, rtp_ts, self.packets_sent + len(payloads),
                                       self.bytes_sent + sum(map(len, payloads)))
        if native is not None:
            sent, size, error = self._send_compiled(native, payloads, seq, rtp_ts, ast, report)
            if error in BACKED_UP:  # the socket's buffer is full: as a backed-up transport, gapless
                self._waiting_for_keyframe = True
                self._next_seq_index = seq + sent
                self._fanout.request_keyframe()
                self.packets_sent += sent
                self.bytes_sent += size
                return
            if error:  # a failing route: the rest of the frame is lost, as on a network (NACKs may recover it)
                log.debug("send to spectator ssrc=%d failed: %s", self.ssrc, os.strerror(error))
        else:
            protect, transport, addr = path
            size = self._send_python(protect, transport.sendto, addr, payloads, seq, rtp_ts, ast)
            if report is not None:
                transport.sendto(report, addr)
        self._next_seq_index = seq + len(payloads)
        self.packets_sent += len(payloads)
        self.bytes_sent += size

    def _send_compiled(self, native: tuple[int, bytes, int], payloads: list[bytes], seq: int, rtp_ts: int,
                       ast: int | None, report: bytes | None) -> tuple[int, int, int]:
        """A frame's packets (and a due sender report) in one call: headers, SRTP and one sendmmsg
        (_fastsend.c); (packets sent, payload bytes sent, the errno that stopped the rest or 0)."""
        fd, address, srtp = native
        sent, size, error, self._gso = _fastsend.send_frame(
            fd, address, srtp, payloads, self.payload_type, seq & 0xFFFF, rtp_ts, self.ssrc,
            -1 if ast is None else ast, self._gso, report)
        return sent, size, error

    def _send_python(self, protect, sendto, addr, payloads: list[bytes], seq: int, rtp_ts: int,
                     ast: int | None) -> int:
        """The same packets, one Python round trip and one syscall per packet (no compiler here)."""
        pt = self.payload_type
        ssrc = self.ssrc
        last = len(payloads) - 1
        size = 0
        if ast is None:
            pack = _HEADER.pack
            for i, payload in enumerate(payloads):
                sendto(protect(pack(0x80, pt | 0x80 if i == last else pt, (seq + i) & 0xFFFF, rtp_ts, ssrc) + payload),
                       addr)
                size += len(payload)
        else:
            pack = _HEADER_AST.pack
            for i, payload in enumerate(payloads):
                header = pack(0x90, pt | 0x80 if i == last else pt, (seq + i) & 0xFFFF, rtp_ts, ssrc, 0xBEDE, 1, ast)
                sendto(protect(header + payload), addr)
                size += len(payload)
        return size

    async def retransmit(self, sequence_number: int) -> None:
        """A NACK: resend that packet from the shared history, if it is still there."""
        path = self._path()
        fanout, offset = self._fanout, self._seq_offset
        if self._previous is not None and (
            not self._layer_started or 0 < (self._layer_start - sequence_number) & 0xFFFF < 0x8000
        ):
            fanout, offset = self._previous  # sent before the last layer switch
        entry = fanout.lookup((sequence_number - offset) & 0xFFFF)
        if path is None or entry is None or self.payload_type is None:
            return
        protect, transport, addr = path
        marker, timestamp, payload = entry
        pt = self.payload_type | 0x80 if marker else self.payload_type
        header = _HEADER.pack(0x80, pt, sequence_number, (timestamp + self._ts_origin) & 0xFFFFFFFF, self.ssrc)
        transport.sendto(protect(header + payload), addr)

    def close(self) -> None:
        self.closed = True
        self._fanout.remove(self)


class RtpFanout:
    """One per broadcast: the shared packetizer, packet history and the set of outputs."""

    def __init__(
        self,
        request_keyframe: Callable[[], None],
        on_sent: Callable[[int, int], None] | None = None,
        lower: "RtpFanout | None" = None,
        compiled: bool = COMPILED_SEND,
    ) -> None:
        self.compiled = compiled and COMPILED_SEND  # the compiled send loop, when built and wanted
        self.lower = lower  # the broadcast's lower layer, if any: outputs may move there and back
        self.pinned = False  # outputs may not move to the lower layer (see pin)
        self._on_sent = on_sent
        self._packer = AiortcH264()  # only its pack(): Annex B split + FU-A/STAP-A, no encoder
        self._outputs: set[RtpOutput] = set()
        self._history: list[tuple[int, bool, int, bytes] | None] = [None] * HISTORY
        self._index = 0
        # The frames since the latest keyframe (keyframe first), while few and recent enough to replay.
        self._recent: list[tuple[int, list[bytes], int]] = []
        self._recent_keyframe_at = -1e9
        self._replaying = False
        self.request_keyframe = request_keyframe
        self.frames = 0
        self.replays = 0
        self.bitrate: float | None = None  # what this layer sends, bits/s over RATE_WINDOW
        self._rate_bytes = 0
        self._rate_since = time.monotonic()

    def add(self, sender: RTCRtpSender) -> RtpOutput:
        output = RtpOutput(self, SenderLink(sender))
        self._outputs.add(output)
        return output

    def pin(self, pinned: bool) -> None:
        """While the source brings its own packets (a WHIP publisher's, passed through) nothing encodes the
        lower layer: every output stays on, or comes back to, this one, its layer policy started afresh."""
        self.pinned = pinned
        if pinned and self.lower is not None:
            for output in list(self.lower._outputs):
                output.policy = LayerPolicy()
                output._switch(self)

    def adopt(self, output: RtpOutput) -> None:
        self._outputs.add(output)

    def remove(self, output: RtpOutput) -> None:
        self._outputs.discard(output)

    @property
    def outputs(self) -> int:
        return len(self._outputs)

    def lookup(self, index16: int) -> tuple[bool, int, bytes] | None:
        entry = self._history[index16 % HISTORY]
        if entry is None or entry[0] & 0xFFFF != index16:
            return None
        return entry[1], entry[2], entry[3]

    def replay_to(self, output: RtpOutput) -> bool:
        """Send the latest keyframe and the frames since (not the current one) to a new spectator."""
        recent = self._recent[:-1]  # the last entry is the frame being published right now
        if not recent or time.monotonic() - self._recent_keyframe_at > JOIN_REPLAY_MAX_AGE or self._replaying:
            return False
        self._replaying = True
        try:
            ntp = current_ntp_time()
            for i, (first, payloads, timestamp) in enumerate(recent):
                output.send_frame(first, payloads, timestamp, i == 0, ntp)
        finally:
            self._replaying = False
        self.replays += 1
        return True

    def publish(self, packet: av.Packet, keyframe: bool) -> None:
        payloads, timestamp = self._packer.pack(packet)
        if not payloads:
            return
        first = self._index
        last = len(payloads) - 1
        history = self._history
        for i, payload in enumerate(payloads):
            history[(first + i) % HISTORY] = (first + i, i == last, timestamp, payload)
        self._index += len(payloads)
        self.frames += 1
        now = time.monotonic()
        size = sum(map(len, payloads))
        self._rate_bytes += size
        if now - self._rate_since >= RATE_WINDOW:
            self.bitrate = self._rate_bytes * 8 / (now - self._rate_since)
            self._rate_bytes, self._rate_since = 0, now
        if keyframe:
            self._recent = [(first, payloads, timestamp)]
            self._recent_keyframe_at = now
        elif self._recent and len(self._recent) < JOIN_REPLAY_MAX_FRAMES:
            self._recent.append((first, payloads, timestamp))
        else:
            self._recent = []
        if not self._outputs:
            return
        ntp = current_ntp_time()  # once per frame, not once per packet per spectator
        sent = 0
        for output in self._outputs:
            before = output.packets_sent
            try:
                output.send_frame(first, payloads, timestamp, keyframe, ntp)
            except Exception:  # one broken spectator must not stop the others
                log.exception("sending to a spectator failed")
            sent += output.packets_sent - before
        if self._on_sent is not None and sent:
            self._on_sent(sent, sent * size // len(payloads))


def hook_output(sender: RTCRtpSender, output: RtpOutput) -> None:
    """Route the sender's negotiated payload type and extensions, its NACKs and its receiver's
    bandwidth estimates (REMB) to our output, which also sends its sender reports."""

    def configure(parameters) -> None:
        ast = [e.id for e in parameters.headerExtensions if e.uri == ABS_SEND_TIME_URI]
        output.configure(parameters.codecs[0].payloadType, ast[0] if ast else None)

    def read_remb(packet) -> None:
        # aiortc reads REMB only to retune its own encoder, which this path never uses.
        if isinstance(packet, RtcpPsfbPacket) and packet.fmt == RTCP_PSFB_APP:
            try:
                bitrate, ssrcs = unpack_remb_fci(packet.fci)
            except ValueError:
                return
            if output.ssrc in ssrcs:
                output.update_estimate(bitrate)

    observe_send_parameters(sender, configure)
    route_retransmissions(sender, output.retransmit)
    observe_rtcp(sender, read_remb)
    take_over_sender_reports(sender)


class IdleVideoTrack(MediaStreamTrack):
    """The track aiortc's sender holds while RtpFanout does the sending: it never yields, so
    the sender's own RTP loop sleeps (and aiortc still signals a video source in the SDP)."""

    kind = "video"

    def __init__(self) -> None:
        super().__init__()
        self._stopped = asyncio.Event()

    async def recv(self):
        await self._stopped.wait()
        raise MediaStreamError

    def stop(self) -> None:
        super().stop()
        self._stopped.set()
