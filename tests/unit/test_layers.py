"""The per-spectator layer policy, on a fake clock: down after a sustained low estimate, up by
probing after sustained headroom, and no flapping."""

from __future__ import annotations

from relay.media.layers import DOWN_AFTER, LOW, MAIN, UP_AFTER, UP_AFTER_MAX, LayerPolicy

MAIN_RATE, LOW_RATE = 2_000_000, 500_000


def feed(policy: LayerPolicy, estimate: float, start: float, seconds: float, step: float = 0.5) -> float:
    """REMBs every `step` s from `start` for `seconds`; returns the time after the last."""
    t = start
    while t < start + seconds:
        policy.update(estimate, MAIN_RATE, LOW_RATE, t)
        t += step
    return t


def test_a_healthy_estimate_stays_on_the_main_layer():
    policy = LayerPolicy()
    feed(policy, 2.5 * MAIN_RATE, 0, 60)
    assert policy.layer == MAIN and policy.switches == 0


def test_down_only_after_a_sustained_low_estimate():
    policy = LayerPolicy()
    # Short congested moments, each followed by recovery, never move the spectator.
    t = 0.0
    for _ in range(10):
        t = feed(policy, 0.5 * MAIN_RATE, t, DOWN_AFTER - 0.5)
        t = feed(policy, 1.2 * MAIN_RATE, t, 1)
    assert policy.layer == MAIN
    assert policy.update(0.5 * MAIN_RATE, MAIN_RATE, LOW_RATE, t) == MAIN
    assert policy.update(0.5 * MAIN_RATE, MAIN_RATE, LOW_RATE, t + DOWN_AFTER) == LOW


def test_no_decision_before_the_main_rate_is_known():
    policy = LayerPolicy()
    for t in range(10):
        assert policy.update(1000, None, None, t) == MAIN


def test_up_after_sustained_headroom_on_the_low_layer():
    policy = LayerPolicy()
    t = feed(policy, 0.3 * MAIN_RATE, 0, DOWN_AFTER + 0.5)
    assert policy.layer == LOW
    # The estimate is capped near 1.5x what the spectator receives: headroom on the low layer.
    t = feed(policy, 1.4 * LOW_RATE, t, UP_AFTER - 0.5)
    assert policy.layer == LOW
    t = feed(policy, 1.4 * LOW_RATE, t, 1)
    assert policy.layer == MAIN
    # Congested even on the low layer: stays low.
    policy2 = LayerPolicy()
    t = feed(policy2, 0.2 * MAIN_RATE, 0, DOWN_AFTER + 0.5)
    feed(policy2, 0.9 * LOW_RATE, t, 60)
    assert policy2.layer == LOW and policy2.switches == 1


def test_a_link_that_cannot_take_the_main_layer_is_probed_ever_more_rarely():
    policy = LayerPolicy()
    ups = []
    t = 0.0
    while t < 600:
        before = policy.layer
        # The truth of a weak link: headroom on the low layer, too little for the main one.
        estimate = 1.4 * LOW_RATE if policy.layer == LOW else 0.4 * MAIN_RATE
        policy.update(estimate, MAIN_RATE, LOW_RATE, t)
        if before == LOW and policy.layer == MAIN:
            ups.append(t)
        t += 0.5
    gaps = [b - a for a, b in zip(ups, ups[1:])]
    assert gaps == sorted(gaps)  # each failed probe waits longer
    assert max(gaps) <= UP_AFTER_MAX + DOWN_AFTER + 1
    assert len(ups) <= 12  # in 10 minutes, not one flap every few seconds
    assert sum(1 for u in ups if u > 300) <= 4


def test_a_probe_that_holds_resets_the_wait():
    policy = LayerPolicy()
    t = 0.0
    for _ in range(3):  # three failed probes: the wait grows
        t = feed(policy, 0.3 * MAIN_RATE, t, DOWN_AFTER + 0.5)
        t = feed(policy, 1.4 * LOW_RATE, t, 200) if policy.layer == LOW else t
    assert policy._up_after > UP_AFTER
    # The link recovered: the main layer holds for a long while, then a new congestion episode.
    t = feed(policy, 1.4 * MAIN_RATE, t, UP_AFTER_MAX + 40)
    assert policy.layer == MAIN
    t = feed(policy, 0.3 * MAIN_RATE, t, DOWN_AFTER + 0.5)
    assert policy.layer == LOW and policy._up_after == UP_AFTER
