"""FairShare on a hand-moved clock: a flooder, slow speakers and a silent crowd (docs/api.md, chat fairness)."""

from __future__ import annotations

from relay.clock import FakeClock
from relay.orchestration.policies import past_share
from relay.ratelimit import FairShare

SILENT = 1000  # addresses with a socket open that never send


def flood(fair: FairShare, clock: FakeClock, seconds: int, speakers: dict[str, int], present: int) -> dict[str, int]:
    """A flooder asking every millisecond; each speaker (address -> every how many seconds) asking on its
    seconds. Returns the messages each address got through."""
    sent = dict.fromkeys(["flooder", *speakers], 0)
    for ms in range(seconds * 1000):
        for address, every in speakers.items():
            if ms % (every * 1000) == 0:
                sent[address] += fair.take(address, present) == 0.0
        sent["flooder"] += fair.take("flooder", present) == 0.0
        clock.advance(0.001)
    return sent


def test_a_flooder_among_a_thousand_silent_addresses_leaves_a_speaker_every_message():
    clock = FakeClock()
    fair = FairShare(clock, 20.0, 20)
    flood(fair, clock, 5, {}, SILENT + 2)  # the flooder has the room to itself first
    sent = flood(fair, clock, 60, {"B": 1, "C": 7}, SILENT + 3)  # B once a second; C now and then
    assert sent["B"] == 60 and sent["C"] == 9  # every one, the first included
    assert 20 * 60 - 69 - 20 <= sent["flooder"] <= 20 * 60 + 20  # it keeps the rest of the rate, no more


def test_an_address_alone_uses_the_whole_burst_then_the_whole_rate():
    clock = FakeClock()
    fair = FairShare(clock, 20.0, 20)
    assert sum(fair.take("flooder", 1) == 0.0 for _ in range(100)) == 20  # the whole burst at once
    assert flood(fair, clock, 10, {}, 1)["flooder"] >= 20 * 10 - 1  # then the whole rate


def test_a_flooder_alone_among_silent_sockets_still_gets_the_whole_rate():
    clock = FakeClock()
    fair = FairShare(clock, 20.0, 20)
    assert flood(fair, clock, 10, {}, SILENT + 1)["flooder"] >= 20 * 10 - 1  # no one else speaks: it is all its


def test_two_flooders_and_a_speaker_each_get_a_share():
    clock = FakeClock()
    fair = FairShare(clock, 20.0, 20)
    sent = dict.fromkeys(["A", "B", "speaker"], 0)
    for ms in range(30_000):
        if ms % 500 == 0:  # 2 a second: within a quarter of the rate
            sent["speaker"] += fair.take("speaker", SILENT + 3) == 0.0
        for address in ("A", "B"):
            sent[address] += fair.take(address, SILENT + 3) == 0.0
        clock.advance(0.001)
    assert sent["speaker"] == 60
    assert min(sent["A"], sent["B"]) >= 20 * 30 // 4  # at least its guaranteed rate/(senders+1)


def test_an_idle_address_is_forgotten():
    clock = FakeClock()
    fair = FairShare(clock, 20.0, 20)
    for i in range(SILENT):
        fair.take(f"198.51.100.{i}", SILENT)
    clock.advance(1.01)  # burst/rate: each share has refilled, so it is what a newcomer gets
    fair.take("203.0.113.7", SILENT)
    assert len(fair._senders) == 1


def test_a_flooder_among_a_thousand_silent_addresses_leaves_places_in_a_list():
    # past_share divides a list's lower half by the addresses present, not those sending: a place, unlike a
    # token, stays held, so the reservation must exist before anyone else speaks. Many silent addresses only
    # shrink the flooder's slice of it; the rest of the lower half stays free for whoever comes.
    capacity, present = 20, SILENT + 2
    held = 0
    while not past_share(held, held, capacity, present):
        held += 1
    assert held == capacity // 2 + 1  # the upper half and a share of one place
    assert not past_share(0, held, capacity, present)  # another address still takes a place
    assert capacity - held == 9
