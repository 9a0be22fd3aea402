"""Fan-out benchmark: what each spectator costs the relay, per media mode (not a test).

    python bench/fanout.py                 # counts 1,10,50,100,150 (encode-once), 1,2,4 (per-spectator)
    python bench/fanout.py --quick         # counts 1,5,10 in both modes, 5 s windows, under ~2 minutes
    python bench/fanout.py --modes encode-once --counts 1,50,100 --window 20 --profile
    python bench/fanout.py --modes encode-once --recording both   # server CPU with recording on vs off
    python bench/fanout.py --modes encode-once --counts 10 --low-layer   # with the half-size layer
    python bench/fanout.py --modes encode-once --soak 300 --soak-only   # RSS/fds/threads under churn

For each mode it starts the real server (``python -m relay.cli serve`` with a temporary
config: loopback only, a free port, large limits), opens a connection and starts a stream over
the REST API, then adds light WHEP spectators (bench/receiver.py: real aiortc peer
connections that count RTP packets and decode nothing) from a few worker processes, step by
step up to each count.  After every step settles it measures, over a fixed window: the
server process's CPU (utime+stime from /proc, all its threads, as % of one core), the frames
each spectator received, losses, and the server's RSS.  Then it drops everyone and lets
``--storm`` spectators join within one second, reading ``relay_keyframes_forced_total`` from
/metrics before and after.  ``--recording off|both`` runs with ``[recordings] enabled = false``
(``both``: encode-once twice, then server CPU per N compared).  ``--soak SECONDS`` then keeps
``--soak-spectators`` connected while ``--churn-per-second`` leave and as many join, sampling the
server's RSS, open fds and threads every 10 s.  Everything runs on 127.0.0.1 and every
process it starts is ended in a ``finally``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

from procs import die_with_parent, free_port  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
# Each design the bench compares: the relay's [media] mode and any [media] lines that make it.
MODES = {
    "encode-once": ("encode-once", ""),  # the default: the compiled send loop where it was built
    "encode-once-python": ("encode-once", 'send_loop = "python"\n'),  # the same design, the Python loop
    "encode-once-sender": ("encode-once-sender", ""),
    "per-spectator": ("per-spectator", ""),
    "janus": ("", ""),  # not the relay: Debian's Janus streaming plugin, started by bench/janus.py
}
OFF_KEY = "encode-once/recording-off"  # --recording both: the second encode-once run


# ------------------------------------------------------------------------------------ /proc

def cpu_seconds(pid: int | str) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


def loop_thread_cpu_seconds(pid: int) -> float:
    """CPU of the server's main thread alone: the event loop, which one core must carry."""
    return cpu_seconds(f"{pid}/task/{pid}")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def status_rss_threads(pid: int) -> tuple[int, int]:
    """VmRSS (bytes) and Threads from /proc/<pid>/status."""
    rss = threads = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024  # kB
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    return rss, threads


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def dir_usage(path: str) -> tuple[int, int]:
    """Files and bytes under a directory (the recordings a run left)."""
    files = size = 0
    for root, _, names in os.walk(path):
        for name in names:
            with contextlib.suppress(OSError):
                size += os.path.getsize(os.path.join(root, name))
                files += 1
    return files, size


def least_squares(points: list[tuple[float, float]]) -> float | None:
    """Slope of y over x."""
    if len(points) < 2:
        return None
    mx = statistics.fmean(p[0] for p in points)
    my = statistics.fmean(p[1] for p in points)
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else None


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(q * (len(v) - 1))))]


# ------------------------------------------------------------------------------------ server

CONFIG = """\
[server]
host = "127.0.0.1"
port = {port}
data_dir = "{data_dir}"
log_level = "warning"

[auth]
api_keys = ["{api_key}"]

[limits]
stream_max_seconds = {stream_max}
connection_max_seconds = {stream_max}
idle_timeout_seconds = 600
spectators_per_broadcast = 100000
spectator_timeout_seconds = 30
pending_whep_per_address = 100000  # every load generator joins from 127.0.0.1
spectators_per_address = 100000

[world_model]
width = {width}
height = {height}
fps = {fps}

[webrtc]
ice_host_addresses = ["127.0.0.1"]

[media]
mode = "{mode}"
{media_extra}{recordings}"""

RECORDINGS_OFF = "\n[recordings]\nenabled = false\n"


class Server:
    """The relay as a subprocess, with its log in the temporary directory."""

    def __init__(self, workdir: str, mode: str, args: argparse.Namespace, recording: bool = True,
                 name: str = "", extra_config: str = "", extra_args: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.mode = mode
        self.recording = recording
        self.extra_args = extra_args  # bench/cluster.py: --public-url of a cluster node
        tag = name or (mode if recording else f"{mode}-recording-off")  # --recording both runs a mode twice
        self.port = free_port()
        self.api_key = "bench-" + secrets.token_hex(8)
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(workdir, f"server-{tag}.log")
        self.config_path = os.path.join(workdir, f"relay-{tag}.toml")
        self.data_dir = os.path.join(workdir, f"data-{tag}")
        server_mode, media_extra = MODES[mode]
        media_extra += f"bitrate_kbps = {args.bitrate}\n" if args.bitrate else ""
        if args.low_layer:  # the half-size layer, encoded once per stream (its cost is server CPU at N=0)
            media_extra += "low_layer = true\n"
        with open(self.config_path, "w") as f:
            f.write(CONFIG.format(
                port=self.port, data_dir=self.data_dir, api_key=self.api_key,
                stream_max=args.stream_max_seconds, width=args.width, height=args.height, fps=args.fps,
                mode=server_mode, media_extra=media_extra, recordings="" if recording else RECORDINGS_OFF,
            ) + extra_config)
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, http) -> None:
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "relay.cli", "serve", "--config", self.config_path, *self.extra_args],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(Exception):
                async with http.get(self.base_url + "/readyz") as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(0.2)
        raise RuntimeError(f"server not ready after 30 s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError), open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
        return ""

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    async def metrics(self, http) -> dict[str, float]:
        async with http.get(self.base_url + "/metrics") as r:
            text = await r.text()
        values: dict[str, float] = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            name, _, value = line.rpartition(" ")
            if name.startswith("relay_frame_latency_seconds_bucket"):
                name = "latency_le_" + name.split('le="', 1)[1].split('"', 1)[0]  # one series per bucket
            name = name.split("{", 1)[0]
            with contextlib.suppress(ValueError):
                values[name] = values.get(name, 0.0) + float(value)
        return values


def latency_quantile(m0: dict[str, float], m1: dict[str, float], q: float) -> float | None:
    """Upper bound (s) of the histogram bucket holding quantile q of the frames in the window."""
    buckets = sorted((float(k[len("latency_le_"):]), m1[k] - m0.get(k, 0.0))
                     for k in m1 if k.startswith("latency_le_"))
    total = buckets[-1][1] if buckets else 0
    if not total:
        return None
    for bound, count in buckets:  # cumulative counts
        if count >= q * total:
            return bound
    return None


# ------------------------------------------------------------------------------------ workers

class Workers:
    """N load-generator processes, each an asyncio loop of LightReceivers, fed by pipes."""

    def __init__(self, count: int, whep_url: str, token: str, depth: str) -> None:
        from receiver import worker_main

        ctx = multiprocessing.get_context("spawn")
        self.pipes = []
        self.procs = []
        for i in range(count):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(child, i, whep_url, token, depth),
                               name=f"fanout-worker-{i}", daemon=True)
            proc.start()
            child.close()
            self.pipes.append(parent)
            self.procs.append(proc)
        self.size = [0] * count

    async def _recv(self, pipe, timeout: float) -> Any:
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        loop.add_reader(pipe.fileno(), lambda: ready.done() or ready.set_result(None))
        try:
            await asyncio.wait_for(ready, timeout)
        finally:
            loop.remove_reader(pipe.fileno())
        kind, payload = pipe.recv()
        if kind == "crashed":
            raise RuntimeError(f"a load-generator worker crashed:\n{payload}")
        return payload

    async def join(self, count: int, spread: float, timeout: float = 120.0) -> list[dict]:
        """Add `count` receivers, spread evenly over the workers and over `spread` seconds."""
        shares = [0] * len(self.pipes)
        for i in range(count):  # fill the least loaded worker first
            w = min(range(len(self.pipes)), key=lambda k: self.size[k] + shares[k])
            shares[w] += 1
        busy = [(p, n) for p, n in zip(self.pipes, shares) if n]
        for pipe, n in busy:
            pipe.send(("join", n, spread))
        for w, n in enumerate(shares):
            self.size[w] += n
        results = await asyncio.gather(*(self._recv(p, timeout) for p, _ in busy))
        return [r for part in results for r in part]

    async def snapshot(self) -> list[dict]:
        for pipe in self.pipes:
            pipe.send(("snapshot",))
        results = await asyncio.gather(*(self._recv(p, 30) for p in self.pipes))
        return [r for part in results for r in part]

    async def leave_all(self) -> None:
        for pipe in self.pipes:
            pipe.send(("leave_all",))
        await asyncio.gather(*(self._recv(p, 60) for p in self.pipes))
        self.size = [0] * len(self.pipes)

    async def churn(self, rate: float, seconds: float) -> list[dict]:
        """For `seconds`, `rate` per second of the receivers leave (oldest first) and as many join.

        Each worker churns its own receivers at its share of the rate; the answer comes once
        its last join and leave have finished (failed joins are left and dropped).
        """
        total = sum(self.size)
        if not total:
            await asyncio.sleep(seconds)
            return []
        busy = [(w, p, rate * self.size[w] / total) for w, p in enumerate(self.pipes) if self.size[w]]
        for _, pipe, share in busy:
            pipe.send(("churn", share, seconds))
        results = await asyncio.gather(*(self._recv(p, seconds + 120) for _, p, _ in busy))
        for (w, _, _), r in zip(busy, results):
            self.size[w] = r["connected"]
        return results

    def cpu_seconds(self) -> float:
        total = 0.0
        for proc in self.procs:
            with contextlib.suppress(OSError):
                total += cpu_seconds(proc.pid)
        return total

    def stop(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(Exception):
                pipe.send(("exit",))
        deadline = time.monotonic() + 15
        for proc in self.procs:
            proc.join(max(0.1, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        for pipe in self.pipes:
            pipe.close()
        self.procs, self.pipes = [], []


# ------------------------------------------------------------------------------------ measuring

@dataclass
class Row:
    n: int
    cpu: float                # server CPU, % of one core
    loop_cpu: float           # the server's main (event-loop) thread alone, % of one core
    gen_fps: float            # frames the world model produced per second (server /metrics)
    fps: list[float]          # frames per second received, per spectator
    pps: float                # RTP packets per second per spectator (median)
    kbps: float               # kbit/s per spectator on the wire (median; SRTP, without UDP/IP headers)
    loss: float               # % of RTP packets lost
    damaged: int              # frames with a sequence gap
    ttff: list[float]         # seconds, for the spectators who joined in this step
    answer: list[float]       # seconds from the WHEP POST to its 201 answer, same spectators
    join_errors: int
    rss: int
    gen_cpu: float            # load generator CPU, % of one core
    server_spectators: int | None
    rtcp_ok: int              # receivers that sent RTCP during the window
    srtp_failed: int
    latency_p50: float | None = None  # s, relay-added (world model out -> last RTP sent), bucket bound
    latency_p95: float | None = None
    profile: list[str] = field(default_factory=list)

    @property
    def fps_min(self) -> float | None:
        return min(self.fps) if self.fps else None

    @property
    def fps_median(self) -> float | None:
        return statistics.median(self.fps) if self.fps else None


@dataclass
class Storm:
    size: int
    spread: float
    forced: float
    ttff: list[float]
    answer: list[float]
    ok: int
    errors: list[str]


@dataclass
class SoakSample:
    t: float                  # seconds since the churn started
    rss: int                  # server VmRSS, bytes
    fds: int                  # server open file descriptors
    threads: int
    spectators: int | None    # what the server reports
    cpu: float                # server CPU since the previous sample, % of one core
    gen_fps: float            # world-model frames per second since the previous sample
    gen_cpu: float            # load generator CPU since the previous sample, % of one core


@dataclass
class Soak:
    target: int               # spectators kept connected
    rate: float               # leaves (and joins) per second
    seconds: float
    samples: list[SoakSample] = field(default_factory=list)
    initial_errors: list[str] = field(default_factory=list)
    joins: int = 0
    left: int = 0
    errors: list[str] = field(default_factory=list)
    ttff: list[float] = field(default_factory=list)
    answer: list[float] = field(default_factory=list)
    connected: int = 0        # receivers the workers hold at the end
    final_spectators: int | None = None


@dataclass
class ModeResult:
    mode: str
    recording: bool = True
    rows: list[Row] = field(default_factory=list)
    storm: Storm | None = None
    base: Row | None = None
    soak: Soak | None = None
    recorded: tuple[int, int] | None = None  # files, bytes under data_dir/recordings after the run

    @property
    def recording_label(self) -> str:
        if self.mode == "per-spectator":
            return "recording n/a (per-spectator never records)"
        return "recording on" if self.recording else "recording off"


async def broadcast_spectators(http, base_url: str, broadcast: dict) -> int | None:
    with contextlib.suppress(Exception):
        async with http.get(f"{base_url}/v1/broadcasts/{broadcast['broadcast_id']}",
                            headers={"Authorization": f"Bearer {broadcast['spectator_token']}"}) as r:
            return (await r.json()).get("spectators")
    return None


async def measure(server: Server, workers: Workers | None, http, broadcast: dict, n: int,
                  window: float, ttff: list[float], answer: list[float], join_errors: int,
                  profile_dir: str | None = None) -> Row:
    before = await workers.snapshot() if workers else []
    m0 = await server.metrics(http)
    l0 = loop_thread_cpu_seconds(server.pid)
    c0, g0, t0 = cpu_seconds(server.pid), workers.cpu_seconds() if workers else 0.0, time.monotonic()
    spy = start_profile(server.pid, window, profile_dir, f"{server.mode}-{n}") if profile_dir else None
    await asyncio.sleep(window)
    c1, g1, t1 = cpu_seconds(server.pid), workers.cpu_seconds() if workers else 0.0, time.monotonic()
    l1 = loop_thread_cpu_seconds(server.pid)
    m1 = await server.metrics(http)
    after = await workers.snapshot() if workers else []
    rss = rss_bytes(server.pid)
    elapsed = t1 - t0
    start = {r["index"]: r for r in before}
    fps, pps, kbps, lost, expected, damaged, rtcp_ok, srtp_failed = [], [], [], 0, 0, 0, 0, 0
    for r in after:
        s = start.get(r["index"])
        if s is None or r["error"]:
            continue
        fps.append((r["frames"] - s["frames"]) / elapsed)
        pps.append((r["packets"] - s["packets"]) / elapsed)
        kbps.append(8 * (r["bytes"] - s["bytes"]) / elapsed / 1000)
        lost += (r["expected"] - s["expected"]) - (r["packets"] - s["packets"])
        expected += r["expected"] - s["expected"]
        damaged += r["damaged_frames"] - s["damaged_frames"]
        rtcp_ok += r["rtcp_sent"] > s["rtcp_sent"]
        srtp_failed += r["srtp_failed"]
    frames = m1.get("relay_frames_generated_total", 0) - m0.get("relay_frames_generated_total", 0)
    row = Row(
        n=n, cpu=100 * (c1 - c0) / elapsed, loop_cpu=100 * (l1 - l0) / elapsed, gen_fps=frames / elapsed, fps=fps,
        pps=statistics.median(pps) if pps else 0.0, kbps=statistics.median(kbps) if kbps else 0.0,
        loss=100 * lost / expected if expected else 0.0, damaged=damaged, ttff=ttff, answer=answer,
        join_errors=join_errors, rss=rss, gen_cpu=100 * (g1 - g0) / elapsed,
        server_spectators=await broadcast_spectators(http, server.base_url, broadcast),
        rtcp_ok=rtcp_ok, srtp_failed=srtp_failed,
        latency_p50=latency_quantile(m0, m1, 0.5), latency_p95=latency_quantile(m0, m1, 0.95),
    )
    if spy is not None:
        row.profile = finish_profile(*spy)
    return row


# ------------------------------------------------------------------------------------ py-spy

def start_profile(pid: int, seconds: float, directory: str, name: str):
    exe = shutil.which("py-spy")
    if exe is None:
        print("  (--profile: py-spy not found; pip install py-spy)", flush=True)
        return None
    out = os.path.join(directory, f"{name}.txt")
    proc = subprocess.Popen(
        [exe, "record", "--pid", str(pid), "--duration", str(max(1, int(seconds) - 1)), "--rate", "100",
         "--threads", "--nonblocking", "--format", "raw", "--output", out],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent,
    )
    return proc, out


def finish_profile(proc: subprocess.Popen, out: str, top: int = 15) -> list[str]:
    """Summarize py-spy's raw stacks: samples per thread, then own time per function."""
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    try:
        with open(out) as f:
            lines = f.read().splitlines()
    except OSError:
        return ["(no profile written)"]
    threads: dict[str, int] = {}
    own: dict[str, int] = {}
    total = 0
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        thread = frames[0].split(": ", 1)[-1].rstrip("_0123456789") or frames[0]
        leaf = frames[-1].rsplit(":", 1)[0] + ")" if ":" in frames[-1] else frames[-1]  # drop the line
        threads[thread] = threads.get(thread, 0) + int(count)
        own[leaf] = own.get(leaf, 0) + int(count)
        total += int(count)
    if not total:
        return ["(no samples)"]
    report = ["by thread: " + ", ".join(
        f"{name} {100 * c / total:.0f}%" for name, c in sorted(threads.items(), key=lambda kv: -kv[1]))]
    report += [f"{100 * c / total:5.1f}%  {name}" for name, c in sorted(own.items(), key=lambda kv: -kv[1])[:top]]
    report.append(f"(% of {total} non-idle samples; a leaf in asyncio/uvloop is time in the loop's C code, "
                  f"syscalls included; raw stacks: {out})")
    return report


# ------------------------------------------------------------------------------------ soak

SOAK_SAMPLE_SECONDS = 10.0
SOAK_MAX_SLOPE = 0.5  # MB/min over the second half: above this the verdict says GROWING


async def run_soak(server: Server, workers: Workers, http, broadcast: dict, args: argparse.Namespace) -> Soak:
    """Keep --soak-spectators connected while --churn-per-second leave and join; sample the server."""
    mode = server.mode
    soak = Soak(target=args.soak_spectators, rate=args.churn_per_second, seconds=args.soak)
    joined = await workers.join(soak.target, spread=soak.target / args.join_rate)
    soak.initial_errors = [r["error"] for r in joined if r["error"]]
    for e in sorted(set(soak.initial_errors))[:3]:
        print(f"[{mode}]   soak join error: {e}", flush=True)
    pid = server.pid
    last = [cpu_seconds(pid), workers.cpu_seconds(),  # the first sample's CPU and fps: over the settle
            (await server.metrics(http)).get("relay_frames_generated_total", 0.0), time.monotonic()]
    await asyncio.sleep(max(args.settle, 1.0))
    t0 = time.monotonic()

    async def sample() -> SoakSample:
        c, g = cpu_seconds(pid), workers.cpu_seconds()
        frames = (await server.metrics(http)).get("relay_frames_generated_total", 0.0)
        now = time.monotonic()
        rss, threads = status_rss_threads(pid)
        dt = max(now - last[3], 1e-6)
        s = SoakSample(t=now - t0, rss=rss, fds=open_fds(pid), threads=threads,
                       spectators=await broadcast_spectators(http, server.base_url, broadcast),
                       cpu=100 * (c - last[0]) / dt, gen_cpu=100 * (g - last[1]) / dt,
                       gen_fps=(frames - last[2]) / dt)
        last[:] = [c, g, frames, now]
        soak.samples.append(s)
        return s

    first = await sample()
    print(f"[{mode}] soak: {soak.target} spectators, {soak.rate:g}/s leave and {soak.rate:g}/s join for "
          f"{soak.seconds:g} s; RSS {first.rss / 2**20:.1f} MB, {first.fds} fds, {first.threads} threads, "
          f"server reports {first.spectators}", flush=True)

    async def sampler() -> None:
        k = 1
        while True:
            await asyncio.sleep(max(0.0, t0 + k * SOAK_SAMPLE_SECONDS - time.monotonic()))
            k += 1
            s = await sample()
            print(f"[{mode}] soak t={s.t:.0f} s: RSS {s.rss / 2**20:.1f} MB, {s.fds} fds, {s.threads} threads, "
                  f"server reports {s.spectators}, server {s.cpu:.0f}% CPU", flush=True)

    task = asyncio.create_task(sampler())
    try:
        results = await workers.churn(soak.rate, soak.seconds)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    for r in results:
        soak.joins += r["joins"]
        soak.left += r["left"]
        soak.errors += r["errors"]
        soak.ttff += r["ttff"]
        soak.answer += r["answer"]
        soak.connected += r["connected"]
    for e in sorted(set(soak.errors))[:3]:
        print(f"[{mode}]   churn join error: {e}", flush=True)
    # The last sample: once the server has dropped the sessions that left (DELETE is synchronous,
    # a session whose DELETE got lost would take spectator_timeout_seconds).
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        if await broadcast_spectators(http, server.base_url, broadcast) == soak.connected:
            break
        await asyncio.sleep(1.0)
    await asyncio.sleep(max(0.0, 2.0 - (time.monotonic() - t0 - soak.seconds)))  # closes settle
    last_sample = await sample()
    soak.final_spectators = last_sample.spectators
    return soak


# ------------------------------------------------------------------------------------ a mode

async def keep_alive(conn) -> None:
    while True:
        await asyncio.sleep(10)
        with contextlib.suppress(Exception):
            await conn.keepalive()


async def run_mode(mode: str, counts: list[int], args: argparse.Namespace, workdir: str,
                   recording: bool = True) -> ModeResult:
    import aiohttp

    from relay.client import RelayClient

    result = ModeResult(mode, recording)
    server = Server(workdir, mode, args, recording)
    keeper: asyncio.Task | None = None
    async with aiohttp.ClientSession() as http:
        try:
            await server.start(http)
            client = RelayClient(server.base_url, server.api_key, session=http)
            async with client.connect() as conn:
                keeper = asyncio.create_task(keep_alive(conn))
                await conn.start_stream("a calm ocean at sunset")
                print(f"[{mode}] server pid {server.pid} on {server.base_url}, {result.recording_label}, "
                      f"stream started; {args.workers} worker processes", flush=True)
                await run_steps(server, http, conn.broadcast, counts, args, result)
        except Exception:
            print(f"[{mode}] server log tail:\n{server.log_tail()}", file=sys.stderr, flush=True)
            raise
        finally:
            if keeper is not None:
                keeper.cancel()
                await asyncio.gather(keeper, return_exceptions=True)
            server.stop()
            result.recorded = dir_usage(os.path.join(server.data_dir, "recordings"))
    return result


async def run_janus(counts: list[int], args: argparse.Namespace, workdir: str) -> ModeResult:
    """The same steps against Janus's streaming plugin (bench/janus.py), fed the same H.264 size and rate."""
    import aiohttp

    from janus import JanusServer

    result = ModeResult("janus", False)
    server = JanusServer(workdir, args)
    async with aiohttp.ClientSession() as http:
        try:
            await server.start(http)
            print(f"[janus] pid {server.pid} on {server.base_url} (2 event loops, streaming plugin), "
                  f"fed {args.width}x{args.height} H.264 over RTP; {args.workers} worker processes", flush=True)
            await run_steps(server, http, {"whep_url": server.watch_url, "spectator_token": "", "broadcast_id": ""},
                            counts, args, result)
        except Exception:
            print(f"[janus] log tail:\n{server.log_tail()}", file=sys.stderr, flush=True)
            raise
        finally:
            server.stop()
    return result


async def run_steps(server, http, broadcast: dict, counts: list[int], args: argparse.Namespace,
                    result: ModeResult) -> None:
    """N=0, then each count of spectators (joined at --join-rate), the storm and the soak, into result."""
    mode = result.mode
    profile_dir = server.workdir if args.profile and hasattr(server, "workdir") else None
    workers = Workers(args.workers, broadcast["whep_url"], broadcast["spectator_token"], args.depth)
    try:
        await asyncio.sleep(args.settle)
        if args.soak_only:
            counts = []
        else:
            result.base = await measure(server, workers, http, broadcast, 0, args.window, [], [], 0)
            print(f"[{mode}] N=0: server {result.base.cpu:.1f}% CPU, RSS {result.base.rss / 2**20:.0f} MB",
                  flush=True)
        current = 0
        for n in counts:
            if n <= current:
                continue
            add = n - current
            joined = await workers.join(add, spread=add / args.join_rate)
            current = n
            ttff = [r["ttff"] for r in joined if r["ttff"] is not None and not r["error"]]
            answer = [r["answer"] for r in joined if r["answer"] is not None and not r["error"]]
            errors = [r["error"] for r in joined if r["error"]]
            for e in sorted(set(errors))[:3]:
                print(f"[{mode}]   join error: {e}", flush=True)
            await asyncio.sleep(args.settle)
            profile = profile_dir if n == max(counts) else None
            row = await measure(server, workers, http, broadcast, n, args.window, ttff, answer, len(errors), profile)
            result.rows.append(row)
            print(f"[{mode}] N={n}: server {row.cpu:.1f}% CPU, fps median "
                  f"{_f(row.fps_median)} min {_f(row.fps_min)} (world model {row.gen_fps:.1f}), "
                  f"load generator {row.gen_cpu:.0f}% CPU", flush=True)
        if args.storm and not args.soak_only and (mode == "encode-once" or args.storm_all_modes):
            await workers.leave_all()
            await asyncio.sleep(2.0)
            k0 = (await server.metrics(http)).get("relay_keyframes_forced_total", 0.0)
            joined = await workers.join(args.storm, spread=args.storm_spread)
            await asyncio.sleep(1.0)  # a coalesced request may still be pending
            k1 = (await server.metrics(http)).get("relay_keyframes_forced_total", 0.0)
            result.storm = Storm(
                size=args.storm, spread=args.storm_spread, forced=k1 - k0,
                ttff=[r["ttff"] for r in joined if r["ttff"] is not None and not r["error"]],
                answer=[r["answer"] for r in joined if r["answer"] is not None and not r["error"]],
                ok=sum(1 for r in joined if r["ttff"] is not None and not r["error"]),
                errors=[r["error"] for r in joined if r["error"]],
            )
            print(f"[{mode}] storm: {args.storm} joins in {args.storm_spread:g} s -> "
                  f"{k1 - k0:g} keyframes forced", flush=True)
        await workers.leave_all()
        if args.soak:
            await asyncio.sleep(2.0)
            result.soak = await run_soak(server, workers, http, broadcast, args)
            await workers.leave_all()
    finally:
        await asyncio.get_running_loop().run_in_executor(None, workers.stop)


# ------------------------------------------------------------------------------------ report

def _f(v: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.0f}"


def per_spectator_cpu(result: ModeResult, row: Row) -> float | None:
    if row.n == 0 or result.base is None:
        return None
    return (row.cpu - result.base.cpu) / row.n


def print_mode(result: ModeResult, args: argparse.Namespace) -> None:
    base = result.base
    print()
    print(f"== {result.mode}, {result.recording_label}: {args.width}x{args.height} @ {args.fps} fps, "
          f"window {args.window:g} s, {args.workers} load-generator processes (receiver depth {args.depth})")
    if result.recorded is not None and result.mode != "per-spectator":
        files, size = result.recorded
        print(f"recordings left in data_dir: {files} files, {size / 2**20:.1f} MB")
    if base is None and not result.rows:
        print_soak(result)
        return
    head = (f"{'N':>4} {'srvCPU%':>8} {'loop%':>6} {'+/spec%':>8} {'tot/spec%':>9} {'wm fps':>6} {'fps min':>7} "
            f"{'fps med':>7} {'pkt/s':>5} {'kbps':>5} {'loss%':>6} {'answer':>6} {'TTFF p50':>8} {'p95 ms':>7} "
            f"{'RSS MB':>7} {'+MB/spec':>8} {'genCPU%':>7} {'srv N':>5} {'lat p50':>7} {'p95 ms':>6}")
    print(head)
    rows = ([base] if base else []) + result.rows
    for row in rows:
        extra = (row.rss - base.rss) / row.n / 2**20 if base and row.n else None
        print(
            f"{row.n:>4} {row.cpu:>8.1f} {row.loop_cpu:>6.1f} {_f(per_spectator_cpu(result, row), '{:.2f}'):>8} "
            f"{_f(row.cpu / row.n if row.n else None, '{:.2f}'):>9} {row.gen_fps:>6.1f} "
            f"{_f(row.fps_min):>7} {_f(row.fps_median):>7} {row.pps:>5.0f} {row.kbps:>5.0f} {row.loss:>6.2f} "
            f"{_ms(percentile(row.answer, 0.5)):>6} {_ms(percentile(row.ttff, 0.5)):>8} "
            f"{_ms(percentile(row.ttff, 0.95)):>7} "
            f"{row.rss / 2**20:>7.0f} {_f(extra, '{:.2f}'):>8} {row.gen_cpu:>7.0f} "
            f"{'-' if row.server_spectators is None else row.server_spectators:>5} "
            f"{_ms(row.latency_p50):>7} {_ms(row.latency_p95):>6}"
        )
    notes = []
    for row in result.rows:
        if row.join_errors:
            notes.append(f"N={row.n}: {row.join_errors} joins failed")
        if row.rtcp_ok < len(row.fps):
            notes.append(f"N={row.n}: only {row.rtcp_ok}/{len(row.fps)} receivers sent RTCP in the window")
        if row.srtp_failed:
            notes.append(f"N={row.n}: {row.srtp_failed} sampled packets failed SRTP unprotect")
        if row.damaged:
            notes.append(f"N={row.n}: {row.damaged} frames arrived with a sequence gap")
        if len(row.fps) != row.n:
            notes.append(f"N={row.n}: {len(row.fps)} receivers measured")
    for note in notes:
        print(f"  note: {note}")
    if result.storm:
        s = result.storm
        print(f"join storm: {s.size} spectators in {s.spread:g} s -> {s.forced:g} keyframe(s) forced "
              f"(relay_keyframes_forced_total); first frame for {s.ok}/{s.size}, TTFF p50 "
              f"{_ms(percentile(s.ttff, 0.5))} ms, p95 {_ms(percentile(s.ttff, 0.95))} ms, max "
              f"{_ms(max(s.ttff) if s.ttff else None)} ms (WHEP answer p50 {_ms(percentile(s.answer, 0.5))} ms)")
        for e in sorted(set(s.errors))[:3]:
            print(f"  storm error: {e}")
    print_capacity(result)
    for row in result.rows:
        if row.profile:
            print(f"server profile at N={row.n} (py-spy, own time by function, all threads):")
            for line in row.profile:
                print(f"  {line}")
    print_soak(result)


def print_soak(result: ModeResult) -> None:
    soak = result.soak
    if soak is None:
        return
    print()
    print(f"-- soak ({result.mode}, {result.recording_label}): {soak.target} spectators, {soak.rate:g}/s leave "
          f"(WHEP DELETE + pc.close) and {soak.rate:g}/s join for {soak.seconds:g} s; server sampled every "
          f"{SOAK_SAMPLE_SECONDS:g} s, the last sample after the churn settled")
    print(f"{'t s':>5} {'RSS MB':>7} {'fds':>5} {'threads':>7} {'srv N':>5} {'srvCPU%':>7} {'wm fps':>6} "
          f"{'genCPU%':>7}")
    for s in soak.samples:
        print(f"{s.t:>5.0f} {s.rss / 2**20:>7.1f} {s.fds:>5} {s.threads:>7} "
              f"{'-' if s.spectators is None else s.spectators:>5} {s.cpu:>7.1f} {s.gen_fps:>6.1f} {s.gen_cpu:>7.0f}")
    ok = soak.joins - len(soak.errors)
    print(f"churn: {soak.left} left, {ok}/{soak.joins} joined (TTFF p50 {_ms(percentile(soak.ttff, 0.5))} ms, "
          f"p95 {_ms(percentile(soak.ttff, 0.95))} ms, max {_ms(max(soak.ttff) if soak.ttff else None)} ms; "
          f"WHEP answer p50 {_ms(percentile(soak.answer, 0.5))} ms)"
          + (f"; {len(soak.initial_errors)} of the first {soak.target} joins failed" if soak.initial_errors else ""))
    for e in sorted(set(soak.errors + soak.initial_errors))[:3]:
        print(f"  join error: {e}")
    if len(soak.samples) < 2:
        return
    first, last = soak.samples[0], soak.samples[-1]
    half = [(s.t / 60, s.rss / 2**20) for s in soak.samples if s.t >= soak.seconds / 2]
    rss_slope = least_squares(half)
    fd_slope = least_squares([(s.t / 60, s.fds) for s in soak.samples if s.t >= soak.seconds / 2])
    grew = rss_slope is not None and rss_slope > SOAK_MAX_SLOPE
    per_join = f", {1024 * rss_slope / (soak.rate * 60):+.1f} kB per churned spectator" \
        if rss_slope is not None and soak.rate > 0 else ""
    print(f"verdict: RSS {first.rss / 2**20:.1f} -> {last.rss / 2**20:.1f} MB "
          f"({(last.rss - first.rss) / 2**20:+.1f} MB first to last sample); slope over the second half "
          f"{_f(rss_slope, '{:+.2f}')} MB/min ({len(half)} samples{per_join}): "
          + ("GROWING" if grew else f"flat (<= {SOAK_MAX_SLOPE:g} MB/min)" if rss_slope is not None
             else "too few samples (a longer --soak)"))
    print(f"         fds {first.fds} -> {last.fds} ({last.fds - first.fds:+d}; second-half slope "
          f"{_f(fd_slope, '{:+.1f}')}/min), threads {first.threads} -> {last.threads} "
          f"({last.threads - first.threads:+d}); server spectators at the end {soak.final_spectators}, "
          f"expected {soak.target}: " + ("OK" if soak.final_spectators == soak.target else
                                          f"MISMATCH (the workers hold {soak.connected})"))


def slope(result: ModeResult, attr: str = "cpu") -> tuple[float | None, int]:
    """CPU per extra spectator: least squares over N=0 and the rows that kept the frame rate."""
    if result.base is None:
        return None, 0
    kept = [r for r in result.rows if r.fps_median is not None and r.fps_median >= 0.9 * r.gen_fps > 0]
    points = [(0, getattr(result.base, attr))] + [(r.n, getattr(r, attr)) for r in kept]
    if len(points) < 2:
        return None, 0
    return least_squares(points), len(kept)


def print_capacity(result: ModeResult) -> None:
    total, rows = slope(result)
    loop, _ = slope(result, "loop_cpu")
    if total is None or result.base is None:
        return
    if total <= 0.05:
        print(f"{result.mode}: the cost per spectator ({total:+.2f}% of a core, slope over N=0 and {rows} rows) "
              f"is below this run's noise: use larger counts or a longer --window")
        return
    cores = os.cpu_count() or 1
    line = (f"{result.mode}: +{total:.2f}% of a core per spectator (slope over N=0 and {rows} rows that kept "
            f">=90% of the frame rate), +{_f(loop, '{:.2f}')}% on the event-loop thread. Extrapolated: "
            f"{cores} cores full at ~{(100 * cores - result.base.cpu) / total:.0f} spectators")
    if loop and loop > 0:
        line += f", the event-loop thread full at ~{(100 - result.base.loop_cpu) / loop:.0f}"
    print(line + " (whichever comes first; the load generator shares these cores)")


def print_comparison(results: dict[str, ModeResult]) -> None:
    once = results.get("encode-once")
    for name, other in results.items():
        if once is not None and name != "encode-once" and name != OFF_KEY and other.rows:
            compare(once, other)
    if once is not None and OFF_KEY in results:
        compare_recording(once, results[OFF_KEY])


def compare_recording(on: ModeResult, off: ModeResult) -> None:
    """The same mode with recording on and off: what the recorder costs the server, per N."""
    if not (on.rows or off.rows):
        return
    print()
    print(f"== {on.mode}: recording on vs off (server CPU: ratio on/off, difference on - off)")
    print(f"{'N':>4} {'srvCPU% on':>10} {'off':>6} {'on/off':>6} {'on-off':>6}   {'loop% on':>8} {'off':>6}   "
          f"{'wm fps on':>9} {'off':>5}   {'fps med on':>10} {'off':>5}   {'fps min on':>10} {'off':>5}")
    by_on = {r.n: r for r in ([on.base] if on.base else []) + on.rows}
    by_off = {r.n: r for r in ([off.base] if off.base else []) + off.rows}
    diffs = []
    for n in sorted(set(by_on) | set(by_off)):
        a, b = by_on.get(n), by_off.get(n)
        ratio = f"{a.cpu / b.cpu:.2f}x" if a and b and b.cpu > 0 else "-"
        diff = a.cpu - b.cpu if a and b else None
        if diff is not None:
            diffs.append(diff)
        print(f"{n:>4} {_f(a.cpu if a else None):>10} {_f(b.cpu if b else None):>6} {ratio:>6} "
              f"{_f(diff, '{:+.1f}'):>6}   {_f(a.loop_cpu if a else None):>8} {_f(b.loop_cpu if b else None):>6}   "
              f"{_f(a.gen_fps if a else None):>9} {_f(b.gen_fps if b else None):>5}   "
              f"{_f(a.fps_median if a else None):>10} {_f(b.fps_median if b else None):>5}   "
              f"{_f(a.fps_min if a else None):>10} {_f(b.fps_min if b else None):>5}")
    if diffs:
        print(f"recording costs {statistics.fmean(diffs):+.1f}% of a core on average over {len(diffs)} counts "
              f"(min {min(diffs):+.1f}, max {max(diffs):+.1f}; each row is one window of each run, so the "
              f"difference carries both runs' noise)")


def compare(once: ModeResult, per: ModeResult) -> None:
    """The default design against another, side by side, as ratios."""
    label = per.mode
    print()
    print(f"== encode-once vs {label}")
    print(f"{'N':>4} {'srvCPU% once':>12} {'other':>9} {'ratio':>6}   {'+/spec% once':>12} {'other':>9} "
          f"{'ratio':>6}   {'fps med once':>12} {'other':>9}")
    by_n_once = {r.n: r for r in once.rows}
    by_n_per = {r.n: r for r in per.rows}
    for n in sorted(set(by_n_once) | set(by_n_per)):
        a, b = by_n_once.get(n), by_n_per.get(n)
        pa = per_spectator_cpu(once, a) if a else None
        pb = per_spectator_cpu(per, b) if b else None
        cpu_ratio = f"{b.cpu / a.cpu:.1f}x" if a and b and a.cpu > 0 else "-"
        spec_ratio = f"{pb / pa:.0f}x" if pa and pb and pa > 0.05 else "-"
        print(f"{n:>4} {_f(a.cpu if a else None):>12} {_f(b.cpu if b else None):>9} {cpu_ratio:>6}   "
              f"{_f(pa, '{:.2f}'):>12} {_f(pb, '{:.2f}'):>9} {spec_ratio:>6}   "
              f"{_f(a.fps_median if a else None):>12} {_f(b.fps_median if b else None):>9}")
    sa, _ = slope(once)
    sb, _ = slope(per)
    if sa and sb and sa > 0.05:
        note = " (per-spectator runs aiortc's own encoder at its own bitrate: compare the kbps columns)" \
            if label == "per-spectator" else ""
        print(f"CPU per extra spectator, {label} / encode-once = {sb:.2f}% / {sa:.2f}% = {sb / sa:.0f}x{note}")


# ------------------------------------------------------------------------------------ main

def parse_counts(text: str) -> list[int]:
    counts = sorted({int(x) for x in text.split(",") if x.strip()})
    if not counts or counts[0] < 1:
        raise argparse.ArgumentTypeError("counts are positive integers, e.g. 1,10,50")
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", type=parse_counts, help="spectator counts for encode-once (default 1,10,50,100,150)")
    ap.add_argument("--per-spectator-counts", type=parse_counts,
                    help="spectator counts for per-spectator (default 1,2,4: each costs ~45%% of a core)")
    ap.add_argument("--sender-counts", type=parse_counts,
                    help="spectator counts for encode-once-sender (aiortc packetizes per spectator; default 1,10,50)")
    ap.add_argument("--modes", default=",".join(m for m in MODES if m != "janus"),
                    help="comma-separated: " + ",".join(MODES) + " (janus needs Debian's janus; not in the default)")
    ap.add_argument("--window", type=float, help="measurement window per count, seconds (default 10)")
    ap.add_argument("--settle", type=float, help="wait after the joins before measuring, seconds (default 3)")
    ap.add_argument("--storm", type=int, default=50, help="spectators in the join storm (0: skip; default 50)")
    ap.add_argument("--storm-spread", type=float, default=1.0, help="seconds the storm's joins spread over")
    ap.add_argument("--storm-all-modes", action="store_true", help="also storm per-spectator mode")
    ap.add_argument("--join-rate", type=float, default=25.0, help="joins per second while stepping up (default 25)")
    ap.add_argument("--workers", type=int, default=2, help="load-generator processes (default 2)")
    ap.add_argument("--depth", choices=("raw", "srtp"), default="raw",
                    help="raw: count datagrams at the socket (default); srtp: let aiortc unprotect and parse")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=704)
    ap.add_argument("--fps", type=int, default=25)
    ap.add_argument("--bitrate", type=int, help="[media] bitrate_kbps (default: the server's, 2000)")
    ap.add_argument("--stream-max-seconds", type=int, default=3600)
    ap.add_argument("--profile", action="store_true",
                    help="py-spy the server during the largest count's window, print where its time goes")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (configs, logs, profiles)")
    ap.add_argument("--quick", action="store_true", help="counts 1,5,10 in both modes, 5 s windows (< ~2 min)")
    ap.add_argument("--recording", choices=("on", "off", "both"), default="on",
                    help="[recordings] enabled: on (the server default), off, or both (encode-once runs twice, "
                         "then compares server CPU per N)")
    ap.add_argument("--low-layer", action="store_true",
                    help="[media] low_layer = true: a second, half-size layer encoded once (compare with a run without)")
    ap.add_argument("--soak", type=float, default=0.0, metavar="SECONDS",
                    help="after the steps, keep --soak-spectators connected with churn for SECONDS (e.g. 300) "
                         "and sample the server's RSS, fds and threads every 10 s")
    ap.add_argument("--soak-spectators", type=int, default=50, help="spectators kept connected in the soak (50)")
    ap.add_argument("--churn-per-second", type=float, default=2.0,
                    help="spectators leaving (and as many joining) per second in the soak (2)")
    ap.add_argument("--soak-only", action="store_true", help="skip the N=0 window, the steps and the storm")
    args = ap.parse_args(argv)

    if args.quick:
        args.counts = args.counts or [1, 5, 10]
        args.per_spectator_counts = args.per_spectator_counts or [1, 5, 10]
        args.sender_counts = args.sender_counts or [1, 5, 10]
        args.window = args.window or 5.0
        args.settle = args.settle if args.settle is not None else 2.0
    args.counts = args.counts or [1, 10, 50, 100, 150]
    args.per_spectator_counts = args.per_spectator_counts or [1, 2, 4]
    args.sender_counts = args.sender_counts or [1, 10, 50]
    args.window = args.window or 10.0
    args.settle = 3.0 if args.settle is None else args.settle
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in MODES:
            ap.error(f"unknown mode {m!r} ({', '.join(MODES)})")
    if args.recording == "both" and "encode-once" not in modes:
        ap.error("--recording both runs encode-once twice: include it in --modes")
    if args.soak_only and args.soak <= 0:
        ap.error("--soak-only needs --soak SECONDS")
    if args.soak < 0 or args.soak_spectators < 1 or args.churn_per_second < 0:
        ap.error("--soak, --soak-spectators and --churn-per-second must be positive")
    if args.soak and args.churn_per_second > args.soak_spectators:
        ap.error("--churn-per-second above --soak-spectators would churn a spectator before its first frame")
    # The stream and the connection must outlive the steps plus the soak.
    args.stream_max_seconds = max(args.stream_max_seconds, int(args.soak) + 3600)
    runs = []  # (key in results, mode, recording)
    for m in modes:
        runs.append((m, m, args.recording != "off"))
        if m == "encode-once" and args.recording == "both":
            runs.append((OFF_KEY, m, False))

    # SIGTERM (e.g. `timeout`) unwinds like Ctrl-C, so the finally blocks end the server and workers.
    def interrupted(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    workdir = tempfile.mkdtemp(prefix="relay-fanout-")
    started = time.monotonic()
    print(f"fan-out benchmark: modes {', '.join(modes)}; recording {args.recording}; "
          f"low layer {'on' if args.low_layer else 'off'}; {os.cpu_count()} CPUs; "
          f"temp dir {workdir}", flush=True)
    print(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}", flush=True)
    results: dict[str, ModeResult] = {}
    try:
        for key, mode, recording in runs:
            counts = {"encode-once": args.counts, "encode-once-python": args.counts,
                      "encode-once-sender": args.sender_counts}.get(mode, args.per_spectator_counts)
            if mode == "janus":
                results[key] = asyncio.run(run_janus(args.counts, args, workdir))
            else:
                results[key] = asyncio.run(run_mode(mode, counts, args, workdir, recording))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        for result in results.values():
            print_mode(result, args)
        print_comparison(results)
        if any(r.rows for r in results.values()):
            print()
            print("lat p50/p95: relay-added latency, a frame out of the world model to its last RTP packet sent "
                  "(encode + fan-out), from the server's relay_frame_latency_seconds histogram (bucket upper "
                  "bounds: <=)")
        if results:
            print(f"total {time.monotonic() - started:.0f} s")
        if args.keep or args.profile:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
