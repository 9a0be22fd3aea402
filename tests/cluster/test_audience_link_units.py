"""What crosses Redis for participants at other nodes stays within its bound (relay/cluster/audience_link.py)."""

from __future__ import annotations

import json

import pytest

from relay.cluster.audience_link import ENVELOPE_BYTES, MESSAGE_MAX_BYTES, orchestration_within_bound, within_bound
from relay.errors import RelayError


def _hello(messages: int, text: str) -> dict:
    history = [{"type": "chat", "message_id": f"m{i}", "participant_id": "p" * 32, "name": "ana", "text": text}
               for i in range(messages)]
    return {"type": "hello", "participant_id": "p" * 32, "orchestration": {"mode": "queue"},
            "chat": {"enabled": True, "reactions": ["👍"], "max_chars": 1000, "history": history}}


def test_a_hello_with_a_long_chat_history_keeps_its_newest_messages_within_the_bound():
    hello = _hello(500, "雪" * 1000)  # the largest history config allows: ~3 MB as JSON (\\u escapes)
    bounded = within_bound(hello)
    size = len(json.dumps(bounded))
    assert MESSAGE_MAX_BYTES - ENVELOPE_BYTES - 6100 < size <= MESSAGE_MAX_BYTES - ENVELOPE_BYTES
    kept = bounded["chat"]["history"]
    assert kept and kept == hello["chat"]["history"][-len(kept):]  # the newest, in order
    assert bounded["orchestration"] == hello["orchestration"] and len(hello["chat"]["history"]) == 500


def test_a_hello_within_the_bound_is_unchanged():
    hello = _hello(50, "a calm sea")
    assert within_bound(hello) is hello
    assert within_bound({"type": "hello", "chat": None}) == {"type": "hello", "chat": None}


def _queued(n: int, prompt: str) -> list[dict]:
    return [{"participant_id": f"p{i}", "name": "😀" * 40, "prompt": prompt} for i in range(n)]


def test_a_hello_with_a_queue_of_emoji_prompts_keeps_the_queue_head_and_its_length_within_the_bound():
    queue = _queued(50, "😀" * 200)  # 12 JSON chars an emoji: ~147 KB of orchestration
    hello = {**_hello(50, "雪" * 100), "orchestration": {"mode": "queue", "queue": queue, "queue_length": 50,
                                                         "candidates": []}}
    bounded = within_bound(hello)
    assert len(json.dumps(bounded)) <= MESSAGE_MAX_BYTES - ENVELOPE_BYTES
    kept = bounded["orchestration"]["queue"]
    assert kept and kept == queue[:len(kept)] and bounded["orchestration"]["queue_length"] == 50
    assert bounded["chat"]["history"] == []  # the chat went first
    assert len(hello["orchestration"]["queue"]) == 50  # the broadcast's own state is not touched


def test_an_orchestration_push_of_long_candidates_is_cut_to_fit_and_an_unfittable_state_is_an_error():
    candidates = [{"candidate_id": f"c{i}", "prompt": "😀" * 2000, "votes": i} for i in range(10)]
    event = {"type": "orchestration", "mode": "vote", "queue": [], "queue_length": 0, "candidates": candidates}
    bounded = orchestration_within_bound(event)
    assert len(json.dumps(bounded)) <= MESSAGE_MAX_BYTES - ENVELOPE_BYTES
    assert bounded["candidates"] == candidates[:len(bounded["candidates"])] and bounded["candidates"]
    with pytest.raises(RelayError) as caught:  # nothing left to cut: an error the edge can read, not a drop
        within_bound({"type": "hello", "prompt": "😀" * 6000, "orchestration": {"queue": []}})
    assert caught.value.code == "STATE_TOO_LARGE" and caught.value.status == 503
    assert caught.value.headers() == {"Retry-After": "10"}  # as every 503
