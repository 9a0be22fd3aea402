"""What crosses Redis for participants at other nodes stays within its bound (relay/cluster/audience_link.py)."""

from __future__ import annotations

import json
from collections import Counter
from types import SimpleNamespace

import pytest

from relay.cluster.audience_link import (ENVELOPE_BYTES, MESSAGE_MAX_BYTES, AudienceLink, inbox,
                                         orchestration_within_bound, within_bound)
from relay.config import Settings
from relay.errors import RelayError

NODE = "n" * 64  # the longest node id config allows: the widest envelope
BROADCAST = "b" * 16  # secrets.token_urlsafe(12)


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


def _origin() -> AudienceLink:
    """An origin's link, not started: what it would publish is read from its outbox, as it would be sent."""
    link = AudienceLink(Settings(), SimpleNamespace(node_id=NODE), sessions=None)
    link._nodes_of[BROADCAST] = Counter({"edge": 1})
    return link


def _sent(link: AudienceLink) -> list[str]:
    messages = []
    while not link._outbox.empty():
        channel, payload, _, _ = link._outbox.get_nowait()
        assert channel == inbox("edge")
        messages.append(payload)
    return messages


def _orchestration(queue: list[dict]) -> dict:
    return {"type": "orchestration", "mode": "queue", "queue": queue, "queue_length": len(queue),
            "candidates": [], "turn": {"hands_count": 3}}


@pytest.mark.parametrize("queue", [
    _queued(400, "😀" * 40),  # once cut by its own size to ~64 KB, ~76 KB sent: each \ of \uXXXX escaped again
    # " is \" in the event's JSON, \\\" once the event is a string in the push
    [{"participant_id": f"p{i}", "name": "ana", "prompt": '"quoted" ' * 10} for i in range(600)],
    _queued(50, "😀" * 200),  # the defaults' worst: a 50-slot queue of 200-emoji prompts, ~150 KB
], ids=["emoji-names", "quotes", "long-emoji-prompts"])
def test_a_cut_orchestration_push_fits_as_it_is_sent_and_keeps_the_queue_head_and_counts(queue):
    link = _origin()
    event = _orchestration(queue)
    link._push(BROADCAST, json.dumps(event))
    [payload] = _sent(link)
    item = len(json.dumps(json.dumps(queue[0])))  # an item as sent: what one cut leaves out
    assert MESSAGE_MAX_BYTES - ENVELOPE_BYTES - item < len(payload.encode()) <= MESSAGE_MAX_BYTES  # no more cut
    message = json.loads(payload)  # what the edge fans out
    assert message["op"] == "push" and message["broadcast_id"] == BROADCAST and message["from"] == NODE
    pushed = json.loads(message["event"])
    assert 0 < len(pushed["queue"]) < len(queue) and pushed["queue"] == queue[:len(pushed["queue"])]
    assert pushed["queue_length"] == len(queue) and pushed["turn"] == {"hands_count": 3}
    assert not link._owed


@pytest.mark.parametrize("kilobytes", [56, 58, 60, 62, 63.5, 64])
def test_a_push_between_56_and_64_kb_before_escaping_fits_once_escaped(kilobytes):
    queue = _queued(1, '"' * 100)
    while len(json.dumps(_orchestration(queue))) < kilobytes * 1024 - 300:  # quotes: their JSON doubles again
        queue = _queued(len(queue) + 1, '"' * 100)
    link = _origin()
    link._push(BROADCAST, json.dumps(_orchestration(queue)))
    [payload] = _sent(link)
    assert len(payload) <= MESSAGE_MAX_BYTES
    pushed = json.loads(json.loads(payload)["event"])
    assert pushed["queue"] == queue[:len(pushed["queue"])] and pushed["queue_length"] == len(queue)


def test_a_push_that_cannot_be_cut_to_fit_is_not_sent_and_its_node_is_owed_a_stale():
    link = _origin()
    for event in ({**_orchestration([]), "prompt": "😀" * 5000},  # nothing to cut; 12 chars an emoji, 14 sent
                  {"type": "prompt_applied", "prompt": '"' * 20000}):  # no cut for this kind: the snapshot has it
        link._push(BROADCAST, json.dumps(event))
        assert _sent(link) == [] and link._owed == {"edge"}
    link._tell_stale()  # the next sweep: the edge syncs, its sockets get a hello built from a bounded snapshot
    assert [json.loads(payload)["op"] for payload in _sent(link)] == ["stale"] and not link._owed


def test_a_reply_fits_as_it_is_sent_and_one_that_cannot_is_state_too_large():
    link = _origin()
    queue = _queued(50, "😀" * 200)
    hello = {**_hello(500, '"雪"' * 300), "orchestration": _orchestration(queue)}
    link._reply("edge", {"id": 123456789}, within_bound(hello))
    [payload] = _sent(link)
    assert MESSAGE_MAX_BYTES - 1024 - 6100 < len(payload) <= MESSAGE_MAX_BYTES
    reply = json.loads(payload)["reply"]
    assert reply["orchestration"]["queue"] == queue[:len(reply["orchestration"]["queue"])]
    link._reply("edge", {"id": 7}, hello)  # unbounded: an error the edge reads, not a message it drops
    [payload] = _sent(link)
    error = json.loads(payload)["error"]
    assert (error["code"], error["status"], error["retry_after"]) == ("STATE_TOO_LARGE", 503, 10)


async def test_a_request_over_the_bound_is_refused_before_it_crosses():
    link = AudienceLink(Settings(), SimpleNamespace(node_id=NODE), sessions=None)
    link.listening = True
    with pytest.raises(RelayError) as caught:
        await link.request("origin", {"op": "message", "message": {"text": '"' * MESSAGE_MAX_BYTES}})
    assert caught.value.status == 413 and not link._pending
