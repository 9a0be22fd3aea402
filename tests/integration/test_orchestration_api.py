"""Audience participation on a real server: real WebSocket participants, real host calls."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import WSMsgType

from relay.client import RelayClient
from tests.conftest import API_KEY


@pytest.fixture
async def host(relay_factory):
    relay = await relay_factory(limits={"stream_max_seconds": 60, "idle_timeout_seconds": 60},
                                orchestration={"cooldown_seconds": 0})
    client = RelayClient(relay.url, API_KEY)
    async with client.connect() as conn:
        await conn.start_stream("a quiet meadow")
        yield relay, conn
    await client.close()


class Participant:
    def __init__(self, ws):
        self.ws = ws
        self.events: list[dict] = []
        self.hello: dict = {}

    async def next(self, type_: str, timeout: float = 5.0, where=lambda e: True) -> dict:
        """The next event of this type (skipping others), within timeout."""
        async with asyncio.timeout(timeout):
            while True:
                event = await self.ws.receive_json()
                self.events.append(event)
                if event.get("type") == type_ and where(event):
                    return event

    async def send(self, **message) -> None:
        await self.ws.send_json(message)


async def join(http, conn, name: str | None = None, resume: str | None = None) -> Participant:
    b = conn.broadcast
    url = b["webrtc_url"].replace("http://", "ws://") + f"/events?token={b['spectator_token']}"
    if resume is not None:
        url += f"&resume={resume}"
    p = Participant(await http.ws_connect(url))
    p.hello = await p.next("hello")
    if name:
        await p.send(type="hello", name=name)
    return p


async def set_mode(http, conn, **body) -> dict:
    url = conn.broadcast["webrtc_url"] + "/orchestration"
    async with http.put(url, json=body, headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def test_host_only_rejects_participants(host, http):
    relay, conn = host
    p = await join(http, conn)
    assert p.hello["orchestration"]["mode"] == "host" and p.hello["participant_id"]
    await p.send(type="input", prompt="make it snow")
    result = await p.next("input_result")
    assert result["status"] == "rejected" and result["reason"] == "host_only"
    # The host's own prompt is announced to participants with its source.
    await conn.interact("dawn breaks")
    applied = await p.next("prompt_applied")
    assert applied["prompt"] == "dawn breaks" and applied["source"] == "host"


async def test_queue_forwards_in_order(host, http):
    relay, conn = host
    await set_mode(http, conn, mode="queue", queue_interval_seconds=0.5)
    a, b = await join(http, conn, "ana"), await join(http, conn, "ben")
    await a.send(type="input", prompt="first snow")
    assert (await a.next("input_result"))["status"] in ("queued", "forwarded")
    await b.send(type="input", prompt="then rain")
    assert (await b.next("input_result"))["status"] == "queued"
    first = await a.next("prompt_applied", where=lambda e: e["source"] == "participant")
    second = await a.next("prompt_applied", where=lambda e: e["source"] == "participant")
    assert (first["prompt"], second["prompt"]) == ("first snow", "then rain")
    assert first["participant_id"] == a.hello["participant_id"] and first["mode"] == "queue"
    state = await (await http.get(f"{relay.url}/v1/streams/{conn.stream_id}",
                                  headers={"Authorization": f"Bearer {API_KEY}"})).json()
    assert state["last_applied_prompt"] == "then rain"


async def test_vote_won_three_to_one(host, http):
    relay, conn = host
    await set_mode(http, conn, mode="vote", vote_window_seconds=1.5)
    ps = [await join(http, conn, n) for n in ("a", "b", "c", "d")]
    await ps[0].send(type="input", prompt="volcano")
    volcano = await ps[0].next("input_result")
    await ps[1].send(type="input", prompt="glacier")
    glacier = await ps[1].next("input_result")
    assert volcano["status"] == glacier["status"] == "candidate"
    for p in ps[2:]:
        await p.send(type="vote", candidate_id=glacier["candidate_id"])
        assert (await p.next("vote_result"))["status"] == "voted"
    tally = await ps[0].next("orchestration", where=lambda e: any(c["votes"] == 3 for c in e["candidates"]))
    assert {c["prompt"]: c["votes"] for c in tally["candidates"]} == {"volcano": 1, "glacier": 3}
    applied = await ps[3].next("prompt_applied", timeout=6, where=lambda e: e["source"] == "participant")
    assert applied["prompt"] == "glacier" and applied["mode"] == "vote"


async def test_turns_pass_on(host, http):
    relay, conn = host
    await set_mode(http, conn, mode="turns", turn_seconds=30)
    a, b = await join(http, conn, "a"), await join(http, conn, "b")
    await a.send(type="raise_hand")
    await a.next("turn_result")
    await b.send(type="raise_hand")
    await b.next("turn_result")
    await b.send(type="input", prompt="not yet")
    assert (await b.next("input_result"))["reason"] == "not_your_turn"
    await a.send(type="input", prompt="aurora")
    assert (await a.next("input_result"))["status"] == "forwarded"
    await a.next("prompt_applied", where=lambda e: e["prompt"] == "aurora")
    await a.send(type="release_turn")
    await a.next("turn_result")
    await b.next("orchestration", where=lambda e: (e["turn"]["holder"] or {}).get("participant_id")
                 == b.hello["participant_id"])
    await b.send(type="input", prompt="meteor shower")
    assert (await b.next("input_result"))["status"] == "forwarded"
    # A holder who leaves loses the turn at once.
    await b.ws.close()
    await a.send(type="raise_hand")
    await a.next("orchestration", where=lambda e: (e["turn"]["holder"] or {}).get("participant_id")
                 == a.hello["participant_id"])


async def test_host_grants_and_revokes_the_turn_over_rest(host, http):
    relay, conn = host
    await set_mode(http, conn, mode="turns", turn_seconds=30)
    a, b = await join(http, conn, "a"), await join(http, conn, "b")
    for p in (a, b):  # a holds the turn, b waits with a raised hand
        await p.send(type="raise_hand")
        await p.next("turn_result")
    url, auth = conn.broadcast["webrtc_url"] + "/turn", {"Authorization": f"Bearer {API_KEY}"}
    for bad in ({}, {"participant_id": 7}, {"participant_id": ["b"]}):
        async with http.post(url, json=bad, headers=auth) as r:
            assert r.status == 400 and (await r.json())["error"]["details"]["field"] == "participant_id"
    async with http.post(url, json={"participant_id": b.hello["participant_id"]}, headers=auth) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("application/json")
        assert (await r.json())["holder"]["participant_id"] == b.hello["participant_id"]
    async with http.delete(url, headers=auth) as r:
        assert r.status == 200 and ((await r.json())["holder"] or {}).get("participant_id") != b.hello["participant_id"]


async def test_moderation(host, http):
    relay, conn = host
    await set_mode(http, conn, mode="queue", blocked_words=["ugly"], max_prompt_chars=20)
    p = await join(http, conn)
    for prompt, reason in (("an ugly tree", "blocked_word"), ("x" * 21, "too_long")):
        await p.send(type="input", prompt=prompt)
        result = await p.next("input_result")
        assert result == {"type": "input_result", "status": "rejected", "reason": reason}
    url = f"{conn.broadcast['webrtc_url']}/participants/{p.hello['participant_id']}/block"
    async with http.post(url, headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        assert r.status == 200
    await p.send(type="input", prompt="a fine tree")
    assert (await p.next("input_result"))["reason"] == "blocked"


async def test_a_participant_who_comes_back_with_its_resume_token_is_the_same_participant(host, http):
    relay, conn = host
    await set_mode(http, conn, mode="queue", cooldown_seconds=60)
    ann = await join(http, conn, "ann")
    pid, token = ann.hello["participant_id"], ann.hello["resume_token"]
    assert ann.hello["resumed"] is False
    await ann.send(type="input", prompt="a red kite")
    assert (await ann.next("input_result"))["status"] in ("queued", "forwarded")
    await ann.ws.close()

    # Her network drops and the page reconnects: same participant, still cooling down.
    ann = await join(http, conn, resume=token)
    assert (ann.hello["participant_id"], ann.hello["resumed"]) == (pid, True)
    await ann.send(type="input", prompt="a blue kite")
    assert (await ann.next("input_result"))["reason"] == "cooldown"

    # Blocked while away, still blocked when back.
    await ann.ws.close()
    async with http.post(f"{conn.broadcast['webrtc_url']}/participants/{pid}/block",
                         headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        assert r.status == 200
    ann = await join(http, conn, resume=token)
    await ann.send(type="input", prompt="a green kite")
    assert (await ann.next("input_result"))["reason"] == "blocked"

    # A forged token, or one from another broadcast, is simply a new participant.
    for forged in (pid + ".0123456789abcdef0123456789abcdef", pid, "nonsense"):
        other = await join(http, conn, resume=forged)
        assert other.hello["resumed"] is False and other.hello["participant_id"] != pid
        await other.ws.close()

    # One socket per participant: a second one with the same token takes over and the first
    # is closed as replaced; its closing does not make the participant leave.
    twin = await join(http, conn, resume=token)
    while (msg := await ann.ws.receive()).type not in (WSMsgType.CLOSE, WSMsgType.CLOSED):
        pass
    assert (msg.data, msg.extra) == (4001, "replaced")
    assert twin.hello["participant_id"] == pid
    state = await (await http.get(f"{conn.broadcast['webrtc_url']}/orchestration",
                                  headers={"Authorization": f"Bearer {API_KEY}"})).json()
    assert pid in {p["participant_id"] for p in state["participants"]}
    await twin.send(type="input", prompt="a kite")
    assert (await twin.next("input_result"))["reason"] == "blocked"


async def test_spectator_token_cannot_switch_modes_and_wrong_token_is_refused(host, http):
    relay, conn = host
    b = conn.broadcast
    async with http.put(b["webrtc_url"] + "/orchestration", json={"mode": "queue"},
                        headers={"Authorization": f"Bearer {b['spectator_token']}"}) as r:
        assert r.status == 403
    async with http.put(b["webrtc_url"] + "/orchestration", json={"mode": "queue"}) as r:
        assert r.status == 401
    async with http.put(b["webrtc_url"] + "/orchestration", json={"mode": "chaos"},
                        headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        assert r.status == 422
    async with http.get(b["webrtc_url"] + "/orchestration",
                        headers={"Authorization": f"Bearer {b['spectator_token']}"}) as r:
        assert r.status == 200 and (await r.json())["mode"] == "host"
    url = b["webrtc_url"].replace("http://", "ws://") + "/events?token=wrong"
    with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
        await http.ws_connect(url)
    assert exc.value.status == 401


async def test_host_switches_mode_from_control_socket(host, http):
    relay, conn = host
    url = f"{conn.info['control_url']}?token={conn.info['client_token']}"
    async with http.ws_connect(url) as ws:
        connected = await ws.receive_json(timeout=5)
        assert connected["orchestration"]["mode"] == "host"
        await ws.send_json({"type": "orchestration", "mode": "vote", "vote_window_seconds": 5})
        async with asyncio.timeout(5):
            while (event := await ws.receive_json())["type"] != "orchestration":
                pass
        assert event["mode"] == "vote" and event["settings"]["vote_window_seconds"] == 5
