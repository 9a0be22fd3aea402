"""Token buckets: the one rate limiter, for host interacts and participants' messages alike.

A bucket holds up to `burst` tokens and refills at `rate` per second on the injected clock; an action
takes one token or is refused with the seconds until one is back (the Retry-After a client is told).
Nothing runs in the background: the refill is computed when a token is asked for.
"""

from __future__ import annotations

from .clock import Clock
from .errors import RelayError


class TokenBucket:
    def __init__(self, clock: Clock, rate: float, burst: int) -> None:
        self._clock = clock
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._at = clock.monotonic()

    def take(self) -> float:
        """Take a token: 0.0 if there was one, else the seconds until there is (nothing is taken)."""
        now = self._clock.monotonic()
        self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.rate


def rate_limited(wait: float, message: str) -> RelayError:
    """429 RATE_LIMITED with Retry-After; retry_after (seconds) also in details, for sockets that relay them."""
    return RelayError("RATE_LIMITED", 429, f"{message}; retry in {wait:.1f} s.", action="Slow down and retry.",
                      details={"retry_after": round(wait, 2)}, retry_after=wait)
