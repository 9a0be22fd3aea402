"""Audience scale: many participants on one broadcast's events socket, with the video running.

    python bench/participants.py                 # 1000 participants, 200 inputs/s for 10 s
    python bench/participants.py --participants 300 --rate 100 --seconds 5

Starts `relay serve` as a subprocess (1280x704 stream live, encode-once), opens N events
sockets from this process, then prints:
  - server memory per participant (RSS delta / N);
  - fan-out time of one orchestration state update (host PUT -> event at the last participant);
  - input handling latency (input -> input_result, p50/p99) under a steady input rate in queue mode.
Loopback only; bounded in time; the server is killed on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

KEY = "bench-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


async def wait_ready(url: str, proc: subprocess.Popen) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(200):
            if proc.poll() is not None:
                raise SystemExit("server exited early")
            try:
                async with http.get(url + "/healthz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise SystemExit("server did not start")


async def main(args: argparse.Namespace) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "relay.toml"
        config.write_text(
            f'[server]\nport = {port}\ndata_dir = "{tmp}/data"\nlog_level = "warning"\n'
            f'[auth]\napi_keys = ["{KEY}"]\n'
            "[limits]\nstream_max_seconds = 150\nidle_timeout_seconds = 600\n"
            f"[world_model]\nwidth = {args.width}\nheight = {args.height}\n"
        )
        proc = subprocess.Popen([sys.executable, "-m", "relay.cli", "serve", "--config", str(config)],
                                stdout=subprocess.DEVNULL)
        try:
            await wait_ready(url, proc)
            await run(args, url, proc.pid)
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


async def run(args: argparse.Namespace, url: str, pid: int) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        async with http.post(f"{url}/v1/connections", headers=auth) as r:
            conn = await r.json()
        async with http.post(f"{url}/v1/connections/{conn['connection_id']}/streams", headers=auth,
                             json={"prompt": "a crowded festival at night"}) as r:
            assert r.status == 201, await r.text()
        b = conn["broadcast"]
        events_url = b["webrtc_url"].replace("http://", "ws://") + f"/events?token={b['spectator_token']}"
        await asyncio.sleep(1.0)
        base_rss = rss_kib(pid)

        sockets = []
        pending: dict[int, float] = {}
        latencies: list[float] = []
        update_arrivals: list[float] = []
        update_marker = {"mode": None}

        async def reader(index: int, ws: aiohttp.ClientWebSocketResponse) -> None:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                event = msg.json()
                kind = event.get("type")
                if kind == "input_result" and index in pending:
                    latencies.append(time.perf_counter() - pending.pop(index))
                elif kind == "orchestration" and event.get("mode") == update_marker["mode"]:
                    update_arrivals.append(time.perf_counter())
                    update_marker_seen.add(index)

        update_marker_seen: set[int] = set()
        t0 = time.perf_counter()
        for i in range(args.participants):
            ws = await http.ws_connect(events_url, heartbeat=None, autoping=True)
            await ws.receive_json()  # hello
            sockets.append(ws)
        join_s = time.perf_counter() - t0
        readers = [asyncio.create_task(reader(i, ws)) for i, ws in enumerate(sockets)]
        await asyncio.sleep(1.0)
        per_participant = (rss_kib(pid) - base_rss) / args.participants

        # One state update to everyone: switch to queue mode, wait for the last arrival.
        update_marker["mode"] = "queue"
        sent = time.perf_counter()
        async with http.put(b["webrtc_url"] + "/orchestration", headers=auth,
                            json={"mode": "queue", "queue_interval_seconds": 0.5, "cooldown_seconds": 0,
                                  "duplicate_window_seconds": 0, "queue_max": 1000}) as r:
            assert r.status == 200, await r.text()
        deadline = time.perf_counter() + 10
        while len(update_marker_seen) < args.participants and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)
        fanout = [t - sent for t in update_arrivals]

        # Inputs at a steady rate from random participants: each tick sends what is due by then,
        # so the rate holds even when this process's event loop is busy reading state pushes.
        start = time.perf_counter()
        end = start + args.seconds
        n = due_count = 0
        while (now := time.perf_counter()) < end:
            due = int((now - start) * args.rate)
            while due_count < due:
                due_count += 1
                i = random.randrange(args.participants)
                if i not in pending:  # one input in flight per participant
                    pending[i] = time.perf_counter()
                    await sockets[i].send_json({"type": "input", "prompt": f"idea number {due_count}"})
                    n += 1
            await asyncio.sleep(0.002)
        await asyncio.sleep(1.0)

        for ws in sockets:
            await ws.close()
        for task in readers:
            task.cancel()

    print(f"participants: {args.participants} (joined in {join_s:.1f} s), stream {args.width}x{args.height} live")
    print(f"server memory per participant: {per_participant:.1f} KiB")
    print(f"state update fan-out to all: p50 {pct(fanout, 0.5) * 1000:.1f} ms, "
          f"last {max(fanout, default=float('nan')) * 1000:.1f} ms "
          f"({len(update_marker_seen)}/{args.participants} received; includes the <=250 ms coalescing tick)")
    print(f"inputs: {n} sent ({n / args.seconds:.0f}/s achieved), {len(latencies)} answered; "
          f"latency p50 {pct(latencies, 0.5) * 1000:.1f} ms, p99 {pct(latencies, 0.99) * 1000:.1f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--participants", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=200.0, help="inputs per second")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=704)
    asyncio.run(main(parser.parse_args()))
