"""Chat and reactions (relay/orchestration/chat.py, through the Audience): moderation, rates, history,
coalesced reactions, the host's clear and off switch. Fake clock, no sockets."""

from __future__ import annotations

import json

import pytest

from relay.audience import Audience
from relay.clock import FakeClock
from relay.config import Settings
from relay.errors import RelayError


def make_audience(**chat) -> tuple[Audience, FakeClock, list[dict]]:
    clock = FakeClock()
    settings = Settings.from_dict({"chat": chat, "orchestration": {"blocked_words": ["darn"], "mode": "queue"}})
    audience = Audience("b1", settings, clock, live=lambda: True)
    recorded: list[dict] = []
    audience.record_event = recorded.append
    return audience, clock, recorded


def drain(channel) -> list[dict]:
    events = []
    while not channel.queue.empty():
        events.append(json.loads(channel.queue.get_nowait()))
    return events


async def test_a_message_reaches_everyone_and_is_recorded():
    audience, _, recorded = make_audience()
    a, b = audience.open_channel(), audience.open_channel()
    await audience.participant_message(a, {"type": "hello", "name": "ana"})
    reply = await audience.participant_message(a, {"type": "chat", "text": "  hello\tthere  "})
    assert reply["status"] == "sent"
    [event] = [e for e in drain(b) if e["type"] == "chat"]
    assert event["text"] == "hello there" and event["name"] == "ana" and event["message_id"] == reply["message_id"]
    assert recorded == [event]


@pytest.mark.parametrize("text, reason", [
    ("x" * 201, "too_long"), ("x" * 5000, "too_long"), ("bell\x07", "invalid_text"), ("   ", "empty"),
    (42, "empty"), ("oh DARN it", "blocked_word"), ("\ud800", "invalid_text"),
])
async def test_bad_messages_are_refused_and_reach_nobody(text, reason):
    audience, _, recorded = make_audience()
    a, b = audience.open_channel(), audience.open_channel()
    reply = await audience.participant_message(a, {"type": "chat", "text": text})
    assert reply["status"] == "rejected" and reply["reason"] == reason and reply["message"]
    assert not [e for e in drain(b) if e["type"] == "chat"] and not recorded


async def test_a_blocked_participant_cannot_chat_or_react():
    audience, _, _ = make_audience()
    a = audience.open_channel()
    audience.block(a.participant_id)
    assert (await audience.participant_message(a, {"type": "chat", "text": "hi"}))["reason"] == "blocked"
    assert (await audience.participant_message(a, {"type": "reaction", "emoji": "🔥"}))["reason"] == "blocked"


async def test_chat_has_its_own_rate_and_leaves_the_inputs_tokens_alone():
    audience, clock, _ = make_audience(messages_per_second=1, burst=2)
    a = audience.open_channel()
    replies = [await audience.participant_message(a, {"type": "chat", "text": f"m{i}"}) for i in range(3)]
    assert [r["status"] for r in replies] == ["sent", "sent", "rejected"]
    assert replies[2]["code"] == "RATE_LIMITED" and replies[2]["retry_after"] > 0
    assert replies[2]["type"] == "chat_result"
    # Inputs still have their whole burst: chat took none of their tokens.
    result = await audience.participant_message(a, {"type": "input", "prompt": "make it snow"})
    assert result["status"] == "queued"
    clock.advance(1.0)
    assert (await audience.participant_message(a, {"type": "chat", "text": "again"}))["status"] == "sent"


async def test_reactions_are_counted_once_per_interval():
    audience, clock, recorded = make_audience(messages_per_second=100, burst=100, reaction_interval_seconds=1)
    channels = [audience.open_channel() for _ in range(5)]
    for channel in channels:
        for emoji in ("🔥", "🔥", "👍"):
            assert (await audience.participant_message(channel, {"type": "reaction", "emoji": emoji}))["status"] == "sent"
    await audience.tick()
    assert not [e for e in drain(channels[0]) if e["type"] == "reactions"]  # the interval has not passed
    clock.advance(1.0)
    await audience.tick()
    await audience.tick()
    [event] = [e for e in drain(channels[0]) if e["type"] == "reactions"]
    assert event["counts"] == {"🔥": 10, "👍": 5}
    assert recorded == [event]


async def test_an_unknown_reaction_is_refused_with_the_ones_offered():
    audience, _, _ = make_audience()
    a = audience.open_channel()
    reply = await audience.participant_message(a, {"type": "reaction", "emoji": "💩"})
    assert reply["reason"] == "unknown_reaction" and "🔥" in reply["reactions"]


async def test_history_is_bounded_and_cleared_messages_leave_it():
    audience, _, recorded = make_audience(history=3, messages_per_second=100, burst=100)
    a, b = audience.open_channel(), audience.open_channel()
    ids = [(await audience.participant_message(a, {"type": "chat", "text": f"m{i}"}))["message_id"] for i in range(5)]
    assert [m["text"] for m in audience.chat.state()["history"]] == ["m2", "m3", "m4"]
    drain(b)
    audience.clear_chat(ids[3])
    assert [m["text"] for m in audience.chat.state()["history"]] == ["m2", "m4"]
    assert drain(b) == [{"type": "chat_cleared", "message_id": ids[3]}]
    assert recorded[-1] == {"type": "chat_cleared", "message_id": ids[3]}
    with pytest.raises(RelayError) as err:
        audience.clear_chat(ids[0])  # long gone from the history
    assert err.value.status == 404


async def test_chat_off_refuses_with_a_clear_reason_and_tells_everyone():
    audience, _, _ = make_audience()
    a = audience.open_channel()
    audience.set_chat(False)
    audience.set_chat(False)  # no change, no second event
    assert drain(a) == [{"type": "chat_state", "enabled": False}]
    reply = await audience.participant_message(a, {"type": "chat", "text": "hi"})
    assert reply["reason"] == "chat_off" and reply["message"] == "The host has turned chat off."
    assert (await audience.participant_message(a, {"type": "reaction", "emoji": "🔥"}))["reason"] == "chat_off"
    audience.set_chat(True)
    assert (await audience.participant_message(a, {"type": "chat", "text": "hi"}))["status"] == "sent"


async def test_slow_mode_makes_each_participant_wait_between_messages():
    audience, clock, _ = make_audience(cooldown_seconds=10, messages_per_second=100, burst=100)
    a, b = audience.open_channel(), audience.open_channel()
    assert (await audience.participant_message(a, {"type": "chat", "text": "one"}))["status"] == "sent"
    refused = await audience.participant_message(a, {"type": "chat", "text": "two"})
    assert refused["reason"] == "cooldown" and 9 < refused["retry_after"] <= 10
    assert (await audience.participant_message(b, {"type": "chat", "text": "mine"}))["status"] == "sent"  # per person
    # A refused message starts no wait; reactions are not slowed.
    assert (await audience.participant_message(a, {"type": "reaction", "emoji": "🔥"}))["status"] == "sent"
    clock.advance(10)
    assert (await audience.participant_message(a, {"type": "chat", "text": "two"}))["status"] == "sent"


async def test_the_broadcast_relays_a_bounded_number_of_messages_whatever_the_crowd():
    audience, clock, _ = make_audience(broadcast_messages_per_second=5)
    channels = [audience.open_channel() for _ in range(20)]
    replies = [await audience.participant_message(c, {"type": "chat", "text": "hi"}) for c in channels]
    assert [r["status"] for r in replies].count("sent") == 5
    busy = [r for r in replies if r["status"] == "rejected"]
    assert {r["reason"] for r in busy} == {"chat_busy"} and busy[0]["code"] == "RATE_LIMITED" and busy[0]["retry_after"] > 0
    assert not any(c.flooded or c.refused for c in channels)  # the crowd's limit is no one's flood
    assert sum(1 for e in drain(channels[0]) if e["type"] == "chat") == 5
    clock.advance(1.0)
    assert (await audience.participant_message(channels[-1], {"type": "chat", "text": "now"}))["status"] == "sent"


async def test_one_address_flooding_the_broadcast_rate_leaves_another_address_its_share():
    # A classroom's hundred sockets behind one NAT, each at its own rate, against one other address.
    audience, clock, _ = make_audience(broadcast_messages_per_second=20, messages_per_second=100, burst=100)
    flood = [audience.open_channel(address="203.0.113.7") for _ in range(100)]
    other, reader = audience.open_channel(address="198.51.100.1"), audience.open_channel(address="198.51.100.2")
    for tick in range(30):  # three seconds of flooding: every socket, every tenth of a second
        for c in flood:
            await audience.participant_message(c, {"type": "chat", "text": "spam"})
        if tick % 2:  # 5 a second: within its share, 20/s among three addresses
            reply = await audience.participant_message(other, {"type": "chat", "text": "still here"})
            assert reply["status"] == "sent"
        clock.advance(0.1)
    said = [e for e in drain(reader) if e["type"] == "chat"]
    assert sum(e["text"] == "still here" for e in said) == 15
    assert len(said) <= 20 * 3 + 20  # the broadcast's cap (its rate and one burst) still holds
    assert sum(e["text"] == "spam" for e in said) >= 20  # the flooder keeps what the others leave


async def test_an_address_alone_uses_the_whole_broadcast_rate():
    audience, clock, _ = make_audience(broadcast_messages_per_second=20, messages_per_second=100, burst=100)
    classroom = [audience.open_channel(address="203.0.113.7") for _ in range(40)]
    reader = audience.open_channel(address="203.0.113.7")
    for second in range(3):
        replies = [await audience.participant_message(c, {"type": "chat", "text": "hi"}) for c in classroom]
        assert [r["status"] for r in replies].count("sent") == 20  # the whole burst, then the whole rate
        clock.advance(1.0)
    assert sum(e["type"] == "chat" for e in drain(reader)) == 60
