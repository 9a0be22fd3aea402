"""What crosses Redis for participants at other nodes stays within its bound (relay/cluster/audience_link.py)."""

from __future__ import annotations

import json

from relay.cluster.audience_link import ENVELOPE_BYTES, MESSAGE_MAX_BYTES, within_bound


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
