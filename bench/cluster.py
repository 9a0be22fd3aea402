"""Cluster benchmark (issue 14): Redis and three `relay serve` nodes on this box (not a test).

    python bench/cluster.py                    # edge figures with 30 spectators, then capacity 1 node vs 3
    python bench/cluster.py --quick            # 10 spectators, 3 s windows, capacity steps of 45 up to 450
    python bench/cluster.py --skip-capacity    # the edge figures only

Everything is real: Debian's redis-server on a free loopback port, three relay processes with the same
[cluster] config (apart from port, public_url and data_dir), a host connection with a live stream at the
origin, and light receivers (bench/receiver.py: real aiortc peers that count RTP and decode nothing) in
their own processes, joining by WHEP at whichever node they are given. Printed:

1. The edge cascade: each node's CPU per spectator (% of one core: 1 spectator -> 1 + count), what one
   edge's feed costs the origin (target: no more than a spectator), fps, edge-added latency (an edge's
   relay_edge_frame_latency_seconds: a frame's first packet in -> sent to every local spectator; bucket
   bounds), time to first frame through an edge, cold (the edge's first spectator opens the feed) and warm.
2. Capacity: spectators are added in steps, all at the origin (one node) or spread evenly over the
   three nodes, until fewer than 99 % of them get >= 24 fps; printed is the largest total that held, for
   each design, and their ratio. The load generators run on the same two cores, as many processes for
   either design, so the ratio is fair; the absolute figures are what this box can show.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import aiohttp

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

from fanout import Server, Workers, cpu_seconds, percentile  # noqa: E402
from procs import die_with_parent, free_port  # noqa: E402

LINGER = 1.0  # the nodes' [cluster] edge_linger_seconds: cold joins follow each other quickly
FLOOR = 24.0  # fps a spectator must get to count as served
SERVED = 0.99  # share of spectators at FLOOR for a step to hold


# ------------------------------------------------------------------------------------ the cluster

class Redis:
    """Debian's redis-server on a free loopback port, nothing persisted."""

    def __init__(self, workdir: str) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", workdir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent)

    async def ready(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.write(b"PING\r\n")
                line = await reader.readline()
                writer.close()
                if line.startswith(b"+PONG"):
                    return
            await asyncio.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def cluster_node(workdir: str, name: str, redis: Redis, args: argparse.Namespace) -> Server:
    """One node: bench/fanout.py's server config plus the same [cluster] section on every node."""
    server_args = SimpleNamespace(bitrate=None, low_layer=False, stream_max_seconds=3600, width=args.width,
                                  height=args.height, fps=25)
    node = Server(workdir, "encode-once", server_args, name=name, extra_config=(
        f'\n[cluster]\nredis_url = "{redis.url}"\nnode_id = "{name}"\nheartbeat_seconds = 1\n'
        f'node_timeout_seconds = 3\nedge_linger_seconds = {LINGER}\n'))
    node.extra_args = ("--public-url", node.base_url)  # how the other nodes reach it
    return node


async def metric(http, node: Server, name: str) -> float | None:
    """One series' value (summed over labels) from a node's /metrics, None if the node has none."""
    values = await node.metrics(http)
    return values.get(name)


async def edge_latency_buckets(http, node: Server) -> dict[float, float]:
    async with http.get(node.base_url + "/metrics") as r:
        text = await r.text()
    buckets = {}
    for line in text.splitlines():
        if line.startswith("relay_edge_frame_latency_seconds_bucket"):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[float(bound)] = float(line.rsplit(" ", 1)[1])
    return buckets


def bucket_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float | None:
    counts = sorted((bound, after[bound] - before.get(bound, 0.0)) for bound in after)
    total = counts[-1][1] if counts else 0
    for bound, count in counts:
        if total and count >= q * total:
            return bound
    return None


async def feed_dropped(http, edge: Server) -> None:
    """Wait until the edge has let its feed go (its gauge), or LINGER plus a heartbeat without one."""
    deadline = time.monotonic() + LINGER + 10
    while time.monotonic() < deadline:
        feeds = await metric(http, edge, "relay_cluster_edge_feeds")
        if feeds is None:
            await asyncio.sleep(LINGER + 1.0)
            return
        if feeds == 0:
            return
        await asyncio.sleep(0.1)


# ------------------------------------------------------------------------------------ measuring

async def cpu_over(pid: int, seconds: float) -> float:
    start, t0 = cpu_seconds(pid), time.monotonic()
    await asyncio.sleep(seconds)
    return 100 * (cpu_seconds(pid) - start) / (time.monotonic() - t0)


async def fps_over(groups: list[Workers], seconds: float) -> list[float]:
    """Each connected spectator's frame rate over the next `seconds`, across groups."""
    before = [{r["index"]: r["frames"] for r in await g.snapshot()} for g in groups]
    await asyncio.sleep(seconds)
    rates = []
    for g, b in zip(groups, before):
        rates += [(r["frames"] - b.get(r["index"], 0)) / seconds for r in await g.snapshot() if not r["error"]]
    return rates


def whep_url(node: Server, broadcast: dict) -> str:
    return f"{node.base_url}/v1/broadcasts/{broadcast['broadcast_id']}/whep"


async def open_broadcast(http, origin: Server) -> dict:
    auth = {"Authorization": f"Bearer {origin.api_key}"}
    async with http.post(origin.base_url + "/v1/connections", headers=auth) as r:
        assert r.status == 201, await r.text()
        conn = await r.json()
    async with http.post(f"{origin.base_url}/v1/connections/{conn['connection_id']}/streams", headers=auth,
                         json={"prompt": "a calm ocean"}) as r:
        assert r.status in (200, 201), await r.text()
    return conn["broadcast"]


async def edge_figures(http, nodes: list[Server], broadcast: dict, args: argparse.Namespace,
                       groups: list[Workers]) -> None:
    origin, edge = nodes[0], nodes[1]
    token = broadcast["spectator_token"]
    await asyncio.sleep(1.0)
    idle_origin = await cpu_over(origin.pid, args.window)
    at_edge = Workers(1, whep_url(edge, broadcast), token, "raw")
    groups.append(at_edge)
    cold = []
    for _ in range(args.cold):  # the edge's first spectator opens the feed; it lingers LINGER s after
        joined = await at_edge.join(1, 0.0)
        cold += [r["ttff"] for r in joined if r["ttff"] is not None]
        await at_edge.leave_all()
        await feed_dropped(http, edge)
    await at_edge.join(1, 0.0)  # warm: one spectator holds the feed; the next ones join it
    await asyncio.sleep(1.0)
    origin_with_feed = await cpu_over(origin.pid, args.window)
    edge_one = await cpu_over(edge.pid, args.window)
    crowd = Workers(args.workers, whep_url(edge, broadcast), token, "raw")
    groups.append(crowd)
    warm = [r["ttff"] for r in await crowd.join(args.count, 1.0) if r["ttff"] is not None]
    await asyncio.sleep(2.0)
    lat0 = await edge_latency_buckets(http, edge)
    edge_fps_task = asyncio.create_task(fps_over([crowd], args.window))
    edge_n = await cpu_over(edge.pid, args.window)
    edge_fps = await edge_fps_task
    lat1 = await edge_latency_buckets(http, edge)
    await crowd.leave_all()

    at_origin = Workers(args.workers, whep_url(origin, broadcast), token, "raw")  # the same crowd at the origin
    groups.append(at_origin)
    await at_origin.join(args.count, 1.0)
    await asyncio.sleep(2.0)
    origin_fps_task = asyncio.create_task(fps_over([at_origin], args.window))
    origin_n = await cpu_over(origin.pid, args.window)
    origin_fps = await origin_fps_task
    await at_origin.leave_all()
    await at_edge.leave_all()

    n = args.count
    print(f"\n1. the edge cascade: {args.width}x{args.height} 25 fps, {n} light spectators, {args.window:g} s windows")
    print(f"  origin CPU: {idle_origin:.1f} % idle (encoding), {origin_with_feed:.1f} % with one edge's feed: "
          f"the feed costs the origin {origin_with_feed - idle_origin:+.2f} % of a core")
    edge_per, origin_per = (edge_n - edge_one) / n, (origin_n - origin_with_feed) / n
    print(f"  per spectator: edge {edge_per:.3f} % of a core ({edge_one:.1f} % -> {edge_n:.1f} %), origin "
          f"{origin_per:.3f} % ({origin_with_feed:.1f} % -> {origin_n:.1f} %); edge/origin "
          f"{edge_per / origin_per if origin_per > 0 else float('nan'):.2f}x")
    print(f"  fps through the edge: min {min(edge_fps, default=0):.1f}, median "
          f"{statistics.median(edge_fps) if edge_fps else 0:.1f} ({len(edge_fps)} spectators); at the origin "
          f"min {min(origin_fps, default=0):.1f}")
    p50, p95 = bucket_quantile(lat0, lat1, 0.5), bucket_quantile(lat0, lat1, 0.95)
    print(f"  edge-added latency (first packet in -> sent to all {n + 1}): p50 <= {p50 and p50 * 1000:g} ms, "
          f"p95 <= {p95 and p95 * 1000:g} ms (bucket bounds)")
    print(f"  TTFF through the edge: cold p50 {percentile(cold, .5) or 0:.3f} s p95 {percentile(cold, .95) or 0:.3f} s "
          f"({len(cold)} joins); warm p50 {percentile(warm, .5) or 0:.3f} s p95 {percentile(warm, .95) or 0:.3f} s "
          f"({len(warm)} joins)")


async def capacity(http, nodes: list[Server], broadcast: dict, args: argparse.Namespace,
                   groups: list[Workers]) -> int:
    """The largest total (a multiple of the step) at which >= SERVED of the spectators got >= FLOOR fps."""
    per_node = args.generators // len(nodes)
    crowd = [Workers(per_node, whep_url(node, broadcast), broadcast["spectator_token"], "raw") for node in nodes]
    groups.extend(crowd)
    held, total = 0, 0
    try:
        while total + args.step <= args.max:
            share = args.step // len(nodes)
            for group in crowd:  # spread evenly, the remainder at the origin
                await group.join(share, 0.5)
            if args.step % len(nodes):
                await crowd[0].join(args.step % len(nodes), 0.5)
            total += args.step
            await asyncio.sleep(2.0)  # the joiners' first keyframes and bursts pass
            cpu0, t0 = [cpu_seconds(node.pid) for node in nodes], time.monotonic()
            rates = await fps_over(crowd, args.window)
            cpu = " ".join(f"{100 * (cpu_seconds(node.pid) - c) / (time.monotonic() - t0):.0f}%"
                           for node, c in zip(nodes, cpu0))
            served = sum(1 for r in rates if r >= FLOOR)
            print(f"    {total:4d} spectators: {served} at >= {FLOOR:g} fps, min {min(rates, default=0):.1f}, "
                  f"median {statistics.median(rates) if rates else 0:.1f}; node CPU {cpu}", flush=True)
            if served < SERVED * total:
                break
            held = total
    finally:
        for group in crowd:
            group.stop()
    return held


async def run(args: argparse.Namespace) -> None:
    workdir = tempfile.mkdtemp(prefix="relay-cluster-bench-")
    redis = Redis(workdir)
    nodes: list[Server] = []
    groups: list[Workers] = []
    async with aiohttp.ClientSession() as http:
        try:
            await redis.ready()
            nodes = [cluster_node(workdir, f"node{i + 1}", redis, args) for i in range(3)]
            for node in nodes:
                await node.start(http)
            broadcast = await open_broadcast(http, nodes[0])
            origin_url = broadcast.get("whep_url", "")
            nodes.sort(key=lambda node: not origin_url.startswith(node.base_url))  # the origin first
            await edge_figures(http, nodes, broadcast, args, groups)
            if args.skip_capacity:
                return
            print(f"\n2. capacity: steps of {args.step}, {args.generators} load-generator processes either way, "
                  f"a step holds while >= {SERVED:.0%} of spectators get >= {FLOOR:g} fps")
            print("  one node (all at the origin):")
            one = await capacity(http, nodes[:1], broadcast, args, groups)
            print("  three nodes (origin + two edges, spread evenly):")
            three = await capacity(http, nodes, broadcast, args, groups)
            ratio = f"{three / one:.2f}x" if one else "n/a"
            print(f"  total spectators at >= {FLOOR:g} fps: one node {one}, three nodes {three} ({ratio}) on this "
                  f"box's {os.cpu_count()} cores")
        finally:
            for group in groups:
                group.stop()
            for node in nodes:
                node.stop()
            redis.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=30, help="spectators for the edge figures")
    parser.add_argument("--workers", type=int, default=2, help="load-generator processes for the edge figures")
    parser.add_argument("--window", type=float, default=5.0, help="seconds per measurement window")
    parser.add_argument("--cold", type=int, default=5, help="cold joins through an edge")
    parser.add_argument("--step", type=int, default=60, help="capacity: spectators added per step")
    parser.add_argument("--max", type=int, default=900, help="capacity: stop at this many spectators")
    parser.add_argument("--generators", type=int, default=3, help="capacity: load-generator processes")
    parser.add_argument("--skip-capacity", action="store_true")
    parser.add_argument("--quick", action="store_true", help="smaller and shorter: a first look")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=704)
    args = parser.parse_args()
    if args.quick:
        args.count, args.window, args.cold, args.step, args.max = 10, 3.0, 3, 45, 450
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
