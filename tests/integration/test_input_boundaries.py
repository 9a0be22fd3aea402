"""Text and JSON at the boundary, on a real relay: every way in refuses a lone surrogate or a control
character with its documented answer, deep JSON and out-of-range numbers are 400s (REST) or error
replies on a socket that stays open, and a recording survives whatever text reaches it.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from relay.client import RelayClient
from relay.odyssey.server import TWIN
from tests.conftest import API_KEY, eventually, frames_pass, next_of, open_signalling

LONG = {"stream_max_seconds": 60, "idle_timeout_seconds": 60}
DEPTH = 8  # a short limit from config, so "just over" stays small
AUTH = {"Authorization": f"Bearer {API_KEY}"}

# Bodies a stranger can send that are not acceptable JSON for the relay, each a 400 (all under the
# events socket's 16 KB message limit, so the sockets' answers are tried too).
BAD_JSON = {
    "deep_array": "[" * 7_000 + "]" * 7_000,
    "deep_unclosed": "[" * 10_000,
    "deep_object": '{"a":' * 2_500 + "1" + "}" * 2_500,
    "just_over_the_limit": "[" * (DEPTH + 1) + "]" * (DEPTH + 1),
    "huge_exponent": '{"prompt": 1e999999}',
    "huge_int": '{"timestamp_ms": ' + "9" * 10_000 + "}",
    "nan": '{"x": NaN}',
    "infinity": "[-Infinity]",
    "not_json": "{'prompt': 'single quotes'}",
    # UTF-16 that json.loads would sniff and the UTF-8 depth scan would misread (U+2200 is 00 22).
    "utf16_deep": ('["\u2200",' + "[" * 600 + "]" * 600 + "]").encode("utf-16-le"),
}
# Text the relay refuses wherever it enters (JSON escapes: what a client's encoder sends).
BAD_TEXT = {"lone_high": "a \ud800 b", "lone_low": "\udfff", "nul": "a\x00b", "escape": "\x1b[31mred",
            "c1": "x\x85y", "del": "x\x7f"}


@pytest.fixture
async def live(relay_factory):
    """A relay with a short JSON depth limit and a live stream: (relay, host connection, stream_id)."""
    relay = await relay_factory(limits=LONG, server={"max_json_depth": DEPTH},
                                orchestration={"mode": "queue", "cooldown_seconds": 0})
    client = RelayClient(relay.url, API_KEY)
    async with client.connect() as conn:
        started = await conn.start_stream("a quiet meadow")
        yield relay, conn, started["stream_id"]
    await client.close()


def ws_url(http_url: str) -> str:
    return http_url.replace("http://", "ws://", 1)


async def events_socket(http, conn):
    b = conn.broadcast
    ws = await http.ws_connect(ws_url(b["webrtc_url"]) + f"/events?token={b['spectator_token']}")
    assert (await ws.receive_json(timeout=5))["type"] == "hello"
    return ws


async def control_socket(http, conn):
    ws = await http.ws_connect(ws_url(conn.info["control_url"]) + f"?token={conn.info['client_token']}")
    assert (await ws.receive_json(timeout=5))["type"] == "connected"
    return ws


def assert_error_shape(body: dict, status_code: str = "INVALID_REQUEST") -> dict:
    error = body["error"]
    assert error["code"] == status_code and error["message"] and error["action"], body
    assert isinstance(error["details"], dict)
    return error


# -- JSON: depth and numbers ------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(BAD_JSON))
async def test_bad_json_is_a_400_on_rest_with_and_without_credentials(live, http, name):
    relay, conn, stream_id = live
    raw = BAD_JSON[name]
    headers = {"Content-Type": "application/json", **AUTH}
    async with http.post(f"{relay.url}/v1/streams/{stream_id}/interact", data=raw, headers=headers) as r:
        assert r.status == 400, await r.text()
        assert_error_shape(await r.json())
    # No credentials at all: the twin's token exchange parses first (hosted error shape: detail + code).
    async with http.post(f"{relay.url}/odyssey/auth/token", data=raw,
                         headers={"Content-Type": "application/json"}) as r:
        body = await r.json()
        assert r.status == 400 and body["code"] == "INVALID_REQUEST" and body["detail"], body


async def test_the_depth_limit_is_exact_and_says_so(live, http):
    relay, conn, stream_id = live
    chain = "[" * (DEPTH - 1) + "]" * (DEPTH - 1)
    exactly = '{"prompt": "fine", "x": %s}' % chain  # DEPTH levels with the outer object
    over = '{"prompt": "fine", "x": [%s]}' % chain
    url = f"{relay.url}/v1/streams/{stream_id}/interact"
    headers = {"Content-Type": "application/json", **AUTH}
    async with http.post(url, data=over, headers=headers) as r:
        error = assert_error_shape(await r.json())
        assert r.status == 400 and error["details"]["limit"] == DEPTH and "deeper" in error["message"], error
    async with http.post(url, data=exactly, headers=headers) as r:
        assert r.status == 200, await r.text()  # parsed, and its prompt applied


async def test_sockets_answer_bad_json_and_stay_open(live, http, caplog):
    relay, conn, stream_id = live
    events = await events_socket(http, conn)
    control = await control_socket(http, conn)
    signalling, session_id = await open_signalling(http, relay.url)
    for name, raw in BAD_JSON.items():
        if isinstance(raw, bytes):  # a REST body's encoding; socket text frames are UTF-8 by definition
            continue
        await events.send_str(raw)
        reply = await next_of(events, "error")
        assert reply["code"] == "INVALID_REQUEST" and reply["fatal"] is False, (name, reply)
        await control.send_str(raw)
        reply = await next_of(control, "error")
        assert reply["code"] == "INVALID_REQUEST" and reply["fatal"] is False, (name, reply)
        await signalling.send_str(raw)
        reply = await next_of(signalling, "invalid_message", "error")
        assert reply["type"] == "invalid_message" and reply["code"] == "INVALID_REQUEST", (name, reply)
    # Each socket still works after all of it.
    await events.send_json({"type": "input", "prompt": "a red kite"})
    assert (await next_of(events, "input_result"))["status"] == "queued"
    await control.send_json({"type": "refresh_token"})
    assert (await next_of(control, "client_token"))["client_token"]
    assert not signalling.closed and session_id in relay.app[TWIN].live
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    for ws in (events, control, signalling):
        await ws.close()


async def test_a_type_of_the_wrong_kind_is_answered_not_fatal(live, http, caplog):
    """Found by the fuzz test: {"type": []} ended the control socket (an unhashable lookup)."""
    relay, conn, _ = live
    events = await events_socket(http, conn)
    control = await control_socket(http, conn)
    for kind in ([], {"a": 1}, 7, None, True):
        await events.send_json({"type": kind, "prompt": "x"})
        assert (await next_of(events, "error"))["code"] == "INVALID_REQUEST"
        await control.send_json({"type": kind, "prompt": "x"})
        reply = await next_of(control, "error")
        assert reply["code"] == "INVALID_REQUEST" and reply["details"] == {"field": "type"}, reply
    await control.send_json({"type": "refresh_token"})
    assert (await next_of(control, "client_token"))["client_token"]
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    await events.close()
    await control.close()


# -- text: lone surrogates and control characters ------------------------------------------------------

@pytest.mark.parametrize("name", list(BAD_TEXT))
async def test_every_rest_entry_refuses_bad_text_with_422(live, http, name):
    relay, conn, stream_id = live
    text = BAD_TEXT[name]
    async with http.post(f"{relay.url}/v1/streams/{stream_id}/interact", json={"prompt": text}, headers=AUTH) as r:
        error = assert_error_shape(await r.json())
        assert r.status == 422 and error["details"] == {"field": "prompt", "reason": "invalid_text"}, error
    # A second connection's first stream: the same rule (a connection holds one stream at a time).
    async with http.post(f"{relay.url}/v1/connections", headers=AUTH) as r:
        other = await r.json()
    async with http.post(f"{relay.url}/v1/connections/{other['connection_id']}/streams", json={"prompt": text},
                         headers=AUTH) as r:
        error = assert_error_shape(await r.json())
        assert r.status == 422 and error["details"]["field"] == "prompt", error
    async with http.delete(f"{relay.url}/v1/connections/{other['connection_id']}", headers=AUTH) as r:
        assert r.status == 204
    script = [{"timestamp_ms": 0, "start": {"prompt": "ok"}},
              {"timestamp_ms": 500, "interact": {"prompt": text}},
              {"timestamp_ms": 1000, "end": {}}]
    async with http.post(f"{relay.url}/v1/simulations", json={"script": script}, headers=AUTH) as r:
        error = assert_error_shape(await r.json())
        assert r.status == 422, error
        assert error["details"]["index"] == 1 and error["details"]["field"] == "interact.prompt"
        assert error["details"]["reason"] == "invalid_text"
    async with http.get(f"{relay.url}/v1/simulations", headers=AUTH) as r:
        assert (await r.json())["total"] == 0  # nothing was queued to fail its retries
    url = f"{relay.url}/v1/broadcasts/{conn.broadcast['broadcast_id']}/orchestration"
    async with http.put(url, json={"blocked_words": ["fine", text]}, headers=AUTH) as r:
        error = assert_error_shape(await r.json())
        assert r.status == 422 and error["details"] == {"field": "blocked_words", "reason": "invalid_text"}, error


async def test_sockets_refuse_bad_text_and_stay_open(live, http):
    relay, conn, stream_id = live
    events = await events_socket(http, conn)
    control = await control_socket(http, conn)
    for text in BAD_TEXT.values():
        await events.send_json({"type": "input", "prompt": text})
        result = await next_of(events, "input_result")
        assert result["status"] == "rejected" and result["reason"] == "invalid_text", result
        await events.send_json({"type": "hello", "name": text})
        reply = await next_of(events, "error")
        assert reply["code"] == "INVALID_REQUEST" and reply["fatal"] is False
        assert reply["details"] == {"field": "name", "reason": "invalid_text"}
        await control.send_json({"type": "interact", "prompt": text})
        reply = await next_of(control, "error")
        assert reply["code"] == "INVALID_REQUEST" and reply["details"]["field"] == "prompt", reply
    # A name is one line; a prompt may have line breaks (collapsed for participants).
    await events.send_json({"type": "hello", "name": "Ann\nBob"})
    assert (await next_of(events, "error"))["details"]["field"] == "name"
    await events.send_json({"type": "hello", "name": "Zoe\u0301"})  # NFC: one "é"-like letter
    await events.send_json({"type": "input", "prompt": "a kite\nin the wind"})
    assert (await next_of(events, "input_result"))["status"] == "queued"
    state = relay.sessions.broadcast(conn.broadcast["broadcast_id"]).orchestrator.state(host=True)
    names = [p["name"] for p in state["participants"]]
    assert "Zo\u00e9" in names and not any(n and "\n" in n for n in names), names
    await events.close()
    await control.close()


async def test_a_stream_fed_bad_text_still_ends_with_a_complete_recording(live, http):
    relay, conn, stream_id = live
    broadcast = relay.sessions.broadcast(conn.broadcast["broadcast_id"])
    control = await control_socket(http, conn)
    for text in BAD_TEXT.values():
        async with http.post(f"{relay.url}/v1/streams/{stream_id}/interact", json={"prompt": text},
                             headers=AUTH) as r:
            assert r.status == 422
        await control.send_json({"type": "interact", "prompt": text})
        assert (await next_of(control, "error"))["code"] == "INVALID_REQUEST"
    await frames_pass(relay, broadcast.broadcast_id, 5)
    await conn.interact("dawn over the hills")
    # Second line of defence: text that got past every boundary must not end the recording either.
    broadcast.emit({"type": "prompt_applied", "prompt": "past the gate \ud800", "source": "host", "mode": "host"})
    await frames_pass(relay, broadcast.broadcast_id, 5)
    await conn.end_stream()
    rec = None

    async def finished() -> bool:
        nonlocal rec
        async with http.get(f"{relay.url}/v1/recordings/{stream_id}", headers=AUTH) as r:
            rec = await r.json()
        return rec.get("status") not in (None, "recording")

    await eventually(finished, timeout=15, what="the recording finished")
    assert rec["status"] == "complete" and rec["error"] is None, rec
    async with http.get(rec["events_url"]) as r:
        events = [json.loads(line) for line in (await r.text()).splitlines()]  # every line is JSON
    prompts = [e["prompt"] for e in events if e["type"] in ("stream_started", "prompt_applied")]
    assert prompts == ["a quiet meadow", "dawn over the hills", "past the gate \ud800"]
    assert events[-1]["type"] == "stream_ended"
    await control.close()


async def test_the_twin_data_channel_refuses_bad_text(live, http):
    """The SDK's update over clientToStreamer: refused as the SDK shows refusals, the session goes on."""
    from tests.integration.test_odyssey_twin import SdkLikeClient

    relay, _, _ = live
    client = SdkLikeClient(http, relay.url, API_KEY)
    await client.connect()
    try:
        await client.start_stream("a lighthouse")
        client.send({"type": "update", "prompt": "\ud800"})
        error = await asyncio.wait_for(client.events.get(), 10)
        while error["type"] != "interactive_stream_error":
            error = await asyncio.wait_for(client.events.get(), 10)
        assert error["reason"] == "invalid_request" and "surrogate" in error["message"], error
        client.channels["clientToStreamer"].send("[" * 10_000)
        error = await asyncio.wait_for(client.events.get(), 10)
        assert error["type"] == "interactive_stream_error" and "deeper" in error["message"], error
        client.send({"type": "update", "prompt": "a storm"})
        while (event := await asyncio.wait_for(client.events.get(), 10))["type"] != "update_acknowledged":
            pass
        assert event["prompt"] == "a storm"
    finally:
        await client.disconnect()
