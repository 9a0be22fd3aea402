"""Janus beside the relay in bench/fanout.py (`--modes encode-once,janus`): not a test.

Debian's `janus` (1.1.x) with only its streaming plugin and HTTP transport, two static event loops,
one RTP mountpoint fed over UDP with pre-encoded H.264 at the bench's size and ~2 Mbps (the relay's
own encoder, x264 constrained baseline, one keyframe every 2 s; noise, so every frame is as large as
the rate allows). The same light receivers watch it (bench/receiver.py's JanusReceiver: Janus offers,
the receiver answers). Janus has no world model to run, so compare the cost *per spectator*, the slope.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import multiprocessing
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import av  # noqa: E402
import numpy as np  # noqa: E402
from aiortc.codecs.h264 import H264Encoder as Packer  # noqa: E402

from procs import die_with_parent, free_port  # noqa: E402
from relay.media.encoder import H264Encoder  # noqa: E402

PLUGINS = "/usr/lib/x86_64-linux-gnu/janus"
MOUNTPOINT = 1
PAYLOAD_TYPE = 96

JANUS_JCFG = """general: {{
    configs_folder = "{configs}"
    plugins_folder = "{plugins}/plugins"
    transports_folder = "{plugins}/transports"
    events_folder = "{plugins}/events"
    loggers_folder = "{plugins}/loggers"
    debug_level = 3
    session_timeout = 0
    event_loops = 2
}}
media: {{
    rtp_port_range = "30000-39999"
}}
nat: {{
    ice_enforce_list = "{ip}"
}}
plugins: {{
    disable = "{disable_plugins}"
}}
transports: {{
    disable = "{disable_transports}"
}}
loggers: {{
    disable = "{disable_loggers}"
}}
events: {{
    broadcast = false
}}
"""

HTTP_JCFG = """general: {{
    json = "compact"
    base_path = "/janus"
    http = true
    port = {port}
    ip = "127.0.0.1"
    https = false
}}
admin: {{
    admin_http = false
}}
"""

STREAMING_JCFG = """general: {{
}}
relay-bench: {{
    type = "rtp"
    id = {mountpoint}
    description = "the relay's bench stream"
    media = (
        {{
            type = "video"
            mid = "v"
            port = {video_port}
            pt = {pt}
            codec = "h264"
            fmtp = "profile-level-id=42e01f;packetization-mode=1"
        }}
    )
}}
"""


def _others(folder: str, keep: str) -> str:
    with contextlib.suppress(OSError):
        return ",".join(sorted(f for f in os.listdir(folder) if f.endswith(".so") and f != keep))
    return ""


def host_ip() -> str:
    """A non-loopback address of this host (Janus gathers no loopback candidates)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        with contextlib.suppress(OSError):
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the route's source address
            return s.getsockname()[0]
    return "127.0.0.1"


class JanusServer:
    """Janus as a subprocess, plus the RTP feeder process; the same surface as fanout.Server."""

    def __init__(self, workdir: str, args) -> None:
        self.mode = "janus"
        self.recording = False
        self.args = args
        self.port = free_port()
        self.video_port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/janus"
        self.configs = os.path.join(workdir, "janus")
        self.data_dir = os.path.join(workdir, "janus-data")
        self.log_path = os.path.join(workdir, "janus.log")
        self.ip = host_ip()
        os.makedirs(self.configs, exist_ok=True)
        files = {
            "janus.jcfg": JANUS_JCFG.format(
                configs=self.configs, plugins=PLUGINS, ip=self.ip,
                disable_plugins=_others(f"{PLUGINS}/plugins", "libjanus_streaming.so"),
                disable_transports=_others(f"{PLUGINS}/transports", "libjanus_http.so"),
                disable_loggers=_others(f"{PLUGINS}/loggers", "")),
            "janus.transport.http.jcfg": HTTP_JCFG.format(port=self.port),
            "janus.plugin.streaming.jcfg": STREAMING_JCFG.format(mountpoint=MOUNTPOINT, video_port=self.video_port,
                                                                 pt=PAYLOAD_TYPE),
        }
        for name, text in files.items():
            with open(os.path.join(self.configs, name), "w") as f:
                f.write(text)
        self.proc: subprocess.Popen | None = None
        self.feeder: multiprocessing.Process | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def watch_url(self) -> str:
        """What the load generator is given: JanusReceiver reads the API URL and the mountpoint from it."""
        return f"janus+{self.base_url}#{MOUNTPOINT}"

    async def start(self, http) -> None:
        if shutil.which("janus") is None:
            raise RuntimeError("janus is not installed (apt-get install janus)")
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(["janus", "-F", self.configs, "-C", os.path.join(self.configs, "janus.jcfg")],
                                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     preexec_fn=die_with_parent)
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"janus exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(Exception):
                async with http.get(self.base_url + "/info") as r:
                    if r.status == 200:
                        break
            await asyncio.sleep(0.2)
        else:
            raise RuntimeError(f"janus not ready after 30 s:\n{self.log_tail()}")
        ctx = multiprocessing.get_context("spawn")
        self.feeder = ctx.Process(target=feed, args=(self.video_port, self.args.width, self.args.height,
                                                     self.args.fps, self.args.bitrate or 2000),
                                  name="janus-feeder", daemon=True)
        self.feeder.start()

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError), open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
        return ""

    async def metrics(self, http) -> dict[str, float]:
        return {}  # Janus has no Prometheus endpoint; the bench reads its CPU from /proc

    def stop(self) -> None:
        if self.feeder is not None and self.feeder.is_alive():
            self.feeder.terminate()
            self.feeder.join(5)
            self.feeder = None
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)  # Janus shuts down cleanly on SIGINT
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def encoded_stream(width: int, height: int, fps: int, bitrate_kbps: int, seconds: float = 2.0):
    """One keyframe interval of real H.264, packetized as the relay's fan-out does (aiortc's packer)."""
    encoder = H264Encoder(width, height, fps, bitrate_kbps, keyframe_interval_seconds=seconds)
    packer = Packer()
    noise = np.random.default_rng(7)
    frames = []
    for i in range(int(seconds * fps)):
        frame = av.VideoFrame.from_ndarray(noise.integers(0, 256, (height, width, 3), np.uint8), format="rgb24")
        frame.pts, frame.time_base = i * 90000 // fps, fractions.Fraction(1, 90000)
        for packet in encoder.encode(frame):
            frames.append(packer.pack(packet)[0])
    encoder.close()
    return frames


def feed(port: int, width: int, height: int, fps: int, bitrate_kbps: int) -> None:
    """The feeder process: loop the encoded interval as plain RTP to Janus's mountpoint, at fps."""
    frames = encoded_stream(width, height, fps, bitrate_kbps)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    header = struct.Struct("!BBHII")
    seq, timestamp, ssrc = 0, 0, 0x5EED
    tick = 1.0 / fps
    next_at = time.monotonic()
    while True:
        for payloads in frames:
            last = len(payloads) - 1
            for i, payload in enumerate(payloads):
                sock.sendto(header.pack(0x80, PAYLOAD_TYPE | (0x80 if i == last else 0), seq & 0xFFFF, timestamp,
                                        ssrc) + payload, ("127.0.0.1", port))
                seq += 1
            timestamp = (timestamp + 90000 // fps) & 0xFFFFFFFF
            next_at += tick
            time.sleep(max(0.0, next_at - time.monotonic()))
