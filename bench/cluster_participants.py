"""Participants at any node (issue 14): one participant input's round trip, at the origin and at an edge
(not a test).

    python bench/cluster_participants.py               # 300 inputs each way
    python bench/cluster_participants.py --count 1000

Starts Debian's redis-server on a free loopback port and two `relay serve` nodes of one cluster; a live
stream at the first (the origin). A participant socket at each node sends inputs one after another in
"host" mode (each refused host_only by the origin's orchestrator: the whole audience path, nothing applied
to the stream); printed: the reply's round trip p50/p95 at the origin (socket -> audience -> socket) and at
the edge (edge socket -> Redis -> origin's audience -> Redis -> edge socket), and the edge's added cost.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

import aiohttp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "bench-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def node_config(directory: str, redis_url: str, name: str) -> str:
    port = free_port()
    path = os.path.join(directory, f"{name}.toml")
    with open(path, "w") as f:
        f.write(f"""[server]
host = "127.0.0.1"
port = {port}
public_url = "http://127.0.0.1:{port}"
data_dir = "{os.path.join(directory, name)}"
[auth]
api_keys = ["{KEY}"]
[world_model]
width = 160
height = 96
[recordings]
enabled = false
[orchestration]
participant_messages_per_second = 1000
participant_messages_burst = 10000
[cluster]
redis_url = "{redis_url}"
node_id = "{name}"
""")
    return path


async def serve(config: str) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "relay.cli", "serve", "--config", config,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
                                                cwd=ROOT)
    while True:
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        if not line:
            raise RuntimeError("relay serve exited before listening")
        if m := re.search(r"listening on (\S+)", line):
            return proc, m.group(1)


async def round_trips(http: aiohttp.ClientSession, url: str, broadcast: dict, count: int) -> list[float]:
    ws_url = f"{url.replace('http', 'ws', 1)}/v1/broadcasts/{broadcast['broadcast_id']}/events" \
             f"?token={broadcast['spectator_token']}"
    times = []
    async with http.ws_connect(ws_url) as ws:
        assert (await ws.receive_json(timeout=5))["type"] == "hello"
        for i in range(count):
            started = time.perf_counter()
            await ws.send_json({"type": "input", "prompt": f"prompt {i}"})
            while (await ws.receive_json(timeout=5))["type"] != "input_result":
                pass  # a push between
            times.append(time.perf_counter() - started)
    return times


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as directory:
        redis_port = free_port()
        redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                                  "--appendonly", "no", "--dir", directory],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs = []
        try:
            await asyncio.sleep(0.5)
            redis_url = f"redis://127.0.0.1:{redis_port}/0"
            for name in ("origin", "edge"):
                procs.append(await serve(node_config(directory, redis_url, name)))
            (_, origin), (_, edge) = procs
            auth = {"Authorization": f"Bearer {KEY}"}
            async with aiohttp.ClientSession() as http:
                async with http.post(f"{origin}/v1/connections", headers=auth) as r:
                    conn = await r.json()
                async with http.post(f"{origin}/v1/connections/{conn['connection_id']}/streams", headers=auth,
                                     json={"prompt": "a calm sea"}) as r:
                    assert r.status == 201, await r.text()
                for node, url in (("origin", origin), ("edge", edge)):
                    await round_trips(http, url, conn["broadcast"], 20)  # warm up
                    times = await round_trips(http, url, conn["broadcast"], args.count)
                    print(f"{node:>6}: input -> input_result round trip over {args.count}: "
                          f"p50 {percentile(times, 0.5) * 1000:.2f} ms, p95 {percentile(times, 0.95) * 1000:.2f} ms")
        finally:
            for proc, _ in procs:
                proc.terminate()
                await proc.wait()
            redis.terminate()
            redis.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
