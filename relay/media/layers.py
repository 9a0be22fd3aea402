"""Which quality layer one spectator gets, from its receiver's bandwidth estimate (REMB).

The estimate a receiver sends (aiortc's and libwebrtc's AIMD estimators alike) is clamped to
about 1.5x what it currently receives, and drops to ~0.85x the received rate when it sees the
link congest. So it can show that the main layer does not fit (a sustained estimate well
under what that layer sends), but it can never show that the main layer would fit while the
spectator receives the lower one. Going down therefore waits for a sustained low estimate;
going up is a probe: after a while with no sign of congestion on the lower layer, try the main
layer again. A probe that fails (down again soon after) doubles the wait before the next one,
so a link that cannot take the main layer costs a brief try now and then, never flapping.
"""

from __future__ import annotations

MAIN, LOW = 0, 1

DOWN_RATIO = 0.8  # estimate under this share of the main layer's sending rate means it does not fit
DOWN_AFTER = 2.0  # seconds that must hold before moving down (a single congested moment is not enough)
HEADROOM = 1.2  # estimate at least this share of the low layer's rate: that layer flows uncongested
UP_AFTER = 5.0  # seconds of headroom before the first probe of the main layer
UP_AFTER_MAX = 80.0  # the longest wait between probes after repeated failures
PROBE_FAILED_WITHIN = 15.0  # down again this soon after going up: the probe failed


class LayerPolicy:
    """Pure decision logic, fed with estimates and the layers' measured rates (bits/s)."""

    def __init__(self) -> None:
        self.layer = MAIN
        self.switches = 0
        self._since: float | None = None  # when the condition for leaving the current layer began
        self._up_after = UP_AFTER
        self._went_up_at = -1e9

    def update(self, estimate: float, main_rate: float | None, low_rate: float | None, now: float) -> int:
        if self.layer == MAIN:
            leave = bool(main_rate) and estimate < DOWN_RATIO * main_rate
            wait = DOWN_AFTER
        else:
            leave = low_rate is not None and estimate >= HEADROOM * low_rate
            wait = self._up_after
        if not leave:
            self._since = None
            return self.layer
        if self._since is None:
            self._since = now
        if now - self._since < wait:
            return self.layer
        self._since = None
        self.switches += 1
        if self.layer == MAIN:
            failed_probe = now - self._went_up_at < PROBE_FAILED_WITHIN
            self._up_after = min(self._up_after * 2, UP_AFTER_MAX) if failed_probe else UP_AFTER
            self.layer = LOW
        else:
            self._went_up_at = now
            self.layer = MAIN
        return self.layer
