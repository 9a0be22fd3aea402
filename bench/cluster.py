"""Edge cascade benchmark (issue 14, first part): an origin and one edge on this box (not a test).

    python bench/cluster.py                    # 30 light spectators at each node, 5 s windows, 5 cold joins
    python bench/cluster.py --count 60 --window 10 --cold 10

The origin is the real server (``relay serve``, as bench/fanout.py starts it) with a live stream.
The edge is this script again (``serve-edge``): the relay's app with an EdgeManager whose directory
knows that one broadcast (the cluster core's Redis directory is not on this branch), so until it is
wired the edge presents the spectator token upstream and the origin counts its feed as one
spectator. Light receivers (bench/receiver.py: real aiortc peers that count RTP and decode nothing)
join at either node from their own processes. Printed: each node's CPU per spectator (% of one
core, least squares over 1 and 1 + count spectators), what the edge's feed costs the origin, frame
rates, edge-added latency (from the edge's relay_edge_frame_latency_seconds: a frame's first packet
in -> sent to every local spectator; bucket bounds), and time to first frame through the edge,
cold (its first spectator: the feed is opened) and warm.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

from fanout import Server, Workers, _die_with_parent, cpu_seconds, free_port, percentile  # noqa: E402

LINGER = 1.0  # the edge's [cluster] edge_linger_seconds here: cold joins follow each other quickly


# ------------------------------------------------------------------------------------ the edge node

def serve_edge(args: argparse.Namespace) -> None:
    """The edge node: the relay app, plus an EdgeManager that knows one origin broadcast."""
    import dataclasses

    from aiohttp import web

    from relay.api.app import Runner, create_app
    from relay.cli import _uvloop_run
    from relay.cluster.directory import Origin
    from relay.cluster.edge import EdgeManager
    from relay.config import load_config
    from relay.web import EDGES

    settings = load_config(args.config, overrides={"server": {"port": args.port}})
    settings = dataclasses.replace(settings, cluster=dataclasses.replace(settings.cluster,
                                                                         edge_linger_seconds=LINGER))
    origin = Origin("origin", args.origin, args.token)

    async def origin_of(broadcast_id: str) -> Origin | None:
        return origin if broadcast_id == args.broadcast else None

    async def main() -> None:
        app = create_app(settings)
        app[EDGES] = EdgeManager(settings, origin_of, lambda: f"Bearer {args.token}")
        runner = Runner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", args.port).start()
        print("edge listening", flush=True)
        try:
            await asyncio.Event().wait()  # until SIGTERM
        finally:
            await runner.cleanup()

    _uvloop_run()(main())


class EdgeProcess:
    def __init__(self, workdir: str, origin: Server, broadcast: dict) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        config = os.path.join(workdir, "edge.toml")
        with open(origin.config_path) as f:
            text = f.read().replace(origin.data_dir, os.path.join(workdir, "data-edge"))
        with open(config, "w") as f:
            f.write(text)
        self.whep_url = f"{self.base_url}/v1/broadcasts/{broadcast['broadcast_id']}/whep"
        self.log_path = os.path.join(workdir, "edge.log")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "serve-edge", "--config", config, "--port", str(self.port),
                 "--origin", origin.base_url, "--broadcast", broadcast["broadcast_id"],
                 "--token", broadcast["spectator_token"]],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def ready(self, http) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"edge exited: {open(self.log_path).read()[-2000:]}")
            try:
                async with http.get(self.base_url + "/readyz") as r:
                    if r.status == 200:
                        return
            except Exception:
                pass
            await asyncio.sleep(0.2)
        raise RuntimeError("edge not ready after 30 s")

    async def latency_buckets(self, http) -> dict[float, float]:
        async with http.get(self.base_url + "/metrics") as r:
            text = await r.text()
        buckets = {}
        for line in text.splitlines():
            if line.startswith("relay_edge_frame_latency_seconds_bucket"):
                bound = line.split('le="', 1)[1].split('"', 1)[0]
                buckets[float(bound)] = float(line.rsplit(" ", 1)[1])
        return buckets

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def bucket_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float | None:
    counts = sorted((bound, after[bound] - before.get(bound, 0.0)) for bound in after)
    total = counts[-1][1] if counts else 0
    for bound, count in counts:
        if total and count >= q * total:
            return bound
    return None


# ------------------------------------------------------------------------------------ measuring

async def cpu_over(pid: int, seconds: float) -> float:
    start, t0 = cpu_seconds(pid), time.monotonic()
    await asyncio.sleep(seconds)
    return 100 * (cpu_seconds(pid) - start) / (time.monotonic() - t0)


async def fps_over(workers: Workers, seconds: float) -> list[float]:
    before = {(r["index"], id(workers)): r["frames"] for r in await workers.snapshot()}
    await asyncio.sleep(seconds)
    after = await workers.snapshot()
    return [(r["frames"] - before.get((r["index"], id(workers)), 0)) / seconds for r in after if not r["error"]]


async def origin_spectators(http, origin: Server, broadcast: dict) -> int:
    async with http.get(f"{origin.base_url}/v1/broadcasts/{broadcast['broadcast_id']}",
                        headers={"Authorization": f"Bearer {broadcast['spectator_token']}"}) as r:
        return (await r.json())["spectators"]


async def run(args: argparse.Namespace) -> None:
    import aiohttp

    workdir = tempfile.mkdtemp(prefix="relay-cluster-bench-")
    server_args = SimpleNamespace(bitrate=None, low_layer=False, stream_max_seconds=3600, width=args.width,
                                  height=args.height, fps=25)
    origin = Server(workdir, "encode-once", server_args)
    edge: EdgeProcess | None = None
    groups: list[Workers] = []
    async with aiohttp.ClientSession() as http:
        try:
            await origin.start(http)
            auth = {"Authorization": f"Bearer {origin.api_key}"}
            async with http.post(origin.base_url + "/v1/connections", headers=auth) as r:
                conn = await r.json()
            async with http.post(f"{origin.base_url}/v1/connections/{conn['connection_id']}/streams", headers=auth,
                                 json={"prompt": "a calm ocean"}) as r:
                assert r.status in (200, 201), await r.text()
            broadcast = conn["broadcast"]
            edge = EdgeProcess(workdir, origin, broadcast)
            await edge.ready(http)
            await asyncio.sleep(1.0)

            idle_origin = await cpu_over(origin.pid, args.window)
            # Cold: the edge's first spectator opens the feed; it lingers LINGER s after they leave.
            at_edge = Workers(1, edge.whep_url, broadcast["spectator_token"], "raw")
            groups.append(at_edge)
            cold = []
            for _ in range(args.cold):
                joined = await at_edge.join(1, 0.0)
                cold += [r["ttff"] for r in joined if r["ttff"] is not None]
                await at_edge.leave_all()
                deadline = time.monotonic() + LINGER + 10
                while await origin_spectators(http, origin, broadcast) and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
            # Warm: one spectator holds the feed; the next ones join it.
            await at_edge.join(1, 0.0)
            await asyncio.sleep(1.0)
            origin_with_feed = await cpu_over(origin.pid, args.window)
            edge_one = await cpu_over(edge.pid, args.window)
            edge_workers = Workers(args.workers, edge.whep_url, broadcast["spectator_token"], "raw")
            groups.append(edge_workers)
            warm_joined = await edge_workers.join(args.count, 1.0)
            warm = [r["ttff"] for r in warm_joined if r["ttff"] is not None]
            await asyncio.sleep(2.0)
            lat0 = await edge.latency_buckets(http)
            edge_fps_task = asyncio.create_task(fps_over(edge_workers, args.window))
            edge_n = await cpu_over(edge.pid, args.window)
            edge_fps = await edge_fps_task
            lat1 = await edge.latency_buckets(http)
            await edge_workers.leave_all()

            # The same crowd at the origin (the edge's feed still counted there as one spectator).
            origin_workers = Workers(args.workers, origin.base_url + f"/v1/broadcasts/{broadcast['broadcast_id']}/whep",
                                     broadcast["spectator_token"], "raw")
            groups.append(origin_workers)
            await origin_workers.join(args.count, 1.0)
            await asyncio.sleep(2.0)
            origin_fps_task = asyncio.create_task(fps_over(origin_workers, args.window))
            origin_n = await cpu_over(origin.pid, args.window)
            origin_fps = await origin_fps_task

            n = args.count
            print(f"\nedge cascade, {args.width}x{args.height} 25 fps, {n} light spectators, {args.window:g} s windows")
            print(f"  origin CPU: {idle_origin:.1f} % idle (encoding), {origin_with_feed:.1f} % with the edge's "
                  f"feed: the feed costs the origin {origin_with_feed - idle_origin:+.2f} % of a core")
            print(f"  per spectator: edge {(edge_n - edge_one) / n:.3f} % of a core "
                  f"({edge_one:.1f} % -> {edge_n:.1f} %), origin {(origin_n - origin_with_feed) / n:.3f} % "
                  f"({origin_with_feed:.1f} % -> {origin_n:.1f} %)")
            print(f"  fps through the edge: min {min(edge_fps, default=0):.1f}, median "
                  f"{statistics.median(edge_fps) if edge_fps else 0:.1f} ({len(edge_fps)} spectators); at the origin "
                  f"min {min(origin_fps, default=0):.1f}")
            p50, p95 = bucket_quantile(lat0, lat1, 0.5), bucket_quantile(lat0, lat1, 0.95)
            print(f"  edge-added latency (first packet in -> sent to all {n + 1}): p50 <= {p50 and p50 * 1000:g} ms, "
                  f"p95 <= {p95 and p95 * 1000:g} ms (bucket bounds)")
            print(f"  TTFF through the edge: cold p50 {percentile(cold, .5) or 0:.3f} s p95 "
                  f"{percentile(cold, .95) or 0:.3f} s ({len(cold)} joins); warm p50 {percentile(warm, .5) or 0:.3f} s "
                  f"p95 {percentile(warm, .95) or 0:.3f} s ({len(warm)} joins)")
        finally:
            for group in groups:
                group.stop()
            if edge is not None:
                edge.stop()
            origin.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    edge = sub.add_parser("serve-edge")
    for name in ("--config", "--origin", "--broadcast", "--token"):
        edge.add_argument(name, required=True)
    edge.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, default=30)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--window", type=float, default=5.0)
    parser.add_argument("--cold", type=int, default=5)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=704)
    args = parser.parse_args()
    if args.command == "serve-edge":
        serve_edge(args)
    else:
        asyncio.run(run(args))


if __name__ == "__main__":
    main()
