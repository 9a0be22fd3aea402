"""Token buckets: the one rate limiter, for host interacts and participants' messages alike.

A bucket holds up to `burst` tokens and refills at `rate` per second on the injected clock; an action
takes one token or is refused with the seconds until one is back (the Retry-After a client is told).
Nothing runs in the background: the refill is computed when a token is asked for.

A bucket several client addresses share (a broadcast's chat) is a `FairShare`: first come first served
would let one address (a hundred sockets behind one NAT) take every token, so while it is contended
each address that is sending gets at most its share, max-min fair.
"""

from __future__ import annotations

from collections import OrderedDict

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
    """One bucket (``rate``/s, ``burst``) shared by client addresses, max-min fair between those sending.

    The bucket's upper half is first come first served: a message takes a token there whoever sends
    it. The lower half is split between the addresses *sending*: those with a message (sent or
    refused) in the last burst/rate seconds, this one included. With n of them, each address's share
    is rate/(n+1) a second and half the burst/(n+1) deep (its own bucket), and below half a message
    takes a token only within its address's share. The extra slot is kept for whoever speaks next:
    the shares together refill slower than the bucket, so the lower half grows back under any flood
    and a newcomer finds tokens there. Silent sockets take no slot: a flooder among a thousand quiet
    viewers still leaves someone who speaks up rate/3 a second. An address alone in the room (no
    other address has a socket open) has no slot kept for anyone: it uses the whole rate and burst;
    a flooder always gets the whole rate others leave, through the upper half. With a burst of 1 (a
    rate under 2/s) there is no upper half: each address keeps to its share.
    """

    def __init__(self, clock: Clock, rate: float, burst: int) -> None:
        self._clock = clock
        self._bucket = TokenBucket(clock, rate, burst)
        self._lower = max(1, int(burst) // 2)  # whole tokens, so an address alone gets the whole burst
        # A share refills within lower/rate seconds: after this long idle it is full, what a new
        # sender gets, so forgetting it changes nothing (and frees it).
        self._idle_after = burst / rate
        # address -> (its share, its last message), the longest idle first
        self._senders: OrderedDict[str, tuple[TokenBucket, float]] = OrderedDict()

    def take(self, address: str, addresses: int) -> float:
        """As TokenBucket.take, for a message from ``address``; ``addresses``: how many have a socket open."""
        now = self._clock.monotonic()
        sender = self._senders.pop(address, None)
        self._forget(now - self._idle_after)
        slots = len(self._senders) + 1  # the senders, this one included
        if addresses > slots:  # someone else could speak next: keep a slot for them
            slots += 1
        rate, burst = self._bucket.rate / slots, max(1.0, self._lower / slots)
        share = sender[0] if sender is not None else TokenBucket(self._clock, rate, burst)
        share.rate, share.burst = rate, burst  # the senders change as people speak up and fall quiet
        self._senders[address] = (share, now)
        upper = self._bucket.take(reserve=self._lower)
        if not upper:
            return 0.0
        if share.available() < 1.0:  # past its share: the lower half is the others'
            return min(upper, share.take())  # whichever comes back first: the upper half or its share
        wait = self._bucket.take()
        if not wait:
            share.take()
        return wait

    def _forget(self, before: float) -> None:
        # Oldest first, so each call drops only what it finds idle: amortized O(1) per message.
        while self._senders:
            address, (_, at) = next(iter(self._senders.items()))
            if at > before:
                return
            del self._senders[address]


def rate_limited(wait: float, message: str) -> RelayError:
    """429 RATE_LIMITED with Retry-After; retry_after (seconds) also in details, for sockets that relay them."""
    return RelayError("RATE_LIMITED", 429, f"{message}; retry in {wait:.1f} s.", action="Slow down and retry.",
                      details={"retry_after": round(wait, 2)}, retry_after=wait)
