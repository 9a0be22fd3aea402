"""Token buckets: the one rate limiter, for host interacts and participants' messages alike.

A bucket holds up to `burst` tokens and refills at `rate` per second on the injected clock; an action
takes one token or is refused with the seconds until one is back (the Retry-After a client is told).
Nothing runs in the background: the refill is computed when a token is asked for.

A bucket several client addresses share (a broadcast's chat) is a `FairShare`: first come first served
would let one address (a hundred sockets behind one NAT) take every token, so while it is contended
each address gets at most its share, max-min fair.
"""

from __future__ import annotations

from .clock import Clock
from .errors import RelayError


class TokenBucket:
    def __init__(self, clock: Clock, rate: float, burst: float) -> None:
        self._clock = clock
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._at = clock.monotonic()

    def available(self) -> float:
        """The tokens in the bucket now (refilled up to this moment)."""
        now = self._clock.monotonic()
        self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate)
        self._at = now
        return self._tokens

    def take(self, reserve: float = 0.0) -> float:
        """Take a token: 0.0 if there was one, else the seconds until there is (nothing is taken).
        ``reserve``: tokens that must stay in the bucket after this one (kept for others)."""
        tokens = self.available()
        if tokens >= 1.0 + reserve:
            self._tokens -= 1.0
            return 0.0
        return (1.0 + reserve - tokens) / self.rate


class FairShare:
    """One bucket (``rate``/s, ``burst``) shared by client addresses, max-min fair.

    The bucket's upper half is first come first served: a message takes a token there whoever sends
    it. The lower half is split between the ``addresses`` in the room: each address's share is
    rate/addresses a second and half the burst/addresses deep (its own bucket), and below half a
    message takes a token only within its address's share. So a flooder holds at most the upper half
    and its own slice: another address's message finds its slice, yet an address alone (or whose
    neighbours are quiet) still uses the whole rate and burst. With a burst of 1 (a rate under 2/s)
    there is no upper half: each address keeps to its share. Past ~lower-half addresses each share is
    one token deep: the guarantee is then the share's rate, not its depth.
    """

    PRUNE_AT = 1000

    def __init__(self, clock: Clock, rate: float, burst: int) -> None:
        self._clock = clock
        self._bucket = TokenBucket(clock, rate, burst)
        self._shares: dict[str, TokenBucket] = {}  # address -> its share's bucket
        self._prune_at = self.PRUNE_AT

    def take(self, address: str, addresses: int) -> float:
        """As TokenBucket.take, for a message from ``address`` among ``addresses`` addresses."""
        count = max(1, addresses)
        lower = max(1, int(self._bucket.burst) // 2)  # whole tokens, so an address alone gets the whole burst
        rate, burst = self._bucket.rate / count, max(1.0, lower / count)
        share = self._shares.get(address)
        if share is None:
            self._prune()
            share = self._shares[address] = TokenBucket(self._clock, rate, burst)
        share.rate, share.burst = rate, burst  # the room changes as sockets come and go
        upper = self._bucket.take(reserve=lower)
        if not upper:
            return 0.0
        if share.available() < 1.0:  # past its share: the lower half is the others'
            return min(upper, share.take())  # whichever comes back first: the upper half or its share
        wait = self._bucket.take()
        if not wait:
            share.take()
        return wait

    def _prune(self) -> None:
        # A full share bucket is what a new address gets: forgetting it changes nothing. Amortized O(1).
        if len(self._shares) > self._prune_at:
            self._shares = {a: b for a, b in self._shares.items() if b.available() < b.burst}
            self._prune_at = max(self.PRUNE_AT, 2 * len(self._shares))


def rate_limited(wait: float, message: str) -> RelayError:
    """429 RATE_LIMITED with Retry-After; retry_after (seconds) also in details, for sockets that relay them."""
    return RelayError("RATE_LIMITED", 429, f"{message}; retry in {wait:.1f} s.", action="Slow down and retry.",
                      details={"retry_after": round(wait, 2)}, retry_after=wait)
