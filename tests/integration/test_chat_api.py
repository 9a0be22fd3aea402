"""Chat and reactions on a real server: real WebSocket participants, the host's REST calls, the recording."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from relay.client import RelayClient
from tests.conftest import API_KEY
from tests.integration.test_orchestration_api import join, set_mode
from tests.integration.test_recordings_api import finished_recording

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture
async def host(relay_factory):
    relay = await relay_factory(limits={"stream_max_seconds": 60, "idle_timeout_seconds": 60},
                                orchestration={"cooldown_seconds": 0, "blocked_words": ["darn"]},
                                chat={"messages_per_second": 0.5, "burst": 3, "history": 5,
                                      "reaction_interval_seconds": 0.2})
    client = RelayClient(relay.url, API_KEY)
    async with client.connect() as conn:
        await conn.start_stream("a quiet meadow")
        yield relay, conn
    await client.close()


def chat_url(conn) -> str:
    return conn.broadcast["webrtc_url"] + "/chat"


async def test_a_message_reaches_another_participant_and_a_blocked_word_does_not(host, http):
    relay, conn = host
    ana, ben = await join(http, conn, "ana"), await join(http, conn, "ben")
    assert ben.hello["chat"]["enabled"] is True and "🔥" in ben.hello["chat"]["reactions"]
    await ana.send(type="chat", text="oh darn, the sky")
    refused = await ana.next("chat_result")
    assert refused["status"] == "rejected" and refused["reason"] == "blocked_word"
    await ana.send(type="chat", text="what a sky")
    assert (await ana.next("chat_result"))["status"] == "sent"
    message = await ben.next("chat")
    assert message["text"] == "what a sky" and message["name"] == "ana"
    assert not [e for e in ben.events if e.get("type") == "chat" and "darn" in e["text"]]
    # A late joiner gets the history, without the refused message.
    cara = await join(http, conn, "cara")
    assert [m["text"] for m in cara.hello["chat"]["history"]] == ["what a sky"]


@pytest.mark.parametrize("message, reason", [
    ({"type": "chat", "text": "x" * 5000}, "too_long"),
    ({"type": "chat", "text": "ring\u0007"}, "invalid_text"),
    ({"type": "chat", "text": ""}, "empty"),
    ({"type": "chat"}, "empty"),
    ({"type": "reaction", "emoji": "💩"}, "unknown_reaction"),
    ({"type": "reaction", "emoji": ["🔥"]}, "unknown_reaction"),
])
async def test_bad_chat_is_refused_and_the_socket_stays_open(host, http, message, reason):
    relay, conn = host
    p = await join(http, conn)
    await p.send(**message)
    reply = await p.next(message["type"] + "_result")
    assert reply["status"] == "rejected" and reply["reason"] == reason and reply["message"]
    await p.send(type="reaction", emoji="🔥")
    assert (await p.next("reaction_result"))["status"] == "sent"


async def test_a_chat_flood_is_rate_limited_while_others_inputs_go_through(host, http):
    relay, conn = host
    await set_mode(http, conn, mode="queue", queue_interval_seconds=0.5)
    flooder, other = await join(http, conn, "flo"), await join(http, conn, "oli")
    for i in range(6):
        await flooder.send(type="chat", text=f"spam {i}")
    replies = [await flooder.next("chat_result") for _ in range(6)]
    assert [r["status"] for r in replies] == ["sent"] * 3 + ["rejected"] * 3
    assert replies[-1]["code"] == "RATE_LIMITED" and replies[-1]["retry_after"] > 0
    # The flooder's own inputs still have their tokens; the other participant's go through as well.
    await flooder.send(type="input", prompt="a red kite")
    assert (await flooder.next("input_result"))["status"] == "queued"
    await other.send(type="input", prompt="a blue heron")
    assert (await other.next("input_result"))["status"] == "queued"
    applied = await other.next("prompt_applied", where=lambda e: e["prompt"] == "a blue heron")
    assert applied["participant_id"] == other.hello["participant_id"]


async def test_reactions_arrive_as_counts(host, http):
    relay, conn = host
    a, b = await join(http, conn), await join(http, conn)
    for emoji in ("🔥", "🔥", "👍"):
        await a.send(type="reaction", emoji=emoji)
    for _ in range(3):  # the three may straddle an interval: counts add up over the events
        assert (await a.next("reaction_result"))["status"] == "sent"
    total: Counter[str] = Counter()
    while sum(total.values()) < 3:
        total.update((await b.next("reactions"))["counts"])
    assert total == {"🔥": 2, "👍": 1}


async def test_the_host_clears_a_message_and_turns_chat_off(host, http):
    relay, conn = host
    ana, ben = await join(http, conn, "ana"), await join(http, conn, "ben")
    await ana.send(type="chat", text="first!")
    message = await ben.next("chat")
    # Participants may not moderate.
    token = {"Authorization": f"Bearer {conn.broadcast['spectator_token']}"}
    async with http.put(chat_url(conn), json={"enabled": False}, headers=token) as r:
        assert r.status == 403 and (await r.json())["error"]["code"] == "FORBIDDEN"
    async with http.delete(f"{chat_url(conn)}/messages/{message['message_id']}", headers=AUTH) as r:
        assert r.status == 200, await r.text()
    assert (await ben.next("chat_cleared"))["message_id"] == message["message_id"]
    async with http.delete(f"{chat_url(conn)}/messages/{message['message_id']}", headers=AUTH) as r:
        assert r.status == 404 and (await r.json())["error"]["code"] == "NOT_FOUND"
    async with http.get(chat_url(conn), headers=token) as r:
        assert (await r.json())["history"] == []
    for body in ({"enabled": "no"}, {}):
        async with http.put(chat_url(conn), json=body, headers=AUTH) as r:
            assert r.status == 400 and (await r.json())["error"]["details"]["field"] == "enabled"
    async with http.put(chat_url(conn), json={"enabled": False}, headers=AUTH) as r:
        assert r.status == 200 and (await r.json())["enabled"] is False
    assert (await ben.next("chat_state"))["enabled"] is False
    await ben.send(type="chat", text="hello?")
    refused = await ben.next("chat_result")
    assert refused["reason"] == "chat_off" and refused["message"] == "The host has turned chat off."
    late = await join(http, conn)
    assert late.hello["chat"]["enabled"] is False


async def test_chat_lands_in_the_recordings_events_log(relay_factory, http):
    relay = await relay_factory(limits={"stream_max_seconds": 60}, chat={"reaction_interval_seconds": 0.2})
    async with RelayClient(relay.url, API_KEY) as client, client.connect() as conn:
        stream_id = (await conn.start_stream("a calm ocean"))["stream_id"]
        p = await join(http, conn, "ana")
        await p.send(type="chat", text="look at the waves")
        message = await p.next("chat")
        await p.send(type="reaction", emoji="👏")
        await p.next("reactions")
        await conn.end_stream()
        rec = await finished_recording(http, relay.url, stream_id)
    async with http.get(rec["events_url"]) as r:
        events = [json.loads(line) for line in (await r.text()).splitlines()]
    [chat] = [e for e in events if e["type"] == "chat"]
    assert chat["text"] == "look at the waves" and chat["name"] == "ana"
    assert chat["message_id"] == message["message_id"] and chat["offset_ms"] >= 0
    assert [e["counts"] for e in events if e["type"] == "reactions"] == [{"👏": 1}]


async def test_the_control_socket_clears_and_switches_chat_and_refuses_bad_messages(host, http):
    relay, conn = host
    p = await join(http, conn, "ana")
    url = f"{relay.url.replace('http://', 'ws://')}/v1/connections/{conn.connection_id}/control"
    control = await http.ws_connect(url, headers=AUTH)
    connected = await control.receive_json()
    assert connected["type"] == "connected" and connected["chat"]["enabled"] is True

    async def next_control(type_: str) -> dict:
        while True:
            event = await control.receive_json(timeout=5)
            if event["type"] == type_:
                return event

    await p.send(type="chat", text="hi host")
    message = await next_control("chat")  # the host sees the chat too
    for bad, field in (({"type": "set_chat", "enabled": 1}, "enabled"), ({"type": "clear_chat"}, "message_id"),
                       ({"type": "clear_chat", "message_id": ["x"]}, "message_id")):
        await control.send_json(bad)
        error = await next_control("error")
        assert error["code"] == "INVALID_REQUEST" and error["details"]["field"] == field
    await control.send_json({"type": "clear_chat", "message_id": "0" * 12})
    assert (await next_control("error"))["code"] == "NOT_FOUND"
    await control.send_json({"type": "clear_chat", "message_id": message["message_id"]})
    assert (await p.next("chat_cleared"))["message_id"] == message["message_id"]
    await control.send_json({"type": "set_chat", "enabled": False})
    assert (await next_control("chat_state"))["enabled"] is False
    assert (await p.next("chat_state"))["enabled"] is False
    await control.close()
