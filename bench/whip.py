"""WHIP ingest benchmark: what one published stream costs the relay, and the latency it adds (not a test).

    python bench/whip.py                      # 1280x704@25, 10 s windows, whip then synthetic: about a minute
    python bench/whip.py --window 20 --kinds whip
    python bench/whip.py --kinds whip,whip-vp8,synthetic   # also a VP8 publisher (decoded and encoded once)

It starts the real server twice (``python -m relay.cli serve``, the temporary config of
bench/fanout.py: loopback, a free port, large limits, recordings and HLS as configured by default).

1. ``[world_model] kind = "whip"``: opens a connection, publishes to its ``whip_url`` with
   relay.client.Publisher (aiortc, H.264: the relay forwards it without decoding), starts a stream
   and adds one light spectator in a process of its own (bench/receiver.py: counts RTP, decodes
   nothing; its own process, so the publisher's encoder thread cannot delay it).  Over a window it
   reads the server process's CPU (utime+stime of all its threads, % of one core) and, per frame,
   the publisher-to-spectator latency: the publisher stamps the moment the last RTP packet of each
   access unit leaves it (keyed by the unit's last 16 bytes, which pass-through keeps) and the
   spectator the moment that packet arrives, decrypted; both on the machine's monotonic clock.
   A frame whose bytes changed on the way (a transcode) never matches: ``matched`` says how many did.
   ``whip-vp8``: the same with a VP8 publisher, which the relay decodes and encodes once (nothing matches).
2. The default synthetic world model at the same size and rate, with the same one spectator: the
   server's CPU for rendering + encoding, which a publisher's stream does not cost the relay.
Both servers' CPU is also read with no stream (the idle row), so the stream's own cost is the difference.
The publisher encodes in this process: its CPU is not the server's and is not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from fractions import Fraction

import aiohttp
import av
import numpy as np
from aiortc.mediastreams import VideoStreamTrack

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from fanout import Server, cpu_seconds, keep_alive, latency_quantile, percentile  # noqa: E402
from receiver import LightReceiver, _patch_aiortc_for_light_receivers  # noqa: E402

from relay.client import Publisher, RelayClient  # noqa: E402

TAIL = 16  # bytes of an access unit's end that identify it at both ends
VIDEO_TIME_BASE = Fraction(1, 90000)
DISTINCT_FRAMES = 50  # pictures the publisher cycles through (made once: making them is not the relay's cost)


class MovingTrack(VideoStreamTrack):
    """A bar sliding over noise at `fps`: every picture differs from the one before, as a model's do."""

    def __init__(self, width: int, height: int, fps: int) -> None:
        super().__init__()
        self.fps = fps
        rng = np.random.default_rng(1)
        self.pictures = []
        for i in range(DISTINCT_FRAMES):
            rgb = rng.integers(0, 64, (height, width, 3), dtype=np.uint8)
            x = i * (width - 64) // DISTINCT_FRAMES
            rgb[:, x:x + 64] = (230, 180, 40)
            self.pictures.append(av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p"))
        self.count = 0
        self.start: float | None = None

    async def recv(self) -> av.VideoFrame:
        # aiortc's VideoStreamTrack paces 30 fps; a world model's rate is the config's.
        if self.start is None:
            self.start = time.monotonic()
        self.count += 1
        await asyncio.sleep(max(0.0, self.start + self.count / self.fps - time.monotonic()))
        frame = self.pictures[self.count % DISTINCT_FRAMES]
        frame.pts, frame.time_base = self.count * 90000 // self.fps, VIDEO_TIME_BASE
        return frame


def stamp_sent(publisher: Publisher, sent: dict[bytes, list[float]]) -> None:
    """Record when the last RTP packet of each access unit leaves the publisher (before SRTP)."""
    dtls = publisher.pc.getTransceivers()[0].sender.transport
    send = dtls._send_rtp

    async def send_rtp(data: bytes) -> None:
        if data[1] & 0x80:  # marker: the unit's last packet (a retransmission's stamp is later, never chosen)
            sent.setdefault(bytes(data[-TAIL:]), []).append(time.monotonic())
        await send(data)

    dtls._send_rtp = send_rtp


class StampReader(LightReceiver):
    """The light spectator, also noting when each access unit's last packet arrives (by its last bytes)."""

    def __init__(self, whep_url: str, token: str) -> None:
        super().__init__(0, whep_url, token, depth="srtp")
        self.arrivals: list[tuple[bytes, float]] = []
        self.recording = False

    def _hook_srtp(self, transceiver) -> None:
        super()._hook_srtp(transceiver)
        receiver = transceiver.receiver
        count = receiver._handle_rtp_packet

        async def handle_rtp_packet(packet, arrival_time_ms: int) -> None:
            if self.recording and packet.marker and packet.payload_type == self.payload_type:
                self.arrivals.append((bytes(packet.payload[-TAIL:]), time.monotonic()))
            await count(packet, arrival_time_ms)

        receiver._handle_rtp_packet = handle_rtp_packet


def spectate(whep_url: str, token: str, settle: float, window: float, pipe) -> None:
    """A process of its own: the publisher's encoder (a thread of the bench's process) must not delay
    what the spectator reads. CLOCK_MONOTONIC is one clock for every process of the machine."""

    async def watch() -> dict:
        _patch_aiortc_for_light_receivers()
        reader = StampReader(whep_url, token)
        async with aiohttp.ClientSession() as http:
            try:
                await reader.join(http)
                await asyncio.sleep(settle)
                pipe.send("recording")
                frames0, bytes0, t0 = reader.frames, reader.bytes, time.monotonic()
                reader.recording = True
                await asyncio.sleep(window)
                reader.recording = False
                elapsed = time.monotonic() - t0
                return {"frames": reader.frames - frames0, "bytes": reader.bytes - bytes0, "elapsed": elapsed,
                        "arrivals": reader.arrivals}
            finally:
                await reader.leave(http)

    pipe.send(asyncio.run(watch()))


def delays(sent: dict[bytes, list[float]], arrivals: list[tuple[bytes, float]]) -> list[float]:
    """Each arrival against the latest sending of the same bytes before it."""
    out = []
    for key, arrived in arrivals:
        earlier = [t for t in sent.get(key, ()) if t <= arrived]
        if earlier:
            out.append(arrived - max(earlier))
    return out


@dataclass
class Run:
    kind: str
    idle_cpu: float = 0.0  # % of one core, server with no stream
    stream_cpu: float = 0.0  # % of one core, the stream on and one spectator
    fps: float = 0.0  # frames the spectator received per second
    kbps: float = 0.0  # what it received
    frames: int = 0
    delays: list[float] = field(default_factory=list)
    relay_p50: float | None = None  # s, the server's own relay_whip_frame_latency_seconds (bucket upper bound)
    relay_p95: float | None = None


async def whip_latency_buckets(http, base_url: str) -> dict[str, float]:
    """relay_whip_frame_latency_seconds' cumulative buckets, keyed as fanout.latency_quantile reads them."""
    async with http.get(base_url + "/metrics") as response:
        text = await response.text()
    buckets = {}
    for line in text.splitlines():
        if line.startswith("relay_whip_frame_latency_seconds_bucket"):
            name, _, value = line.rpartition(" ")
            buckets["latency_le_" + name.split('le="', 1)[1].split('"', 1)[0]] = float(value)
    return buckets


async def server_cpu(pid: int, window: float) -> float:
    before, t0 = cpu_seconds(pid), time.monotonic()
    await asyncio.sleep(window)
    return 100 * (cpu_seconds(pid) - before) / (time.monotonic() - t0)


async def run(kind: str, args: argparse.Namespace, workdir: str) -> Run:
    result = Run(kind)
    server = Server(workdir, "encode-once", args, name=kind)
    if kind.startswith("whip"):  # fanout's config with the world model's kind added to its table
        with open(server.config_path) as f:
            text = f.read().replace("[world_model]\n", '[world_model]\nkind = "whip"\n', 1)
        with open(server.config_path, "w") as f:
            f.write(text)
    sent: dict[bytes, list[float]] = {}
    keeper: asyncio.Task | None = None
    publisher: Publisher | None = None
    spectator: multiprocessing.process.BaseProcess | None = None
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as http:
        try:
            await server.start(http)
            await asyncio.sleep(args.settle)
            result.idle_cpu = await server_cpu(server.pid, args.window)
            client = RelayClient(server.base_url, server.api_key, session=http)
            async with client.connect() as conn:
                keeper = asyncio.create_task(keep_alive(conn))
                if kind.startswith("whip"):
                    publisher = conn.publisher(MovingTrack(args.width, args.height, args.fps),
                                               codec="VP8" if kind == "whip-vp8" else "H264")
                    await publisher.publish()
                    stamp_sent(publisher, sent)
                await conn.start_stream("a calm ocean at sunset")
                ours, theirs = multiprocessing.Pipe()
                spectator = multiprocessing.get_context("spawn").Process(
                    target=spectate, args=(conn.broadcast["whep_url"], conn.broadcast["spectator_token"],
                                           args.settle, args.window, theirs), daemon=True)
                spectator.start()
                assert await loop.run_in_executor(None, ours.recv) == "recording"
                m0 = await whip_latency_buckets(http, server.base_url)
                result.stream_cpu = await server_cpu(server.pid, args.window)
                m1 = await whip_latency_buckets(http, server.base_url)
                result.relay_p50, result.relay_p95 = latency_quantile(m0, m1, 0.5), latency_quantile(m0, m1, 0.95)
                seen = await loop.run_in_executor(None, ours.recv)
                result.frames = seen["frames"]
                result.fps = seen["frames"] / seen["elapsed"]
                result.kbps = 8 * seen["bytes"] / seen["elapsed"] / 1000
                result.delays = delays(sent, seen["arrivals"])
        except Exception:
            print(f"[{kind}] server log tail:\n{server.log_tail()}", file=sys.stderr, flush=True)
            raise
        finally:
            if spectator is not None:
                spectator.join(10)
                if spectator.is_alive():
                    spectator.terminate()
            if publisher is not None:
                await publisher.close()
            if keeper is not None:
                keeper.cancel()
                await asyncio.gather(keeper, return_exceptions=True)
            server.stop()
    return result


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{1000 * value:.1f}"


def report(runs: list[Run], args: argparse.Namespace) -> None:
    print(f"\n{args.width}x{args.height}@{args.fps}, {args.window:.0f} s windows, one light spectator")
    print(f"{'world model':<12} {'idle cpu%':>9} {'stream cpu%':>11} {'added%':>7} {'fps':>5} {'kbit/s':>7} "
          f"{'matched':>8} {'lat p50':>7} {'p95':>6} {'max':>6} {'relay p50':>9} {'p95':>5}")
    for r in runs:
        matched = f"{len(r.delays)}/{r.frames}" if r.kind.startswith("whip") else "-"
        p50, p95 = percentile(r.delays, 0.5), percentile(r.delays, 0.95)
        print(f"{r.kind:<12} {r.idle_cpu:>9.1f} {r.stream_cpu:>11.1f} {r.stream_cpu - r.idle_cpu:>7.1f} "
              f"{r.fps:>5.1f} {r.kbps:>7.0f} {matched:>8} {_ms(p50):>7} {_ms(p95):>6} "
              f"{_ms(max(r.delays) if r.delays else None):>6} {_ms(r.relay_p50):>9} {_ms(r.relay_p95):>5}")
    print("added%: the stream's CPU over the idle server's, % of one core (target for whip: < 5).\n"
          "lat: publisher's last RTP packet of a frame sent -> that packet at the spectator, decrypted, ms "
          "(target p95 <= 50); matched: frames whose bytes arrived unchanged, of those received.\n"
          "relay p50/p95: the server's own relay_whip_frame_latency_seconds (a frame's first packet in -> its last "
          "packet out), as the upper bound of the histogram bucket holding it.")


async def amain(args: argparse.Namespace) -> None:
    _patch_aiortc_for_light_receivers()  # the spectator decodes nothing; loopback ICE for every peer
    with tempfile.TemporaryDirectory(prefix="bench-whip-") as workdir:
        runs = [await run(kind, args, workdir) for kind in args.kinds.split(",")]
    report(runs, args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=704)
    parser.add_argument("--fps", type=int, default=25)
    parser.add_argument("--window", type=float, default=10.0)
    parser.add_argument("--settle", type=float, default=3.0)
    parser.add_argument("--kinds", default="whip,synthetic",
                        help="in order, of whip (H.264 publisher), whip-vp8 (VP8 publisher), synthetic")
    args = parser.parse_args(argv)
    # What fanout.Server reads of its arguments.
    args.bitrate, args.low_layer, args.stream_max_seconds = 0, False, 3600
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(amain(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
