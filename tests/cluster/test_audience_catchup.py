"""What crosses Redis to an edge's participants fits its bound: a hello and an orchestration push of a queue
larger than a Redis message (relay/cluster/audience_link.py), emoji and quotes (escaped again in a push), real
`relay serve` nodes on a real Redis."""

from __future__ import annotations

import json

from tests.cluster.test_participants import AUTH, join, live_broadcast
from tests.conftest import eventually

LONG = {"orchestration": {"max_prompt_chars": 2000, "queue_interval_seconds": 3600}}


async def test_an_edge_joins_and_is_pushed_a_queue_of_emoji_prompts_larger_than_a_redis_message(cluster, http):
    (a, b), broadcast, _ = await live_broadcast(http, cluster, 2, LONG, mode="queue", cooldown_seconds=0)
    early = await join(http, b, broadcast)  # here before the queue grows: its pushes cross Redis too
    # \\ud83d\\ude0X and \\" in JSON: 14 KB each; 18 KB once a push carries the event as a string (each
    # backslash and quote escaped again): cut by the event's own size, a 72 KB push the edge would drop
    prompts = ['"' * 1000 + chr(0x1F600 + i) * 1000 for i in range(7)]
    senders = []  # kept open: a participant who leaves takes its queued prompt along
    for prompt in prompts:
        senders.append(p := await join(http, a, broadcast))
        # as UTF-8 (6 KB: within a socket message's 16 KiB)
        await p.ws.send_str(json.dumps({"type": "input", "prompt": prompt}, ensure_ascii=False))
        assert (await p.next("input_result"))["status"] == "queued"
    async def six_queued() -> bool:  # the first went to the stream at once (then one an hour)
        async with http.get(f"{a.url}/v1/broadcasts/{broadcast['broadcast_id']}/orchestration", headers=AUTH) as r:
            return (await r.json())["queue_length"] == 6
    await eventually(six_queued, timeout=5, what="the first prompt forwarded, six queued")
    late = await join(http, b, broadcast)  # the hello crossed Redis: cut to fit, not dropped (a 503 after 5 s)
    queued = prompts[1:]
    state = late.hello["orchestration"]
    assert state["queue_length"] == 6 and 0 < len(state["queue"]) < 6
    assert [q["prompt"] for q in state["queue"]] == queued[:len(state["queue"])]  # the head, in order
    assert len(json.dumps(late.hello)) <= 64 * 1024
    pushed = await early.next("orchestration", where=lambda e: e["queue_length"] == 6)  # not dropped by b
    assert 0 < len(pushed["queue"]) < 6 and [q["prompt"] for q in pushed["queue"]] == queued[:len(pushed["queue"])]
    for p in (early, late, *senders):
        await p.ws.close()

