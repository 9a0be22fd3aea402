"""Per-frame render cost of the synthetic world model (not a test).

    python bench/render.py [--frames N] [--fps F]

Renders N consecutive frames (scene time advancing at F fps, the prompt changing every
couple of seconds so transitions and the costlier looks are included) at 1280x704 and
704x1280 on the calling thread, and prints mean / p50 / p95 / max wall-clock milliseconds
per frame, the mean CPU time of the thread (immune to other processes competing for the
cores, which is what inflates max), and how many times faster than real time the mean is.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from relay.worldmodel.scene import SceneRenderer  # noqa: E402

# A tour of looks: every layer of the renderer gets exercised (clouds, sea, trees, dunes,
# snow, rain, lava veins, neon grid, sun and moon) plus hashed unknown words.
PROMPTS = [
    "",
    "sunset ocean",
    "night forest rain",
    "desert fast",
    "snow mountains fly",
    "lava volcano",
    "neon synthwave",
    "foggy hills dawn",
    "a purple cat riding a bicycle",
    "storm ocean night",
]


def bench(width: int, height: int, frames: int, fps: int) -> tuple[list[float], list[float]]:
    renderer = SceneRenderer(width, height)
    renderer.set_prompt(PROMPTS[0])
    per_prompt = max(1, frames // len(PROMPTS))
    wall, cpu = [], []
    for i in range(frames):
        if i and i % per_prompt == 0:
            renderer.set_prompt(PROMPTS[(i // per_prompt) % len(PROMPTS)])
        start, start_cpu = time.perf_counter(), time.thread_time()
        renderer.render(i / fps)
        wall.append((time.perf_counter() - start) * 1000.0)
        cpu.append((time.thread_time() - start_cpu) * 1000.0)
    return wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=500)
    ap.add_argument("--fps", type=int, default=25)
    args = ap.parse_args()
    frames = max(args.frames, 200)
    print(f"{frames} frames each, scene time at {args.fps} fps, one thread")
    print(f"{'size':>10}  {'mean':>6}  {'p50':>6}  {'p95':>6}  {'max':>6}  {'cpu':>6}  (ms)  x real time")
    for w, h in ((1280, 704), (704, 1280)):
        bench(w, h, 20, args.fps)  # warm up: first-touch page faults, numpy dispatch caches
        wall, cpu = bench(w, h, frames, args.fps)
        t = sorted(wall)
        mean = statistics.fmean(t)
        p50 = t[len(t) // 2]
        p95 = t[min(len(t) - 1, int(len(t) * 0.95))]
        budget = 1000.0 / args.fps
        print(
            f"{w:>5}x{h:<4}  {mean:6.2f}  {p50:6.2f}  {p95:6.2f}  {t[-1]:6.2f}  {statistics.fmean(cpu):6.2f}"
            f"        {budget / mean:5.1f}x"
        )


if __name__ == "__main__":
    main()
