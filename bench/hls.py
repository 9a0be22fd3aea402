"""HLS benchmark: what the live HLS rendition costs the relay (not a test).

    python bench/hls.py                      # 1280x704, 25 fps; HLS off vs on, then 0/50/200 HLS viewers
    python bench/hls.py --viewers 0,100 --window 10

It starts the real server (bench/fanout.py's Server: ``python -m relay.cli serve``, loopback, a
temporary config) twice, with ``[media] hls`` off and on, starts a stream over the REST API and
measures the server process's CPU (utime+stime from /proc, as % of one core) over a window with
nobody watching: the difference is what cutting segments costs per broadcast. Then, with HLS on,
it adds viewers that behave like HLS players without a CDN in front (each reads the playlist once
per segment duration and fetches every new segment, in this process, over aiohttp) and reports
server CPU per HLS viewer next to the WebRTC figure from bench/fanout.py, as a ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from fanout import Server, cpu_seconds  # noqa: E402

WEBRTC_PER_SPECTATOR = 0.22  # % of one core, bench/fanout.py encode-once slope (see the closing notes)


async def cpu_over(pid: int, seconds: float) -> float:
    c0, t0 = cpu_seconds(pid), time.monotonic()
    await asyncio.sleep(seconds)
    return 100.0 * (cpu_seconds(pid) - c0) / (time.monotonic() - t0)


async def player(http, hls_url: str, stop: asyncio.Event, stats: dict) -> None:
    """An HLS player's requests: the playlist every target duration, each new segment once."""
    base = hls_url.split("index.m3u8")[0]
    seen: set[str] = set()
    while not stop.is_set():
        try:
            async with http.get(hls_url) as r:
                playlist = await r.text()
            target = float(re.search(r"#EXT-X-TARGETDURATION:(\d+)", playlist).group(1))
            for uri in re.findall(r"#EXTINF:[\d.]+,\n(\S+)", playlist)[-3:]:
                if uri not in seen:
                    seen.add(uri)
                    async with http.get(base + uri) as r:
                        stats["bytes"] += len(await r.read())
            stats["requests"] += 1
        except Exception as exc:  # counted, not fatal: the figure says how many failed
            stats["errors"] += 1
            stats["last_error"] = repr(exc)
            target = 1.0
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), target)


async def run(args: argparse.Namespace, workdir: str, hls: bool, viewers: list[int]) -> dict:
    import aiohttp

    from relay.client import RelayClient

    workdir = os.path.join(workdir, "hls-on" if hls else "hls-off")
    os.makedirs(workdir)
    server = Server(workdir, "encode-once", args)
    with open(server.config_path) as f:
        config = f.read()
    with open(server.config_path, "w") as f:  # [media] is fanout's; add the one key this compares
        f.write(config.replace('mode = "encode-once"\n', f'mode = "encode-once"\nhls = {str(hls).lower()}\n'))
    out: dict = {"hls": hls, "rows": []}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        try:
            await server.start(http)
            client = RelayClient(server.base_url, server.api_key, session=http)
            async with client.connect() as conn:
                await conn.start_stream("a calm ocean at sunset")
                await asyncio.sleep(args.settle)
                out["base"] = await cpu_over(server.pid, args.window)
                print(f"[hls {'on' if hls else 'off'}] nobody watching: server {out['base']:.1f}% CPU", flush=True)
                if not hls:
                    return out
                hls_url = conn.broadcast["hls_url"]
                stop = asyncio.Event()
                tasks: list[asyncio.Task] = []
                stats = {"requests": 0, "bytes": 0, "errors": 0, "last_error": None}
                try:
                    for n in viewers:
                        while len(tasks) < n:
                            tasks.append(asyncio.create_task(player(http, hls_url, stop, stats)))
                            await asyncio.sleep(args.window / max(n, 1) / 4)  # spread the first requests
                        await asyncio.sleep(args.settle)
                        r0, b0 = stats["requests"], stats["bytes"]
                        cpu = await cpu_over(server.pid, args.window)
                        row = {"n": n, "cpu": cpu, "rps": (stats["requests"] - r0) / args.window,
                               "mbps": 8 * (stats["bytes"] - b0) / args.window / 1e6, "errors": stats["errors"]}
                        out["rows"].append(row)
                        print(f"[hls on] N={n}: server {cpu:.1f}% CPU, {row['rps']:.0f} playlist reads/s, "
                              f"{row['mbps']:.1f} Mbit/s of segments, {row['errors']} errors "
                              f"{stats['last_error'] or ''}", flush=True)
                finally:
                    stop.set()
                    await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            server.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--viewers", default="0,50,200", help="HLS viewer counts, comma-separated")
    ap.add_argument("--window", type=float, default=8.0, help="seconds each CPU figure averages over")
    ap.add_argument("--settle", type=float, default=3.0)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=704)
    ap.add_argument("--fps", type=int, default=25)
    ap.add_argument("--bitrate", type=int, default=0)
    args = ap.parse_args(argv)
    args.low_layer, args.stream_max_seconds = False, 150  # what fanout.Server reads
    viewers = sorted({int(v) for v in args.viewers.split(",") if v.strip()})
    with tempfile.TemporaryDirectory(prefix="relay-bench-hls-") as workdir:
        off = asyncio.run(run(args, workdir, False, []))
        on = asyncio.run(run(args, workdir, True, viewers))
    print()
    print(f"== HLS, {args.width}x{args.height} @ {args.fps} fps, one broadcast, {args.window:g} s windows")
    print(f"cutting segments: server {on['base']:.1f}% vs {off['base']:.1f}% CPU with HLS off "
          f"({on['base'] - off['base']:+.1f}% of a core per broadcast, ratio {on['base'] / off['base']:.3f})")
    rows = [r for r in on["rows"] if r["n"] > 0]
    zero = next((r["cpu"] for r in on["rows"] if r["n"] == 0), on["base"])
    for r in rows:
        per = (r["cpu"] - zero) / r["n"]
        print(f"N={r['n']:>4} HLS viewers, no CDN: {r['cpu']:.1f}% CPU, {per:+.3f}% of a core per viewer "
              f"(WebRTC spectator {WEBRTC_PER_SPECTATOR:.2f}%: ratio {per / WEBRTC_PER_SPECTATOR:.2f}); "
              f"{r['mbps']:.1f} Mbit/s served, {r['errors']} errors")
    if rows:
        per = statistics.fmean((r["cpu"] - zero) / r["n"] for r in rows)
        print(f"with a CDN in front, the relay serves each segment once per edge: per-viewer cost -> 0 "
              f"(without one: {per:.3f}% of a core per viewer)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
