"""Generated JSON thrown at every JSON endpoint and every socket of one real relay with a live stream.

Bodies: deep nesting (closed and not), wrong types for every field the API names, lone surrogates and
control characters, out-of-range numbers, strings up to the body limit, bytes that are not JSON. The
answer must never be a 5xx: a 2xx, or a 4xx in the error shape (the twin's shape under /odyssey), and
on sockets a reply or nothing, never a dropped socket. After all of it the relay answers /healthz at
once and the stream still makes frames.

Hypothesis draws the bodies up front (derandomized: the same bodies every run) and the test throws
them at the running relay, so one relay and one stream face every example.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import aiohttp
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from relay.client import RelayClient
from relay.odyssey.server import TWIN
from tests.conftest import API_KEY, frames_pass, open_signalling

EXAMPLES = 50  # per target
BODY_LIMIT = 64 * 1024  # the tests' [server] max_body_bytes (conftest)
SOCKET_LIMIT = 16 * 1024  # the events socket's message limit, the smallest of the three

WEIRD = st.sampled_from(["\ud800", "\udfff", "\x00", "\x1b", "\x85", "\x7f", "\n", "\u202e", "\u0301", "\U0001f409",
                         "\ufeff", "\"", "\\", "[", "{"])
TEXT = st.text(alphabet=WEIRD | st.characters(), max_size=30)
SCALARS = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
           | TEXT)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                      max_leaves=12)
# The field names the API reads, so wrong types reach the validators, not only the parser.
FIELDS = ("prompt", "image", "portrait", "broadcast", "name", "type", "script", "scripts", "timestamp_ms", "start",
          "interact", "end", "mode", "participant_id", "candidate_id", "api_key", "session_id", "sdp", "candidate",
          "queue_interval_seconds", "cooldown_seconds", "blocked_words", "max_prompt_chars", "region_latencies",
          "output_video", "input_image_base64")
OBJECTS = st.dictionaries(st.sampled_from(FIELDS) | TEXT, VALUES, max_size=6)
SCRIPTS = st.lists(st.fixed_dictionaries({"timestamp_ms": st.integers(-5, 10**12) | VALUES},
                                         optional={"start": st.fixed_dictionaries({"prompt": VALUES}),
                                                   "interact": st.fixed_dictionaries({"prompt": VALUES}),
                                                   "end": VALUES}), max_size=4).map(lambda s: {"script": s})


def deep(n: int, closed: bool, kind: str) -> str:
    opener, closer = ("[", "]") if kind == "array" else ('{"a":', "}")
    return opener * n + ("0" + closer * n if closed else "")


def huge_string(size: int) -> str:
    return json.dumps({"prompt": "x" * size})


def raw_bodies(limit: int):
    """What goes on the wire, as text: JSON dumps of the above, and what no encoder makes."""
    return st.one_of(
        # ensure_ascii=False too: raw UTF-8 (and, on REST, lone surrogates as their raw bytes)
        st.builds(lambda v, ascii_: json.dumps(v, ensure_ascii=ascii_), OBJECTS | SCRIPTS | VALUES, st.booleans()),
        st.builds(deep, st.integers(20, limit // 6), st.booleans(), st.sampled_from(["array", "object"])),
        st.sampled_from(["1e999999", "-1e999999", '{"prompt": 1e400}', "[NaN]", '{"x": Infinity}',
                         "9" * (limit // 2), '{"timestamp_ms": %s}' % ("1" * 5000), '"\\ud800"',
                         '{"prompt": "\\udc00\\u0000"}', '{"type": "input", "prompt": "\\ud83d"}', "", "null",
                         '"' + 'a\\"' * (limit // 4), '["' + "[" * (limit // 2),  # unterminated strings
                         "[]", "{", '{"a": 1,}', "\ufeff{}"]),
        st.integers(1, limit - 20).map(huge_string),
        st.binary(max_size=64).map(lambda b: b.decode("latin-1")),
    )


def draw(strategy, n: int = EXAMPLES) -> list[Any]:
    """n examples of a strategy, the same every run."""
    out: list[Any] = []

    @settings(max_examples=n, database=None, derandomize=True, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(value: Any) -> None:
        out.append(value)

    collect()
    return out


def ws_url(url: str) -> str:
    return url.replace("http://", "ws://", 1)


async def answered_in_shape(response: aiohttp.ClientResponse, hosted: bool, what: str) -> None:
    assert response.status < 500, f"{what}: {response.status} {await response.text()}"
    if response.status >= 400:
        body = await response.json()
        if hosted:  # the hosted API's shape: detail (+ code); a 429 nests it
            assert "detail" in body, (what, body)
        else:
            error = body["error"]
            assert set(error) == {"code", "message", "action", "details"}, (what, body)
        if response.status == 429:
            assert response.headers.get("Retry-After"), what


async def test_generated_json_never_breaks_the_relay(relay_factory, http, caplog):
    caplog.set_level(logging.WARNING)
    relay = await relay_factory(limits={"stream_max_seconds": 120, "idle_timeout_seconds": 120, "streamers": 8},
                                orchestration={"mode": "queue", "cooldown_seconds": 0},
                                simulations={"max_seconds": 1})  # a script that happens to be valid is short
    client = RelayClient(relay.url, API_KEY)
    async with client.connect() as conn:
        started = await conn.start_stream("a quiet meadow")
        stream_id, b = started["stream_id"], conn.broadcast
        fuzzed = await client.create_channel("fuzzed")
        auth = {"Authorization": f"Bearer {API_KEY}"}
        async with http.post(f"{relay.url}/odyssey/auth/token", json={"api_key": API_KEY}) as r:
            twin_auth = {"Authorization": f"Bearer {(await r.json())['access_token']}"}
        # Every route that reads a JSON body (relay/api/*.py, relay/odyssey/server.py).
        targets = [
            ("POST", f"/v1/connections/{conn.connection_id}/streams", auth, False),
            ("POST", f"/v1/streams/{stream_id}/interact", auth, False),
            ("PUT", f"/v1/broadcasts/{b['broadcast_id']}/orchestration", auth, False),
            ("POST", f"/v1/broadcasts/{b['broadcast_id']}/turn", auth, False),
            ("POST", "/v1/simulations", auth, False),
            ("POST", "/v1/channels", auth, False),
            ("PATCH", f"/v1/channels/{fuzzed['channel_id']}", auth, False),
            ("POST", "/odyssey/auth/token", {}, True),
            ("POST", "/odyssey/sessions/request", twin_auth, True),
            ("POST", "/odyssey/sessions/token", twin_auth, True),
            ("POST", "/odyssey/simulation-jobs", twin_auth, True),
        ]
        bodies = draw(raw_bodies(BODY_LIMIT), EXAMPLES * len(targets))
        for index, (method, path, headers, hosted) in enumerate(targets):
            for body in bodies[index::len(targets)]:
                start = time.perf_counter()
                async with http.request(method, relay.url + path, data=body.encode("utf-8", "surrogatepass"),
                                        headers={"Content-Type": "application/json", **headers}) as r:
                    await answered_in_shape(r, hosted, f"{method} {path} {body[:80]!r}")
                    # Generous on 2 shared cores; a parse that is not linear takes many seconds.
                    assert time.perf_counter() - start < 2.0, f"{method} {path} {body[:80]!r} was slow"
                    if path.endswith("/sessions/request") and r.status == 200:  # a streamer reserved: free it
                        session_id = (await r.json())["session_id"]
                        await relay.sessions.close_connection(relay.sessions.connection(session_id))
        assert relay.sessions.stream(stream_id).live, "a generated body ended the stream under test"

        # The three sockets: each message answered or ignored, never the socket's end.
        events = await http.ws_connect(ws_url(b["webrtc_url"]) + f"/events?token={b['spectator_token']}")
        control = await http.ws_connect(ws_url(conn.info["control_url"]) + f"?token={conn.info['client_token']}")
        signalling, session_id = await open_signalling(http, relay.url)
        socket_bodies = draw(raw_bodies(SOCKET_LIMIT), EXAMPLES * 3)
        # Control messages that end things on purpose (documented) are left out: the socket must stay.
        ending = ("end_stream", "start_stream", "answer", "client_disconnecting", "revoke_turn")
        for i, body in enumerate(socket_bodies):
            ws = (events, control, signalling)[i % 3]
            if any(f'"{kind}"' in body for kind in ending) or not _utf8(body):  # text frames are UTF-8
                continue
            await ws.send_str(body)
        # Sockets read in order: a probe answered after the last message means each was survived.
        await events.send_json({"type": "input", "prompt": "a red kite"})
        await _reply(events, "input_result")
        await control.send_json({"type": "refresh_token"})
        await _reply(control, "client_token")
        await signalling.send_str("not json")
        await _reply(signalling, "invalid_message")
        assert session_id in relay.app[TWIN].live

        start = time.perf_counter()
        async with http.get(f"{relay.url}/healthz") as r:
            assert r.status == 200
        assert time.perf_counter() - start < 1.0
        assert relay.sessions.stream(stream_id).live
        await frames_pass(relay, b["broadcast_id"], 10)
        for ws in (events, control, signalling):
            await ws.close()
    await client.close()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


async def _reply(ws: aiohttp.ClientWebSocketResponse, kind: str, timeout: float = 10.0) -> dict:
    async with asyncio.timeout(timeout):
        while True:
            msg = await ws.receive()
            assert msg.type == aiohttp.WSMsgType.TEXT, f"socket ended waiting for {kind}: {msg}"
            message = json.loads(msg.data)
            if message.get("type") == kind:
                return message
