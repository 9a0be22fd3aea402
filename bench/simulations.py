"""How fast a simulation worker renders a script, as a multiple of real time; optionally, the live frame
rate of a stream while simulations run.

    python bench/simulations.py                       # a 10 s script at 1280x704, 3 runs, on one core
    python bench/simulations.py --seconds 30 --width 704 --height 1280
    python bench/simulations.py --preset veryfast     # another x264 preset (simulations default: superfast)
    python bench/simulations.py --live --simulations 2   # live fps: idle, then while 2 simulations run

Render speed: the worker's own code (relay.simulations.record.record_script: SceneRenderer against a virtual clock,
H264Encoder, the recorder muxing video.mp4 and writing events, thumbnail, preview and metadata), run in
this process pinned to one core (``os.sched_setaffinity``) unless ``--cores all``. It prints, per run,
the wall time, the CPU time of the process (every thread), and the two multiples of real time:
script seconds / wall seconds, and script seconds / CPU seconds (the figure for one core).

Live: starts ``relay serve`` as a subprocess (``[simulations] workers = --simulations``), starts a
stream, reads ``relay_frames_generated_total`` from /metrics over ``--window`` seconds with nothing
else running, then submits ``--simulations`` long scripts and measures again while they are processing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from relay.simulations import validate_script  # noqa: E402
from relay.simulations.record import frame_count, record_script  # noqa: E402
from relay.simulations.spec import VideoSpec  # noqa: E402

PROMPTS = ["a calm ocean at sunset", "storm clouds roll in", "night falls, stars", "snowy mountains at dawn",
           "neon synthwave grid", "lava fields", "desert dunes at noon", "misty forest"]


def make_script(seconds: float) -> list[dict]:
    end = int(seconds * 1000)
    entries = [{"timestamp_ms": 0, "start": {"prompt": PROMPTS[0]}}]
    step = max(500, end // len(PROMPTS))
    for i, t in enumerate(range(step, end, step), start=1):
        entries.append({"timestamp_ms": t, "interact": {"prompt": PROMPTS[i % len(PROMPTS)]}})
    entries.append({"timestamp_ms": end, "end": {}})
    return validate_script(entries, max(150, seconds))


def render_speed(args: argparse.Namespace) -> None:
    if args.cores == "one" and hasattr(os, "sched_setaffinity"):
        core = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {core})
        where = f"pinned to core {core}"
    else:
        where = f"on {os.cpu_count()} cores"
    script = make_script(args.seconds)
    frames = frame_count(script[-1]["timestamp_ms"], args.fps)
    print(f"simulation render speed: {args.seconds:g} s script ({frames} frames, {len(script) - 2} prompt changes) "
          f"at {args.width}x{args.height}, {args.fps} fps, {args.bitrate} kbps, x264 {args.preset}; "
          f"one worker, {where}")
    print(f"{'run':>4} {'wall s':>8} {'cpu s':>8} {'x real time (wall)':>19} {'x real time (cpu)':>18} {'frames':>7}")
    video = VideoSpec(width=args.width, height=args.height, fps=args.fps, bitrate_kbps=args.bitrate,
                      keyframe_interval_seconds=2.0, preset=args.preset)
    walls, cpus = [], []
    with tempfile.TemporaryDirectory(prefix="relay-bench-sim-") as tmp:
        for run in range(args.runs + 1):  # run 0 warms up (noise textures, imports) and is not counted
            wall0, cpu0 = time.perf_counter(), time.process_time()
            result = record_script(script, video, store_dir=tmp, stream_id=f"bench{run}", owner="bench")
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
            if run == 0:
                continue
            walls.append(wall)
            cpus.append(cpu)
            print(f"{run:>4} {wall:>8.2f} {cpu:>8.2f} {args.seconds / wall:>19.2f} {args.seconds / cpu:>18.2f} "
                  f"{result.frame_count:>7}")
    wall, cpu = statistics.median(walls), statistics.median(cpus)
    print(f"median: {args.seconds / wall:.2f}x real time (wall), {args.seconds / cpu:.2f}x real time per core (cpu); "
          f"{wall / frames * 1000:.1f} ms wall per frame")


CONFIG = """
[server]
host = "127.0.0.1"
port = {port}
data_dir = "{data}"
[auth]
api_keys = ["{key}"]
[limits]
stream_max_seconds = 600
[world_model]
width = {width}
height = {height}
fps = {fps}
[simulations]
workers = {workers}
"""


async def live(args: argparse.Namespace) -> None:
    import aiohttp

    with tempfile.TemporaryDirectory(prefix="relay-bench-sim-live-") as tmp:
        key = "bench-" + secrets.token_hex(6)
        config = os.path.join(tmp, "relay.toml")
        with open(config, "w") as f:
            f.write(CONFIG.format(port=0, data=os.path.join(tmp, "data"), key=key, width=args.width,
                                  height=args.height, fps=args.fps, workers=args.simulations))
        log = open(os.path.join(tmp, "server.log"), "wb")
        proc = subprocess.Popen([sys.executable, "-m", "relay.cli", "serve", "--config", config], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=log)
        try:
            base = None
            while base is None:
                line = proc.stdout.readline().decode()
                if not line:
                    raise RuntimeError("relay exited")
                if m := re.search(r"listening on (\S+)", line):
                    base = m.group(1)
            auth = {"Authorization": f"Bearer {key}"}
            async with aiohttp.ClientSession(headers=auth) as http:
                async def frames() -> float:
                    async with http.get(base + "/metrics") as r:
                        text = await r.text()
                    return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines()
                               if l.startswith("relay_frames_generated_total"))

                async def window(label: str) -> None:
                    f0, t0 = await frames(), time.monotonic()
                    await asyncio.sleep(args.window)
                    f1, t1 = await frames(), time.monotonic()
                    print(f"  {label:<40} {(f1 - f0) / (t1 - t0):6.1f} fps")

                async with http.post(base + "/v1/connections") as r:
                    conn = (await r.json())["connection_id"]
                async with http.post(f"{base}/v1/connections/{conn}/streams", json={"prompt": "a calm ocean"}) as r:
                    assert r.status == 201, await r.text()
                print(f"live stream at {args.width}x{args.height}, {args.fps} fps, {os.cpu_count()} cores; "
                      f"frames generated per second of wall time:")
                await asyncio.sleep(2)
                await window("no simulation")
                script = make_script(150)
                jobs = []
                for _ in range(args.simulations):
                    async with http.post(base + "/v1/simulations", json={"script": script}) as r:
                        jobs.append((await r.json())["job_id"])
                while True:  # until every job is processing
                    states = []
                    for job in jobs:
                        async with http.get(f"{base}/v1/simulations/{job}") as r:
                            states.append((await r.json())["status"])
                    if all(s == "processing" for s in states):
                        break
                    await asyncio.sleep(0.2)
                await window(f"{args.simulations} simulations processing")
                for job in jobs:
                    async with http.get(f"{base}/v1/simulations/{job}") as r:
                        still = (await r.json())["status"]
                    if still != "processing":
                        print(f"  (job {job[:8]} was {still} by the end of the window: shorten --window)")
        finally:
            proc.terminate()
            proc.wait(20)
            log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="script length (default 10)")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=704)
    parser.add_argument("--fps", type=int, default=25)
    parser.add_argument("--bitrate", type=int, default=2000, help="kbps, as [media] bitrate_kbps")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--preset", default="superfast",
                        help="x264 preset (default superfast, as [simulations] encoder_preset)")
    parser.add_argument("--cores", choices=("one", "all"), default="one")
    parser.add_argument("--live", action="store_true", help="measure a live stream's fps while simulations run")
    parser.add_argument("--simulations", type=int, default=2, help="with --live: simulations running at once")
    parser.add_argument("--window", type=float, default=10.0, help="with --live: seconds per measurement")
    args = parser.parse_args()
    if args.live:
        asyncio.run(live(args))
    else:
        render_speed(args)


if __name__ == "__main__":
    main()
