"""Time, injectable: the core asks a Clock, tests hand it a FakeClock they move by hand."""

from __future__ import annotations

import time
from datetime import datetime, timezone


class Clock:
    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()


class FakeClock(Clock):
    def __init__(self, start: float = 1_000.0, wall: float = 1_800_000_000.0) -> None:
        self._mono = start
        self._wall_offset = wall - start

    def monotonic(self) -> float:
        return self._mono

    def time(self) -> float:
        return self._mono + self._wall_offset

    def advance(self, seconds: float) -> None:
        self._mono += seconds


SYSTEM_CLOCK = Clock()


def iso(ts: float | None) -> str | None:
    """Wall-clock seconds -> RFC 3339 UTC, the one timestamp format on the wire."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
