"""The fan-out's send loop alone: CPU per packet per spectator, compiled vs Python (not a test).

    python bench/sendloop.py                   # 100 spectators, 250 frames of a ~2 Mbps 1280x704 stream
    python bench/sendloop.py --spectators 300 --frames 500

In this process: one RtpFanout, N outputs, each with its own real loopback UDP socket and its own
real libsrtp session (AEAD AES-256-GCM by default: what aiortc negotiates with aiortc and Chrome;
--srtp cm for AES-128-CM + HMAC-SHA1-80), and frames of real H.264 from the relay's encoder, published as the hub would. Measured is the
thread's CPU time (not wall time, so other load on the box barely moves it) per packet per spectator,
and what 250 packets a second (~2 Mbps) per spectator would cost, as % of one core. The receiving
sockets are never read: the kernel drops what overflows them, as a real network would never charge
the sender. bench/fanout.py measures the whole server (ICE, DTLS, RTCP included) over WHEP.
"""

from __future__ import annotations

import argparse
import fractions
import os
import socket
import sys
import time

import av
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from pylibsrtp import Policy, Session  # noqa: E402

from relay.media import rtp_fanout  # noqa: E402
from relay.media.aiortc_hooks import srtp_session_address  # noqa: E402
from relay.media.encoder import H264Encoder  # noqa: E402
from relay.media.rtp_fanout import RtpFanout, RtpOutput  # noqa: E402


class Link:
    """A spectator: a loopback socket to an unread inbox, and its own SRTP session."""

    def __init__(self, ssrc: int, profile: int, key_length: int) -> None:
        self.ssrc = ssrc
        self.session = Session(Policy(key=os.urandom(key_length), ssrc_type=Policy.SSRC_ANY_OUTBOUND,
                                      srtp_profile=profile))
        self.out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.out.setblocking(False)
        self.inbox = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.inbox.bind(("127.0.0.1", 0))
        self.addr = self.inbox.getsockname()

    def path(self):
        return self.session.protect, self, self.addr

    def native_path(self, sockaddr):
        return self.out.fileno(), sockaddr(*self.addr), srtp_session_address(self.session)

    def get_write_buffer_size(self) -> int:
        return 0

    def sendto(self, data: bytes, addr) -> None:
        try:
            self.out.sendto(data, addr)
        except BlockingIOError:
            pass

    def report(self, *counters) -> None:
        pass

    def close(self) -> None:
        self.out.close()
        self.inbox.close()


def frames(count: int, width: int, height: int) -> list[tuple[av.Packet, bool]]:
    """Real H.264 at ~2 Mbps: noise, so every frame is as large as the rate allows."""
    encoder = H264Encoder(width, height, 25, 2000, keyframe_interval_seconds=2.0)
    noise = np.random.default_rng(1)
    packets = []
    for i in range(count):
        frame = av.VideoFrame.from_ndarray(noise.integers(0, 256, (height, width, 3), np.uint8), format="rgb24")
        frame.pts, frame.time_base = i * 3600, fractions.Fraction(1, 90000)
        packets += [(p, bool(p.is_keyframe)) for p in encoder.encode(frame)]
    encoder.close()
    return packets


PROFILES = {  # name: (libsrtp profile, key + salt length)
    "gcm": (Policy.SRTP_PROFILE_AEAD_AES_256_GCM, 44),
    "cm": (Policy.SRTP_PROFILE_AES128_CM_SHA1_80, 30),
}


def measure(compiled: bool, spectators: int, stream: list[tuple[av.Packet, bool]], srtp: str) -> tuple[float, int]:
    """(CPU seconds, packets sent) for publishing the stream to every spectator."""
    fanout = RtpFanout(lambda: None, compiled=compiled)
    links = [Link(0x10000 + i, *PROFILES[srtp]) for i in range(spectators)]
    outputs = []
    for link in links:
        output = RtpOutput(fanout, link)
        fanout.adopt(output)
        output.configure(96)
        outputs.append(output)
    start = time.thread_time()
    for packet, keyframe in stream:
        fanout.publish(packet, keyframe)
    cpu = time.thread_time() - start
    sent = sum(o.packets_sent for o in outputs)
    for link in links:
        link.close()
    return cpu, sent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spectators", type=int, default=100)
    parser.add_argument("--frames", type=int, default=250)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=704)
    parser.add_argument("--srtp", choices=PROFILES, default="gcm")
    args = parser.parse_args()
    stream = frames(args.frames, args.width, args.height)
    size = sum(p.size for p, _ in stream)
    print(f"send loop: {args.spectators} spectators, {len(stream)} frames of {args.width}x{args.height}, "
          f"{size * 8 / (len(stream) / 25) / 1e6:.2f} Mbps at 25 fps, SRTP {args.srtp}")
    loops = [("python", False)] + ([("compiled", True)] if rtp_fanout.COMPILED_SEND else [])
    if not rtp_fanout.COMPILED_SEND:
        print("  (the compiled loop was not built here: python setup.py build_ext --inplace)")
    results = {}
    for name, compiled in loops:
        measure(compiled, 5, stream[:25], args.srtp)  # warm up
        cpu, sent = measure(compiled, args.spectators, stream, args.srtp)
        per_packet = cpu / sent * 1e6
        results[name] = per_packet
        print(f"  {name:>8}: {per_packet:.2f} µs per packet per spectator ({sent} packets in {cpu:.2f} s CPU); "
              f"at 250 packets/s a spectator costs {per_packet * 250 / 1e4:.3f} % of a core")
    if len(results) == 2:
        print(f"  python / compiled = {results['python'] / results['compiled']:.2f}x")


if __name__ == "__main__":
    main()
