"""Light WHEP spectators for the fan-out benchmark: they count RTP packets and decode nothing.

A decoding aiortc receiver costs more than the relay's side of it, so a load generator built
from them would measure itself.  A :class:`LightReceiver` is a real aiortc RTCPeerConnection
(SDP, ICE, DTLS, SRTP keys, RTCP receiver reports, ICE consent all handled by aiortc) whose
video RTP never reaches aiortc's jitter buffer or decoder:

``depth="raw"`` (default)
    SRTP leaves the 12-byte RTP header in the clear, so each datagram is counted where it
    arrives, in the ICE socket's ``datagram_received``, and dropped: no asyncio queue, no SRTP
    unprotect, no ``RtpPacket.parse``.  STUN, DTLS and SRTCP still go to aioice/aiortc.  One
    packet in ``SRTP_SAMPLE`` is unprotected with the session's real keys, to prove the
    stream is valid SRTP (``srtp_ok`` / ``srtp_failed``).
``depth="srtp"``
    aiortc receives, unprotects and parses every packet as usual; the receiver's
    ``_handle_rtp_packet`` is replaced, so nothing is depacketized or decoded.  About twice
    the receiver CPU of ``raw``; useful to cross-check ``raw``.

Either way the receiver must keep sending RTCP receiver reports (the relay treats RTCP as a
spectator's sign of life, and a real player sends them): aiortc's ``RTCRtpReceiver._run_rtcp``
reports on every entry of its private ``__remote_streams`` map, which is normally filled by
``_handle_rtp_packet``.  We put the receiver itself in that map: it offers the same
attributes aiortc reads (``max_seq``, ``fraction_lost``, ``packets_lost``, ``jitter``).

What is counted per receiver: packets, frames (RTP marker bit), lost packets (sequence gaps),
frames that had a gap, time from the WHEP POST to the first complete frame.

This module also holds :func:`worker_main`, the body of one load-generator process: an
asyncio (uvloop) loop with many receivers, driven by commands over a multiprocessing pipe.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import re
import time
import traceback
from typing import Any
from urllib.parse import urljoin

SRTP_SAMPLE = 64  # in raw depth, unprotect one RTP packet in this many with the real keys
FIRST_FRAME_TIMEOUT = 30.0


def _patch_aiortc_for_light_receivers() -> None:
    """Process-wide, load-generator processes only: no decoder threads, loopback ICE."""
    import aiortc.rtcrtpreceiver as rtcrtpreceiver

    # RTCRtpReceiver.receive() starts a decoder thread per receiver; ours never gets a frame.
    rtcrtpreceiver.decoder_worker = lambda *args: None

    import aioice.ice

    # aioice gathers on every interface but loopback; the relay and we live on loopback.
    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"] if use_ipv4 else []


class LightReceiver:
    """One spectator: WHEP join, then count RTP packets as they arrive."""

    def __init__(self, index: int, whep_url: str, token: str, depth: str = "raw") -> None:
        self.index = index
        self.whep_url = whep_url
        self.token = token
        self.depth = depth
        self.pc = None
        self.location: str | None = None
        self.error: str | None = None
        self.payload_type: int | None = None
        # counters
        self.packets = 0
        self.bytes = 0
        self.frames = 0
        self.damaged_frames = 0  # frames with a sequence gap since the previous marker
        self.reordered = 0
        self.srtp_ok = 0
        self.srtp_failed = 0
        self.post_started: float | None = None
        self.answered_at: float | None = None
        self.first_frame_at: float | None = None
        self.first_frame_damaged = False
        self._gap_in_frame = False
        self._first_frame = asyncio.Event()
        self._dtls = None
        # The RTCP view aiortc's receiver reports from (StreamStatistics' interface).
        self.ssrc: int | None = None
        self.base_seq: int | None = None
        self.max_seq: int | None = None
        self.cycles = 0
        self._expected_prior = 0
        self._received_prior = 0
        self.rtcp_reports_sent = 0

    # ------------------------------------------------------------------ StreamStatistics look-alike
    @property
    def packets_received(self) -> int:
        return self.packets

    @property
    def packets_expected(self) -> int:
        if self.base_seq is None:
            return 0
        return self.cycles + self.max_seq - self.base_seq + 1

    @property
    def packets_lost(self) -> int:
        lost = self.packets_expected - self.packets
        return max(-0x800000, min(lost, 0x7FFFFF))

    @property
    def fraction_lost(self) -> int:  # read once per report by aiortc, like StreamStatistics'
        expected = self.packets_expected - self._expected_prior
        self._expected_prior = self.packets_expected
        received = self.packets - self._received_prior
        self._received_prior = self.packets
        lost = expected - received
        return 0 if expected == 0 or lost <= 0 else (lost << 8) // expected

    @property
    def jitter(self) -> int:
        return 0  # not computed: it would cost a clock read per packet

    # ------------------------------------------------------------------ per packet
    def _count(self, seq: int, marker: int) -> None:
        self.packets += 1
        last = self.max_seq
        if last is None:
            self.base_seq = self.max_seq = seq
        else:
            delta = (seq - last) & 0xFFFF
            if 0 < delta < 0x8000:  # newer: maybe after a gap, maybe wrapping past 65535
                if delta != 1:
                    self._gap_in_frame = True
                if seq < last:
                    self.cycles += 1 << 16
                self.max_seq = seq
            else:
                self.reordered += 1  # late or duplicate (the loss count is expected - received)
        if marker:
            self.frames += 1
            if self._gap_in_frame:
                self.damaged_frames += 1
            if self.first_frame_at is None:
                self.first_frame_at = time.monotonic()
                self.first_frame_damaged = self._gap_in_frame
                self._first_frame.set()
            self._gap_in_frame = False

    def _register_stream(self, receiver, ssrc: int) -> None:
        self.ssrc = ssrc
        receiver._RTCRtpReceiver__remote_streams[ssrc] = self  # what _run_rtcp reports on

    def _hook_raw(self, transceiver) -> None:
        dtls = self._dtls = transceiver.receiver.transport
        receiver = transceiver.receiver
        connection = dtls.transport._connection  # the aioice Connection
        for protocol in connection._protocols:
            forward = protocol.datagram_received

            def datagram_received(data: bytes, addr, forward=forward) -> None:
                # RTP/RTCP: first byte 128..191; RTCP packet types 192..208 in the second.
                if len(data) >= 12 and 127 < data[0] < 192 and not 191 < data[1] < 209:
                    b1 = data[1]
                    if (b1 & 0x7F) == self.payload_type:
                        if self.ssrc is None:
                            self._register_stream(receiver, int.from_bytes(data[8:12], "big"))
                        self.bytes += len(data)
                        self._count((data[2] << 8) | data[3], b1 & 0x80)
                        if self.packets % SRTP_SAMPLE == 1:
                            self._check_srtp(data)
                    return  # RTX or anything else: dropped (we never NACK)
                forward(data, addr)

            protocol.datagram_received = datagram_received

    def _check_srtp(self, data: bytes) -> None:
        srtp = getattr(self._dtls, "_rx_srtp", None)
        if srtp is None:
            return
        try:
            srtp.unprotect(data)
            self.srtp_ok += 1
        except Exception:
            self.srtp_failed += 1

    def _hook_srtp(self, transceiver) -> None:
        receiver = transceiver.receiver

        async def handle_rtp_packet(packet, arrival_time_ms: int) -> None:
            if packet.payload_type != self.payload_type:
                return
            if self.ssrc is None:
                self._register_stream(receiver, packet.ssrc)
            self.bytes += len(packet.payload) + 12 + 10  # header + SRTP tag, roughly what raw counts
            self._count(packet.sequence_number, packet.marker)

        receiver._handle_rtp_packet = handle_rtp_packet

    def _count_rtcp(self, transceiver) -> None:
        receiver = transceiver.receiver
        send = receiver._send_rtcp

        async def send_rtcp(packet) -> None:
            self.rtcp_reports_sent += 1
            await send(packet)

        receiver._send_rtcp = send_rtcp

    # ------------------------------------------------------------------ life cycle
    async def join(self, session) -> None:
        from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

        pc = self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        transceiver = pc.addTransceiver("video", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())  # gathers (loopback only)
        if self.depth == "raw":
            self._hook_raw(transceiver)
        else:
            self._hook_srtp(transceiver)
        self._count_rtcp(transceiver)
        self.post_started = time.monotonic()
        async with session.post(
            self.whep_url,
            data=pc.localDescription.sdp,
            headers={"Content-Type": "application/sdp", "Authorization": f"Bearer {self.token}"},
        ) as response:
            body = await response.text()
            self.answered_at = time.monotonic()
            if response.status != 201:
                raise RuntimeError(f"WHEP POST {response.status}: {body[:200]}")
            self.location = urljoin(self.whep_url, response.headers["Location"])
        match = re.search(r"a=rtpmap:(\d+) H264/90000", body)
        if match is None:
            raise RuntimeError("the answer has no H.264")
        self.payload_type = int(match.group(1))
        await pc.setRemoteDescription(RTCSessionDescription(body, "answer"))
        await asyncio.wait_for(self._first_frame.wait(), FIRST_FRAME_TIMEOUT)

    async def leave(self, session) -> None:
        if self.location is not None:
            try:
                async with session.delete(self.location) as response:
                    await response.read()
            except Exception:
                pass
            self.location = None
        if self.pc is not None:
            pc, self.pc = self.pc, None
            try:
                await asyncio.wait_for(pc.close(), 10)
            except Exception:
                pass

    def snapshot(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "error": self.error,
            "packets": self.packets,
            "bytes": self.bytes,
            "frames": self.frames,
            "damaged_frames": self.damaged_frames,
            "expected": self.packets_expected,
            "reordered": self.reordered,
            "srtp_ok": self.srtp_ok,
            "srtp_failed": self.srtp_failed,
            "rtcp_sent": self.rtcp_reports_sent,
            "ttff": (self.first_frame_at - self.post_started)
            if self.first_frame_at is not None and self.post_started is not None else None,
            "answer": (self.answered_at - self.post_started)
            if self.answered_at is not None and self.post_started is not None else None,
            "first_frame_damaged": self.first_frame_damaged,
            "connected": self.pc is not None and self.pc.connectionState == "connected",
        }


class JanusReceiver(LightReceiver):
    """The same light spectator watching a Janus streaming mountpoint (bench/janus.py): Janus's own
    HTTP API instead of WHEP, and Janus offers while the spectator answers. ``watch_url`` is
    ``janus+{api base}#{mountpoint id}``."""

    async def _janus(self, session, url: str, body: dict) -> dict:
        body = {**body, "transaction": os.urandom(6).hex()}
        async with session.post(url, json=body) as response:
            reply = await response.json(content_type=None)
        if reply.get("janus") not in ("success", "ack", "event"):
            raise RuntimeError(f"janus: {reply}")
        return reply

    async def join(self, session) -> None:
        import aioice.ice
        from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

        api, _, mountpoint = self.whep_url[len("janus+"):].partition("#")
        self.post_started = time.monotonic()
        created = await self._janus(session, api, {"janus": "create"})
        self.location = f"{api}/{created['data']['id']}"  # leave() destroys the Janus session
        attached = await self._janus(session, self.location, {"janus": "attach", "plugin": "janus.plugin.streaming"})
        handle = f"{self.location}/{attached['data']['id']}"
        await self._janus(session, handle, {"janus": "message", "body": {"request": "watch", "id": int(mountpoint)}})
        offer = None
        while offer is None:  # the offer comes as an event on the session's long poll
            async with session.get(f"{self.location}?maxev=1") as response:
                event = await response.json(content_type=None)
            offer = event.get("jsep") if event.get("janus") == "event" else None
        self.answered_at = time.monotonic()
        match = re.search(r"a=rtpmap:(\d+) H264/90000", offer["sdp"])
        if match is None:
            raise RuntimeError("the offer has no H.264")
        self.payload_type = int(match.group(1))
        # Janus gathers no loopback candidates: gather on the address it offers (this host's).
        janus_ip = re.search(r"c=IN IP4 (\S+)", offer["sdp"]).group(1)
        aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: [janus_ip] if use_ipv4 else []
        pc = self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        await pc.setRemoteDescription(RTCSessionDescription(offer["sdp"], "offer"))
        transceiver = pc.getTransceivers()[0]
        await pc.setLocalDescription(await pc.createAnswer())  # gathers
        if self.depth == "raw":
            self._hook_raw(transceiver)
        else:
            self._hook_srtp(transceiver)
        self._count_rtcp(transceiver)
        await self._janus(session, handle, {"janus": "message", "body": {"request": "start"},
                                            "jsep": {"type": "answer", "sdp": pc.localDescription.sdp}})
        await asyncio.wait_for(self._first_frame.wait(), FIRST_FRAME_TIMEOUT)

    async def leave(self, session) -> None:
        if self.location is not None:
            with contextlib.suppress(Exception):
                await self._janus(session, self.location, {"janus": "destroy"})
            self.location = None
        await super().leave(session)


def receiver_for(index: int, watch_url: str, token: str, depth: str) -> LightReceiver:
    kind = JanusReceiver if watch_url.startswith("janus+") else LightReceiver
    return kind(index, watch_url, token, depth)


# ---------------------------------------------------------------------------------------- worker

async def _worker(conn, worker_id: int, whep_url: str, token: str, depth: str) -> None:
    import aiohttp

    loop = asyncio.get_running_loop()
    commands: asyncio.Queue = asyncio.Queue()

    def readable() -> None:
        try:
            commands.put_nowait(conn.recv())
        except EOFError:  # the parent is gone: leave
            loop.remove_reader(conn.fileno())
            commands.put_nowait(("exit",))

    loop.add_reader(conn.fileno(), readable)
    receivers: list[LightReceiver] = []
    next_index = worker_id * 100000
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    async def join_one(receiver: LightReceiver, delay: float) -> None:
        await asyncio.sleep(delay)
        try:
            await receiver.join(session)
        except Exception as exc:
            receiver.error = f"{type(exc).__name__}: {exc}"[:300]

    async def churn(rate: float, seconds: float) -> dict[str, Any]:
        """Every 1/rate s the oldest receiver with a first frame leaves and a new one joins.

        Any other command (the parent's "exit" on Ctrl-C) ends the churn early.
        """
        nonlocal next_index
        tasks: set[asyncio.Task] = set()
        new: list[LightReceiver] = []
        left = 0

        async def pause(until: float) -> bool:
            while loop.time() < until and commands.empty():
                await asyncio.sleep(min(0.2, until - loop.time()))
            return commands.empty()

        def spawn(coro) -> None:
            task = loop.create_task(coro)
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        start = loop.time()
        ticks = int(seconds * rate) if rate > 0 else 0
        for k in range(ticks):
            if not await pause(start + k / rate):
                break
            old = next((r for r in receivers if r.error is None and r.first_frame_at is not None), None)
            if old is not None:
                receivers.remove(old)
                spawn(old.leave(session))  # DELETE the WHEP session, close the pc
                left += 1
            receiver = receiver_for(next_index, whep_url, token, depth)
            next_index += 1
            receivers.append(receiver)
            new.append(receiver)
            spawn(join_one(receiver, 0.0))
        stopped = not await pause(start + seconds)
        if tasks:  # joins wait up to FIRST_FRAME_TIMEOUT for a first frame; leaves up to 10 s for pc.close()
            _, late = await asyncio.wait(set(tasks), timeout=1.0 if stopped else FIRST_FRAME_TIMEOUT + 15)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        failed = [r for r in receivers if r.error is not None]
        for r in failed:
            receivers.remove(r)
        await asyncio.gather(*(r.leave(session) for r in failed), return_exceptions=True)
        gc.collect()
        ok = [r.snapshot() for r in new if r.error is None]
        return {
            "joins": len(new), "left": left, "connected": len(receivers),
            "errors": [r.error for r in new if r.error is not None],
            "ttff": [r["ttff"] for r in ok if r["ttff"] is not None],
            "answer": [r["answer"] for r in ok if r["answer"] is not None],
        }

    try:
        while True:
            command = await commands.get()
            op = command[0]
            if op == "join":
                _, count, spread = command
                new = []
                for i in range(count):
                    new.append(receiver_for(next_index, whep_url, token, depth))
                    next_index += 1
                receivers.extend(new)
                step = spread / count if count else 0.0
                await asyncio.gather(*(join_one(r, i * step) for i, r in enumerate(new)))
                conn.send(("joined", [r.snapshot() for r in new]))
            elif op == "snapshot":
                conn.send(("snapshot", [r.snapshot() for r in receivers]))
            elif op == "leave_all":
                gone, receivers = receivers, []
                await asyncio.gather(*(r.leave(session) for r in gone), return_exceptions=True)
                gc.collect()
                conn.send(("left", len(gone)))
            elif op == "churn":
                _, rate, seconds = command
                conn.send(("churned", await churn(rate, seconds)))
            elif op == "exit":
                break
    finally:
        loop.remove_reader(conn.fileno())
        await asyncio.gather(*(r.leave(session) for r in receivers), return_exceptions=True)
        await session.close()
        try:
            conn.send(("bye", None))
        except (BrokenPipeError, OSError):
            pass


def worker_main(conn, worker_id: int, whep_url: str, token: str, depth: str) -> None:
    """Entry point of one load-generator process (multiprocessing target)."""
    try:  # the kernel ends us if the benchmark dies (no orphans)
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass
    logging.basicConfig(level=logging.ERROR)
    for noisy in ("aioice", "aiortc"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    _patch_aiortc_for_light_receivers()
    try:
        import uvloop

        run = uvloop.run
    except ImportError:
        run = asyncio.run
    try:
        run(_worker(conn, worker_id, whep_url, token, depth))
    except KeyboardInterrupt:
        pass
    except Exception:
        traceback.print_exc()
        try:
            conn.send(("crashed", traceback.format_exc()))
        except Exception:
            pass
    finally:
        os._exit(0)  # skip interpreter teardown of half-closed aiortc objects
