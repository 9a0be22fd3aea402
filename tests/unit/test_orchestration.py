"""relay.orchestration: moderation and the four policies, driven by hand with a fake clock."""

from __future__ import annotations

import dataclasses
import json

import pytest

from relay.clock import FakeClock, iso
from relay.config import OrchestrationSettings
from relay.errors import RelayError
from relay.orchestration import Forward, Orchestrator, blocked_words_pattern, clean, normalize

PEOPLE = ("ann", "bob", "cy", "dee", "eve")


def make(mode: str = "host", people=PEOPLE, **settings) -> tuple[Orchestrator, FakeClock]:
    clock = FakeClock()
    orch = Orchestrator(OrchestrationSettings(mode=mode, **settings), clock)
    for pid in people:
        orch.participant_joined(pid, pid.title())
    return orch, clock


def status(result) -> str:
    return result.reason if result.status == "rejected" else result.status


def prompts(forwards) -> list[str]:
    return [f.prompt for f in forwards]


# ---------------------------------------------------------------------------------------- moderation

def test_clean_and_normalize():
    assert clean("  add\n a\tdragon\x00\x85 ") == "add a dragon"
    # NFC (one spelling of "é" for the model and the log); everything else is kept as is
    assert clean("e\u0301t\u00e9 \u2603 \uff46") == "\u00e9t\u00e9 \u2603 \uff46"
    assert normalize("Add  a DRAGON") == normalize("add a dragon") == "add a dragon"
    assert normalize("ｆｕｌｌ width") == "full width"  # NFKC
    assert normalize("dra\u200bgon") == "dragon"  # zero-width characters undone


@pytest.mark.parametrize("text, blocked", [
    ("you ass", True), ("ASS!", True), ("a class act", False), ("assistant", False), ("bass", False),
    ("the sky is ÉTÉ", True), ("étés", False), ("big bad wolf", True), ("big  BAD\nwolf", True),
    ("bad wolfs", False), ("a\u200bss", True),
])
def test_blocked_words_are_whole_words_any_case_unicode(text, blocked):
    pattern = blocked_words_pattern(["ass", "été", "bad wolf"])
    assert bool(pattern.search(normalize(text))) is blocked


def test_moderation_reasons_in_every_mode():
    for mode in ("queue", "vote"):
        orch, clock = make(mode, blocked_words=("ass",), max_prompt_chars=10)
        assert status(orch.submit("ann", "   ")) == "empty"
        assert status(orch.submit("ann", None)) == "empty"
        assert status(orch.submit("ann", "x" * 11)) == "too_long"
        assert status(orch.submit("ann", " " * 1_000_000)) == "too_long"
        assert status(orch.submit("ann", "  " + "x" * 10 + "\n")) != "too_long"  # counted after trimming
        assert status(orch.submit("bob", "kick ASS")) == "blocked_word"
        assert status(orch.submit("bob", "class")) in ("queued", "candidate")
        assert status(orch.submit("nobody", "hi")) == "unknown_participant"


def test_cooldown_counts_only_accepted_inputs():
    orch, clock = make("queue", cooldown_seconds=3, queue_interval_seconds=0.5)
    assert status(orch.submit("ann", "x" * 500)) == "too_long"
    assert status(orch.submit("ann", "one")) == "queued"  # the rejection did not start a cooldown
    orch.tick()
    clock.advance(1)
    result = orch.submit("ann", "two")
    assert (result.reason, result.retry_after) == ("cooldown", pytest.approx(2))
    assert result.as_event() == {"type": "input_result", "status": "rejected", "reason": "cooldown", "retry_after": 2.0}
    clock.advance(2)
    assert status(orch.submit("ann", "two")) == "queued"


def test_cooldown_and_block_outlive_a_dropped_socket():
    # A participant who comes back with its resume token is the same participant_id: leaving
    # must not wipe what moderation knows about it.
    orch, clock = make("queue", cooldown_seconds=10, queue_interval_seconds=0.5)
    assert status(orch.submit("ann", "one")) == "queued"
    orch.block("bob")
    orch.participant_left("ann")
    orch.participant_left("bob")
    orch.participant_joined("ann")
    orch.participant_joined("bob")
    assert status(orch.submit("ann", "two")) == "cooldown"
    assert status(orch.submit("bob", "hello")) == "blocked"
    clock.advance(10)
    assert status(orch.submit("ann", "two")) == "queued"
    assert orch.participants["ann"] == "Ann"  # her name came back with her
    # The host can still block someone who just dropped off; a stranger is still unknown.
    orch.participant_left("cy")
    orch.block("cy")
    orch.participant_joined("cy")
    assert status(orch.submit("cy", "hi")) == "blocked"
    with pytest.raises(RelayError):
        orch.block("zed")


def test_cooldowns_are_forgotten_when_they_run_out_not_kept_forever():
    from relay.orchestration import moderation

    orch, clock = make("host", people=(), cooldown_seconds=5)
    moderator = orch._moderator
    for i in range(5 * moderation.COOLDOWNS_PRUNE_AT):
        moderator.accepted(f"p{i}")
        clock.advance(0.01)  # 100 a second: about 500 are inside one cooldown at any time
    assert len(moderator._last_accepted) <= 2 * moderation.COOLDOWNS_PRUNE_AT
    assert moderator.cooldown_left(f"p{5 * moderation.COOLDOWNS_PRUNE_AT - 1}") > 4.9


def test_duplicates_of_recent_forwards_and_of_waiting_entries():
    orch, clock = make("queue", queue_interval_seconds=1, duplicate_window_seconds=30, cooldown_seconds=0)
    assert status(orch.submit("ann", "Add a dragon")) == "queued"
    assert status(orch.submit("bob", "add a  DRAGON")) == "duplicate"  # waiting
    assert prompts(orch.tick()) == ["Add a dragon"]
    assert status(orch.submit("bob", "add a dragon")) == "duplicate"  # forwarded 0 s ago
    clock.advance(29)
    assert status(orch.submit("bob", "add a dragon")) == "duplicate"
    clock.advance(1)
    assert status(orch.submit("bob", "add a dragon")) == "queued"


def test_duplicate_window_zero_turns_suppression_off():
    orch, clock = make("queue", duplicate_window_seconds=0)
    assert status(orch.submit("ann", "same")) == status(orch.submit("bob", "same")) == "queued"


def test_blocked_participant_loses_their_voice_until_unblocked():
    orch, clock = make("queue", cooldown_seconds=0)
    orch.submit("ann", "mine")
    orch.submit("bob", "his")
    orch.block("ann")
    assert [e["participant_id"] for e in orch.state()["queue"]] == ["bob"]  # their waiting input went
    assert status(orch.submit("ann", "again")) == "blocked"
    assert orch.state(host=True)["participants"][0] == {"participant_id": "ann", "name": "Ann", "blocked": True,
                                                           "invited": False}
    orch.unblock("ann")
    assert status(orch.submit("ann", "again")) == "queued"
    with pytest.raises(RelayError) as caught:
        orch.block("nobody")
    assert caught.value.status == 404


# ---------------------------------------------------------------------------------------------- host

def test_host_mode_rejects_every_participant_input():
    orch, clock = make()
    assert orch.mode == "host"
    assert orch.submit("ann", "hello").as_event() == {"type": "input_result", "status": "rejected",
                                                      "reason": "host_only"}
    assert status(orch.vote("ann", "c1")) == status(orch.raise_hand("ann")) == "wrong_mode"
    clock.advance(100)
    assert orch.tick() == []


# --------------------------------------------------------------------------------------------- queue

def test_queue_is_fifo_one_per_interval_first_at_once():
    orch, clock = make("queue", queue_interval_seconds=5)
    for pid in ("ann", "bob", "cy"):
        assert status(orch.submit(pid, f"from {pid}")) == "queued"
    assert orch.tick() == [Forward("from ann", "ann", "queue")]  # nothing forwarded yet: at once
    clock.advance(4.9)
    assert orch.tick() == []
    clock.advance(0.1)
    assert prompts(orch.tick()) == ["from bob"]
    clock.advance(5)
    assert prompts(orch.tick()) == ["from cy"]
    clock.advance(60)
    assert orch.tick() == []
    assert status(orch.submit("dee", "late")) == "queued"
    assert prompts(orch.tick()) == ["late"]  # the interval has long passed: at once again


def test_queue_one_waiting_entry_per_participant_and_bounded():
    orch, clock = make("queue", queue_max=2, cooldown_seconds=0)
    assert status(orch.submit("ann", "a")) == "queued"
    assert status(orch.submit("ann", "b")) == "already_queued"
    assert status(orch.submit("bob", "b")) == "queued"
    assert status(orch.submit("cy", "c")) == "queue_full"
    orch.tick()
    assert status(orch.submit("ann", "a2")) == "queued"  # hers went out: she may queue again
    assert status(orch.submit("cy", "c")) == "queue_full"


def test_queue_drops_the_entry_of_a_participant_who_leaves():
    orch, clock = make("queue")
    orch.submit("ann", "a")
    orch.submit("bob", "b")
    orch.participant_left("ann")
    assert prompts(orch.tick()) == ["b"]


# ---------------------------------------------------------------------------------------------- vote

def test_vote_window_opens_with_first_input_and_most_votes_win():
    orch, clock = make("vote", vote_window_seconds=15)
    assert orch.state()["window_ends_at"] is None
    a = orch.submit("ann", "a dragon")
    b = orch.submit("bob", "a castle")
    assert (a.status, a.candidate_id, b.candidate_id) == ("candidate", "c1", "c2")
    assert orch.state()["window_ends_at"] == iso(clock.time() + 15)
    for pid in ("cy", "dee", "eve"):
        assert status(orch.vote(pid, "c2")) == "voted"
    assert orch.state()["candidates"] == [{"candidate_id": "c1", "prompt": "a dragon", "votes": 1},
                                          {"candidate_id": "c2", "prompt": "a castle", "votes": 4}]
    clock.advance(14.9)
    assert orch.tick() == []
    clock.advance(0.1)
    assert orch.tick() == [Forward("a castle", "bob", "vote")]
    state = orch.state()
    assert (state["candidates"], state["window_ends_at"]) == ([], None)


def test_vote_tie_goes_to_the_earliest_candidate():
    orch, clock = make("vote")
    orch.submit("ann", "first")
    orch.submit("bob", "second")
    orch.vote("cy", "c2")
    orch.vote("dee", "c1")
    clock.advance(15)
    assert prompts(orch.tick()) == ["first"]


def test_vote_can_change_and_counts_once():
    orch, clock = make("vote")
    orch.submit("ann", "first")
    orch.submit("bob", "second")
    for target in ("c1", "c2", "c2", "c1", "c2"):
        orch.vote("cy", target)
    orch.vote("dee", "c1")
    orch.vote("dee", "c2")
    assert [c["votes"] for c in orch.state()["candidates"]] == [1, 3]
    orch.vote("ann", "c2")  # even an author may move their vote away from their own candidate
    clock.advance(15)
    assert prompts(orch.tick()) == ["second"]


def test_identical_input_becomes_a_vote_for_the_candidate():
    orch, clock = make("vote")
    orch.submit("ann", "Add a dragon")
    orch.submit("bob", "something else")
    result = orch.submit("cy", "  add a DRAGON ")
    assert (result.status, result.candidate_id) == ("candidate", "c1")
    orch.submit("dee", "add a dragon")
    assert [(c["prompt"], c["votes"]) for c in orch.state()["candidates"]] == \
        [("Add a dragon", 3), ("something else", 1)]


def test_vote_bounds_and_one_candidate_per_participant():
    orch, clock = make("vote", max_candidates=2, cooldown_seconds=0)
    orch.submit("ann", "a")
    assert status(orch.submit("ann", "a second idea")) == "already_proposed"
    orch.submit("bob", "b")
    assert status(orch.submit("cy", "c")) == "too_many_candidates"
    assert status(orch.submit("cy", "B")) == "candidate"  # a vote for "b" is still welcome
    assert status(orch.vote("cy", "c9")) == "unknown_candidate"
    assert status(orch.vote("cy", ["c1"])) == "unknown_candidate"


def test_empty_window_forwards_nothing_and_next_window_opens_on_input():
    orch, clock = make("vote", vote_window_seconds=10)
    clock.advance(100)
    assert orch.tick() == []
    orch.submit("ann", "one")
    clock.advance(10)
    assert prompts(orch.tick()) == ["one"]
    assert status(orch.vote("bob", "c1")) == "window_closed"
    clock.advance(50)
    assert orch.tick() == [] and orch.state()["window_ends_at"] is None
    orch.submit("bob", "two")
    assert orch.state()["window_ends_at"] == iso(clock.time() + 10)
    assert status(orch.vote("cy", "c1")) == "window_closed"  # from the previous window
    clock.advance(10)
    assert prompts(orch.tick()) == ["two"]


def test_window_closes_on_time_even_when_the_tick_is_late():
    orch, clock = make("vote", vote_window_seconds=10)
    orch.submit("ann", "one")
    clock.advance(10.2)  # no tick since: the input below belongs to the next window
    assert status(orch.submit("bob", "two")) == "candidate"
    assert prompts(orch.tick()) == ["one"]
    assert [c["prompt"] for c in orch.state()["candidates"]] == ["two"]


def test_votes_of_leavers_drop_and_an_unsupported_window_forwards_nothing():
    orch, clock = make("vote")
    orch.submit("ann", "one")
    orch.vote("bob", "c1")
    orch.participant_left("bob")
    assert orch.state()["candidates"][0]["votes"] == 1
    orch.participant_left("ann")
    assert orch.state()["candidates"] == [{"candidate_id": "c1", "prompt": "one", "votes": 0}]
    clock.advance(15)
    assert orch.tick() == []


def test_blocking_an_author_removes_their_candidate_and_frees_its_votes():
    orch, clock = make("vote", cooldown_seconds=0)
    orch.submit("ann", "rude")
    orch.submit("bob", "nice")
    orch.vote("cy", "c1")
    orch.block("ann")
    assert [c["candidate_id"] for c in orch.state()["candidates"]] == ["c2"]
    assert status(orch.vote("cy", "c2")) == "voted"
    assert status(orch.vote("ann", "c2")) == "blocked"
    clock.advance(15)
    assert orch.tick() == [Forward("nice", "bob", "vote")]


# --------------------------------------------------------------------------------------------- turns

def test_turns_pass_in_order_of_raised_hands():
    orch, clock = make("turns", turn_seconds=30, cooldown_seconds=0)
    assert status(orch.submit("ann", "hi")) == "not_your_turn"
    assert status(orch.raise_hand("ann")) == "raised"  # nobody held it: hers at once
    assert status(orch.raise_hand("bob")) == "raised"
    assert status(orch.raise_hand("bob")) == "already_raised"
    assert status(orch.raise_hand("ann")) == "has_turn"
    orch.raise_hand("cy")
    turn = orch.state()["turn"]
    assert turn == {"holder": {"participant_id": "ann", "name": "Ann"}, "ends_at": iso(clock.time() + 30),
                    "hands": [{"participant_id": "bob", "name": "Bob"}, {"participant_id": "cy", "name": "Cy"}], "hands_count": 2}
    result = orch.submit("ann", " go left ")
    assert (result.status, result.forward) == ("forwarded", Forward("go left", "ann", "turns"))
    assert status(orch.submit("bob", "me")) == "not_your_turn"
    clock.advance(30)
    orch.tick()
    assert orch.state()["turn"]["holder"]["participant_id"] == "bob"
    assert status(orch.submit("ann", "more")) == "not_your_turn"
    assert status(orch.release_turn("bob")) == "released"  # early
    assert orch.state()["turn"]["holder"]["participant_id"] == "cy"
    clock.advance(30)
    orch.tick()
    assert orch.state()["turn"] == {"holder": None, "ends_at": None, "hands": [], "hands_count": 0}


def test_holder_input_still_moderated_with_cooldown_and_duplicates():
    orch, clock = make("turns", cooldown_seconds=3, blocked_words=("darn",))
    orch.raise_hand("ann")
    assert status(orch.submit("ann", "darn it")) == "blocked_word"
    assert status(orch.submit("ann", "jump")) == "forwarded"
    clock.advance(1)
    assert status(orch.submit("ann", "run")) == "cooldown"
    clock.advance(2)
    assert status(orch.submit("ann", "JUMP")) == "duplicate"
    assert orch.tick() == []  # turns forward at submit time, never from tick


def test_holder_who_leaves_or_is_blocked_loses_the_turn_at_once():
    orch, clock = make("turns")
    for pid in ("ann", "bob", "cy"):
        orch.raise_hand(pid)
    orch.participant_left("ann")
    assert orch.state()["turn"]["holder"]["participant_id"] == "bob"
    assert orch.state()["turn"]["ends_at"] == iso(clock.time() + 30)  # a full turn for bob
    orch.block("bob")
    assert orch.state()["turn"]["holder"]["participant_id"] == "cy"
    assert status(orch.raise_hand("bob")) == "blocked"


def test_waiting_participant_may_lower_their_hand():
    orch, clock = make("turns")
    orch.raise_hand("ann")
    orch.raise_hand("bob")
    assert status(orch.release_turn("bob")) == "released"
    assert orch.state()["turn"]["hands"] == []
    assert status(orch.release_turn("cy")) == "not_your_turn"


def test_host_grants_and_revokes():
    orch, clock = make("turns")
    orch.raise_hand("ann")
    orch.raise_hand("bob")
    clock.advance(10)
    orch.grant_turn("bob")
    turn = orch.state()["turn"]
    assert (turn["holder"]["participant_id"], turn["ends_at"], turn["hands"]) == ("bob", iso(clock.time() + 30), [])
    assert status(orch.submit("bob", "mine now")) == "forwarded"
    assert status(orch.submit("ann", "mine?")) == "not_your_turn"
    orch.raise_hand("cy")
    assert orch.revoke_turn() == "bob"
    assert orch.state()["turn"]["holder"]["participant_id"] == "cy"
    assert orch.revoke_turn() == "cy" and orch.revoke_turn() is None
    with pytest.raises(RelayError) as caught:
        orch.grant_turn("nobody")
    assert caught.value.status == 404
    orch.block("dee")
    with pytest.raises(RelayError) as caught:
        orch.grant_turn("dee")
    assert caught.value.status == 422
    orch.configure("queue")
    with pytest.raises(RelayError) as caught:
        orch.revoke_turn()
    assert caught.value.status == 409


# ------------------------------------------------------------------------------------ configure live

def test_configure_validates_and_names_the_field():
    orch, clock = make()
    for values, field in [({"mode": "chaos"}, "mode"), ({"queue_max": 0}, "queue_max"),
                          ({"queue_interval_seconds": "5"}, "queue_interval_seconds"),
                          ({"turn_secnds": 5}, "turn_secnds"), ({"blocked_words": ["ok", " "]}, "blocked_words[1]")]:
        with pytest.raises(RelayError) as caught:
            orch.configure(**values)
        error = caught.value
        assert (error.status, error.code, error.details["field"]) == (422, "INVALID_REQUEST", field)
        assert error.message.startswith(f"{field}: ")
    assert orch.settings == OrchestrationSettings()  # nothing changed


def test_configure_keeps_unnamed_settings_and_applies_live():
    orch, clock = make("queue", cooldown_seconds=0)
    orch.configure(max_prompt_chars=5, blocked_words=["Zap"])
    assert orch.settings.mode == "queue" and orch.settings.blocked_words == ("Zap",)
    assert status(orch.submit("ann", "toolong")) == "too_long"
    assert status(orch.submit("ann", "zap!")) == "blocked_word"
    orch.submit("ann", "ok")
    orch.configure(queue_interval_seconds=1)  # same mode: the queue stays
    assert [e["prompt"] for e in orch.state()["queue"]] == ["ok"]


def test_switching_mode_mid_window_discards_it():
    orch, clock = make("vote")
    orch.submit("ann", "one")
    version = orch.version
    orch.configure("queue")
    assert orch.version > version
    state = orch.state()
    assert (state["mode"], state["candidates"], state["window_ends_at"]) == ("queue", [], None)
    clock.advance(60)
    assert orch.tick() == []
    orch.configure("vote")
    assert status(orch.vote("bob", "c1")) == "window_closed"


def test_switching_settles_a_window_that_already_ran_out():
    orch, clock = make("vote")
    orch.submit("ann", "one")
    clock.advance(15)  # over, but no tick yet
    orch.configure("turns")
    assert prompts(orch.tick()) == ["one"]


def test_switching_away_from_queue_and_turns_clears_them_but_not_moderation():
    orch, clock = make("queue", cooldown_seconds=3)
    orch.submit("ann", "a")
    orch.configure("turns")
    assert orch.state()["queue"] == [] and orch.tick() == []
    orch.raise_hand("ann")
    orch.raise_hand("bob")
    assert status(orch.submit("ann", "b")) == "cooldown"  # still: moderation carries over
    orch.configure("host")
    assert orch.state()["turn"] == {"holder": None, "ends_at": None, "hands": [], "hands_count": 0}
    orch.configure("turns")
    assert orch.state()["turn"]["holder"] is None


# ------------------------------------------------------------------------------------ state, version

def test_state_shape_matches_the_contract():
    orch, clock = make("vote")
    state = orch.state()
    assert set(state) >= {"mode", "settings", "queue", "candidates", "window_ends_at", "turn"}  # the contract, plus lengths
    assert set(state["turn"]) >= {"holder", "ends_at", "hands"}
    assert state["settings"] == {k: v for k, v in dataclasses.asdict(orch.settings).items()
                                 if k not in ("mode", "blocked_words")}
    json.dumps(state)
    host = orch.state(host=True)
    assert host["settings"]["blocked_words"] == [] and len(host["participants"]) == len(PEOPLE)
    orch.submit("ann", "x")
    assert orch.state()["window_ends_at"].endswith("Z")


def test_version_moves_exactly_when_state_changes():
    orch, clock = make("queue", people=(), cooldown_seconds=0)
    v = orch.version
    orch.participant_joined("ann")
    assert orch.version == v  # not shown to participants...
    assert orch.state(host=True)["participants"] == [{"participant_id": "ann", "name": None, "blocked": False,
                                                         "invited": False}]
    hv = orch.host_version
    orch.participant_joined("ann", "  Ann  ")  # ...nor is their name, until they are queued
    assert orch.version == v and orch.host_version > hv
    orch.submit("ann", "x")
    assert orch.version > v
    v = orch.version
    orch.participant_joined("ann", "Annie")
    assert orch.version > v and orch.state()["queue"][0]["name"] == "Annie"
    v = orch.version
    before = orch.state()
    orch.tick()
    assert orch.version > v
    v = orch.version
    clock.advance(1)
    orch.tick()
    assert orch.submit("ann", "x").reason == "duplicate"
    assert orch.version == v and orch.state() != before
    orch.configure(queue_max=50)  # unchanged: no push
    assert orch.version == v


def test_candidate_ids_never_repeat_across_mode_switches():
    orch, clock = make("vote")
    orch.submit("ann", "one")
    orch.configure("host")
    orch.configure("vote")
    assert orch.submit("bob", "two").candidate_id == "c2"
    assert status(orch.vote("cy", "c1")) == "window_closed"


def test_public_state_shows_the_head_of_a_long_queue_and_its_length():
    from relay.orchestration.policies import STATE_LIST_MAX

    orch = Orchestrator(OrchestrationSettings(mode="queue", queue_max=1000, cooldown_seconds=0,
                                              duplicate_window_seconds=0), FakeClock())
    for i in range(STATE_LIST_MAX + 20):
        orch.participant_joined(f"p{i}")
        assert orch.submit(f"p{i}", f"idea {i}").status in ("queued", "forwarded")
    state = orch.state()
    assert len(state["queue"]) == STATE_LIST_MAX
    assert state["queue_length"] >= STATE_LIST_MAX + 19


# ---------------------------------------------------------------------------------- crowds and invites

def test_token_bucket_allows_a_burst_then_the_rate_on_the_clock():
    from relay.ratelimit import TokenBucket
    clock = FakeClock()
    bucket = TokenBucket(clock, rate=2.0, burst=3)
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take() == pytest.approx(0.5)  # refused: one token back in half a second
    clock.advance(0.5)
    assert bucket.take() == 0.0 and bucket.take() > 0
    clock.advance(100)  # refills to the burst, never beyond
    assert [bucket.take() for _ in range(4)].count(0.0) == 3


def test_votes_per_address_cap_counts_an_address_as_at_most_that_many_voters():
    orch, clock = make("vote", people=(), votes_per_address=2, vote_window_seconds=10)
    for i in range(6):
        orch.admit(f"p{i}", address="10.0.0.1" if i < 5 else "10.0.0.2")
    candidate = orch.submit("p0", "a volcano").candidate_id  # proposing is the first vote from .1
    results = [orch.vote(f"p{i}", candidate) for i in range(1, 5)]
    assert [status(r) for r in results] == ["voted", "rate_limited", "rate_limited", "rate_limited"]
    refused = results[1].as_event("vote_result")
    assert refused["code"] == "RATE_LIMITED" and 0 < refused["retry_after"] <= 10
    assert status(orch.vote("p5", candidate)) == "voted"  # another address is not affected
    assert status(orch.submit("p3", "a glacier")) == "rate_limited"  # an input is a vote too
    assert status(orch.vote("p1", candidate)) == "voted"  # already counted: may vote again (or move)
    orch.participant_left("p1")  # a leaving voter's vote goes, and with it the place it held
    assert status(orch.vote("p2", candidate)) == "voted"
    assert orch.state()["candidates"][0]["votes"] == 3
    clock.advance(10)
    assert prompts(orch.tick()) == ["a volcano"]
    assert status(orch.submit("p3", "a glacier")) == "candidate"  # a new window: a new share


def test_invite_only_refuses_the_uninvited_with_invite_required():
    orch, clock = make("queue", people=(), invite_only=True, cooldown_seconds=0)
    orch.admit("guest")
    orch.admit("invited", invited=True)
    refused = orch.submit("guest", "snow")
    assert status(refused) == "invite_required" and refused.as_event()["code"] == "INVITE_REQUIRED"
    assert status(orch.submit("invited", "snow")) == "queued"
    orch.participant_left("invited")
    orch.admit("invited")  # resumed without the invite: still the invited identity
    assert status(orch.submit("invited", "rain")) == "queued"
    assert orch.is_invited("invited") and not orch.is_invited("guest")
    shown = {p["participant_id"]: p["invited"] for p in orch.state(host=True)["participants"]}
    assert shown == {"guest": False, "invited": True}  # the host sees who came by invite
    orch.configure(invite_only=False)
    assert status(orch.submit("guest", "sun")) == "queued"


# ------------------------------------------------------------------------------ shares per address

def crowd(orch: Orchestrator, address: str, n: int) -> list[str]:
    people = [f"{address}#{i}" for i in range(n)]
    for pid in people:
        orch.admit(pid, address=address)
    return people


def test_one_address_cannot_fill_the_queue_but_alone_may():
    settings = dict(queue_max=10, cooldown_seconds=0, duplicate_window_seconds=0)
    orch, _ = make("queue", people=(), **settings)
    flood = crowd(orch, "10.0.0.1", 40)
    assert [status(orch.submit(pid, f"spam {i}")) for i, pid in enumerate(flood)].count("queued") == 10  # alone: all

    orch, _ = make("queue", people=(), **settings)
    flood, [other] = crowd(orch, "10.0.0.1", 40), crowd(orch, "10.0.0.2", 1)
    results = [orch.submit(pid, f"spam {i}") for i, pid in enumerate(flood)]
    assert [status(r) for r in results].count("queued") == 5 + 5 // 2  # the upper half, its share of the lower
    event = next(r for r in results if r.status == "rejected").as_event()
    assert event["reason"] == "rate_limited" and event["code"] == "RATE_LIMITED" and event["retry_after"] == 5.0
    assert status(orch.submit(other, "mine")) == "queued"  # the other address still finds a place
    orch.participant_left(other)  # alone again (its entry goes with it): the flooder may fill the rest
    assert [status(orch.submit(pid, f"late {i}")) for i, pid in enumerate(flood[20:24])] == ["queued"] * 3 + ["queue_full"]


def test_one_address_cannot_fill_the_ballot_but_alone_may():
    orch, clock = make("vote", people=(), max_candidates=10, vote_window_seconds=10, cooldown_seconds=0)
    flood, other = crowd(orch, "10.0.0.1", 20), crowd(orch, "10.0.0.2", 1)
    results = [orch.submit(pid, f"idea {i}") for i, pid in enumerate(flood)]
    assert [status(r) for r in results].count("candidate") == 5 + 5 // 2
    refused = next(r for r in results if r.status == "rejected")
    assert status(refused) == "rate_limited" and 0 < refused.as_event()["retry_after"] <= 10
    assert status(orch.submit(other[0], "my idea")) == "candidate"
    clock.advance(10)
    orch.tick()
    orch.participant_left(other[0])
    results = [orch.submit(pid, f"next {i}") for i, pid in enumerate(flood)]  # alone: the whole ballot
    assert [status(r) for r in results].count("candidate") == 10


def test_turns_go_round_robin_between_addresses_not_to_whoever_raised_first():
    orch, clock = make("turns", people=(), turn_seconds=10, cooldown_seconds=0)
    flood, quiet = crowd(orch, "10.0.0.1", 4), crowd(orch, "10.0.0.2", 2)
    for pid in flood + quiet:  # one address's hands all raised first
        assert status(orch.raise_hand(pid)) == "raised"
    holders = []
    for _ in range(6):
        holders.append(orch.state()["turn"]["holder"]["participant_id"])
        clock.advance(10)
        orch.tick()
    assert holders == [flood[0], quiet[0], flood[1], quiet[1], flood[2], flood[3]]
    assert orch.state()["turn"]["holder"] is None
