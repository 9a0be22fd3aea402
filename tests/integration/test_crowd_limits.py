"""Crowds and floods on a real relay: rate limits, caps and invites, with real sockets and peers.

Short limits come from each test's config; every answer asserted is the documented one.
"""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
import pytest
from aiohttp import WSMsgType

from relay.client import RelayClient, Spectator
from tests.conftest import API_KEY, eventually, frames_for
from tests.integration.test_orchestration_api import Participant, join, set_mode

HOST = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture
async def live(relay_factory):
    """Start a relay with the test's config sections, a connection and a live stream on it."""
    async with contextlib.AsyncExitStack() as stack:
        async def start(**sections):
            sections.setdefault("limits", {}).update(stream_max_seconds=60, idle_timeout_seconds=60)
            relay = await relay_factory(**sections)
            client = await stack.enter_async_context(RelayClient(relay.url, API_KEY))
            conn = await stack.enter_async_context(client.connect())
            await conn.start_stream("a quiet meadow")
            return relay, conn

        yield start


def events_url(conn, **query) -> str:
    b = conn.broadcast
    url = b["webrtc_url"].replace("http://", "ws://") + f"/events?token={b['spectator_token']}"
    return url + "".join(f"&{k}={v}" for k, v in query.items())


async def replies(p: Participant, type_: str, n: int, timeout: float = 5.0) -> list[dict]:
    return [await p.next(type_, timeout) for _ in range(n)]


# ------------------------------------------------------------------------------------- host interacts

async def test_a_host_interact_flood_is_answered_429_with_retry_after_on_rest_and_control_socket(live, http):
    relay, conn = await live(limits={"host_interacts_per_second": 2, "host_interacts_burst": 3})
    url = f"{relay.url}/v1/streams/{conn.stream_id}/interact"
    statuses, refused = [], None
    for i in range(12):
        async with http.post(url, json={"prompt": f"prompt {i}"}, headers=HOST) as r:
            statuses.append(r.status)
            if r.status == 429:
                refused = (r.headers.get("Retry-After"), await r.json())
    assert statuses[:3] == [200] * 3 and statuses.count(429) >= 8  # the burst, then at most the rate
    retry_after, body = refused
    assert int(retry_after) >= 1
    assert body["error"]["code"] == "RATE_LIMITED" and 0 < body["error"]["details"]["retry_after"] <= 0.5

    # The control socket shares the connection's bucket: its interacts are refused the same way.
    control = f"{conn.info['control_url']}?token={conn.info['client_token']}"
    async with http.ws_connect(control) as ws:
        assert (await ws.receive_json(timeout=5))["type"] == "connected"
        for i in range(5):
            await ws.send_json({"type": "interact", "prompt": f"socket {i}"})
        async with asyncio.timeout(5):
            while (msg := await ws.receive_json())["type"] != "error":
                pass
        assert msg["code"] == "RATE_LIMITED" and msg["fatal"] is False and msg["details"]["retry_after"] > 0

    # Tokens come back at the configured rate (2/s: one in 0.5 s at most), not before and not never.
    loop = asyncio.get_running_loop()
    refused_at = loop.time()

    async def accepted() -> bool:
        async with http.post(url, json={"prompt": "after a pause"}, headers=HOST) as r:
            return r.status == 200
    await eventually(accepted, timeout=3, what="a token back at the configured rate")
    assert loop.time() - refused_at <= 1.0


async def test_odyssey_updates_past_the_rate_get_a_rate_limited_stream_error(relay_factory, http):
    from relay.worldmodel import hosted_protocol as protocol
    from tests.integration.test_odyssey_twin import SdkLikeClient
    relay = await relay_factory(limits={"stream_max_seconds": 60, "idle_timeout_seconds": 60,
                                        "host_interacts_per_second": 1, "host_interacts_burst": 2})
    client = SdkLikeClient(http, relay.url, API_KEY)
    await client.connect()
    try:
        await client.start_stream("a calm ocean")
        for i in range(4):
            client.send({"type": "update", "prompt": f"update {i}"})
        acks = [await client.expect(protocol.UPDATE_ACKNOWLEDGED) for _ in range(2)]
        assert [a["prompt"] for a in acks] == ["update 0", "update 1"]
        error = await asyncio.wait_for(client.events.get(), 5)  # the third: refused, and said why
        assert error["type"] == protocol.STREAM_ERROR and error["reason"] == "rate_limited"
        assert 0 < error["retry_after"] <= 1
    finally:
        await client.disconnect()


# ------------------------------------------------------------------------------------- participants

FLOOD = {"participant_messages_per_second": 2, "participant_messages_burst": 3, "cooldown_seconds": 0,
         "duplicate_window_seconds": 0}


async def test_a_participants_flood_is_refused_rate_limited_and_others_still_go_through(live, http):
    relay, conn = await live(orchestration={**FLOOD, "mode": "vote"})
    flooder, other = await join(http, conn), await join(http, conn)
    for i in range(40):
        await flooder.send(type="input", prompt=f"flood {i}")
    results = await replies(flooder, "input_result", 40)
    limited = [r for r in results if r.get("reason") == "rate_limited"]
    assert len(limited) >= 36  # 3 in the burst, maybe one more refilled meanwhile
    assert all(r["status"] == "rejected" and r["code"] == "RATE_LIMITED" and r["retry_after"] > 0 for r in limited)
    await flooder.send(type="vote", candidate_id="c1")  # a vote is answered in its own reply type
    assert (await flooder.next("vote_result"))["code"] == "RATE_LIMITED"
    await flooder.send(type="whatever")
    error = await flooder.next("error")
    assert error["code"] == "RATE_LIMITED" and error["fatal"] is False

    await other.send(type="input", prompt="a glacier")
    assert (await other.next("input_result"))["status"] == "candidate"


async def test_a_socket_that_keeps_flooding_is_closed_with_4029(live, http):
    relay, conn = await live(orchestration=FLOOD, limits={"events_flood_messages": 20})
    flooder = await join(http, conn)
    for i in range(10):  # garbage takes tokens too: past the burst it is refused for rate, not parsed
        await flooder.ws.send_str("not json")
    errors = [(await flooder.next("error"))["code"] for _ in range(10)]
    assert errors[:3] == ["INVALID_REQUEST"] * 3 and errors[-1] == "RATE_LIMITED"
    for i in range(30):  # binary frames are not answered, but count the same: 7 + 13 refused in a row
        await flooder.ws.send_bytes(b"\0" * 100)
    async with asyncio.timeout(5):
        while (await flooder.ws.receive()).type not in (WSMsgType.CLOSE, WSMsgType.CLOSED):
            pass
    assert flooder.ws.close_code == 4029
    await eventually(lambda: not relay.sessions.broadcast(conn.broadcast["broadcast_id"]).audience._channels,
                     what="the flooder's identity gone")


async def test_spectators_keep_their_frame_rate_while_a_participant_floods(live, http):
    # Closing the flooder (events_flood_messages) would end the attack early: here it floods on.
    relay, conn = await live(orchestration={"mode": "queue", "participant_messages_per_second": 5},
                             limits={"events_flood_messages": 10**9})
    b = conn.broadcast
    viewers = [Spectator(b["whep_url"], b["spectator_token"]) for _ in range(2)]
    flooder = await join(http, conn)
    stop = asyncio.Event()

    async def flood() -> int:
        sent = 0
        while not stop.is_set():
            await flooder.send(type="input", prompt="x" * 150)
            sent += 1
            if sent % 10 == 0:
                await asyncio.sleep(0)  # the relay shares this loop: let its frames go out between bursts
        return sent

    async def drain() -> int:
        limited = 0
        while not stop.is_set():
            msg = await flooder.ws.receive()
            if msg.type != WSMsgType.TEXT:
                break
            limited += '"rate_limited"' in msg.data
        return limited

    try:
        for v in viewers:
            await v.join()
        await asyncio.gather(*(v.track.recv() for v in viewers))
        flooding = asyncio.gather(flood(), drain())
        counts = await asyncio.gather(*(frames_for(v.track, 2.0) for v in viewers))
        stop.set()
        await flooder.send(type="hello")  # one more message, so drain() wakes and sees stop
        sent, limited = await asyncio.wait_for(flooding, 10)
        fps = [len(frames) / 2.0 for frames in counts]
        print(f"flood: {sent} messages in 2 s, {limited} answered rate_limited; spectators' fps {fps}")
        assert sent > 500 and limited > 400
        assert min(fps) >= 22, fps
    finally:
        stop.set()
        for v in viewers:
            await v.leave()


# ----------------------------------------------------------------------------------------------- caps

async def test_events_sockets_per_address_cap_answers_429_before_the_upgrade(live, http):
    relay, conn = await live(limits={"events_sockets_per_address": 3})
    sockets = [await join(http, conn) for _ in range(3)]
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await http.ws_connect(events_url(conn))
    assert refused.value.status == 429 and int(refused.value.headers["Retry-After"]) >= 1
    async with http.get(events_url(conn).replace("ws://", "http://")) as r:  # the same refusal, readable
        body = await r.json()
        assert r.status == 429 and body["error"]["code"] == "RATE_LIMITED"
        assert body["error"]["details"]["limit"] == 3
    await sockets[0].ws.close()  # a place comes back when a socket closes
    async with asyncio.timeout(5):
        while True:
            try:
                extra = await http.ws_connect(events_url(conn))
                break
            except aiohttp.WSServerHandshakeError:
                await asyncio.sleep(0.05)
    await extra.close()


async def test_the_per_address_cap_counts_the_client_a_trusted_proxy_forwarded(live, http):
    # Behind a reverse proxy every socket comes from the proxy: the cap must count the clients it names.
    relay, conn = await live(limits={"events_sockets_per_address": 1}, server={"trusted_proxies": ["127.0.0.0/8"]})

    async def opens(forwarded_for: str) -> bool:
        try:
            ws = await http.ws_connect(events_url(conn), headers={"X-Forwarded-For": forwarded_for})
        except aiohttp.WSServerHandshakeError as refused:
            assert refused.status == 429
            return False
        held.append(ws)
        return True

    held: list = []
    assert await opens("203.0.113.7") and await opens("203.0.113.8")  # two clients, one place each
    assert not await opens("203.0.113.7")
    assert not await opens("198.51.100.1, 203.0.113.7")  # what the client wrote itself is not believed
    assert await opens("2001:db8::1, 127.0.0.1") and not await opens("2001:db8::2")  # one /64, one host
    for ws in held:
        await ws.close()


async def test_participants_per_broadcast_cap_answers_503_but_lets_an_identity_resume(live, http):
    relay, conn = await live(limits={"participants_per_broadcast": 2})
    first, _ = await join(http, conn), await join(http, conn)  # the cap's two participants
    async with http.get(events_url(conn).replace("ws://", "http://")) as r:
        body = await r.json()
        assert r.status == 503 and r.headers["Retry-After"] == "10"
        assert body["error"]["code"] == "PARTICIPANT_LIMIT_REACHED" and body["error"]["details"]["limit"] == 2
    # A participant reconnecting (its resume token) is not one more: it replaces its older socket.
    again = await join(http, conn, resume=first.hello["resume_token"])
    assert again.hello["participant_id"] == first.hello["participant_id"] and again.hello["resumed"] is True
    await first.ws.receive()
    assert first.ws.close_code == 4001


async def test_ninety_nine_votes_from_one_address_count_as_the_per_address_cap(live, http):
    relay, conn = await live(orchestration={"mode": "vote", "votes_per_address": 5, "vote_window_seconds": 60})
    voters = await asyncio.gather(*(join(http, conn) for _ in range(99)))
    await voters[0].send(type="input", prompt="a volcano")  # proposing is the first vote
    candidate = (await voters[0].next("input_result"))["candidate_id"]
    for v in voters[1:]:
        await v.send(type="vote", candidate_id=candidate)
    results = [await v.next("vote_result") for v in voters[1:]]
    assert sum(r["status"] == "voted" for r in results) == 4
    assert all(r["code"] == "RATE_LIMITED" and r["retry_after"] > 0 for r in results if r["status"] == "rejected")
    async with http.get(conn.broadcast["webrtc_url"] + "/orchestration", headers=HOST) as r:
        assert [c["votes"] for c in (await r.json())["candidates"]] == [5]
    await asyncio.gather(*(v.ws.close() for v in voters))


# ------------------------------------------------------------------------------ fair shares of the chat

async def forwarded(http, conn, address: str) -> Participant:
    p = Participant(await http.ws_connect(events_url(conn), headers={"X-Forwarded-For": address}))
    p.hello = await p.next("hello")
    return p


async def test_an_address_at_its_max_sockets_cannot_keep_another_address_out_of_the_chat(live, http):
    relay, conn = await live(limits={"events_sockets_per_address": 20}, server={"trusted_proxies": ["127.0.0.0/8"]},
                             chat={"broadcast_messages_per_second": 10, "messages_per_second": 5, "burst": 5})
    flood = await asyncio.gather(*(forwarded(http, conn, "203.0.113.7") for _ in range(20)))
    other, reader = await forwarded(http, conn, "198.51.100.1"), await forwarded(http, conn, "198.51.100.2")
    for p in flood:  # 100 messages at once: ten times the broadcast's burst
        for i in range(5):
            await p.send(type="chat", text=f"spam {i}")
    sent = [await p.next("chat_result") for p in flood for _ in range(5)]
    assert any(r["status"] == "sent" for r in sent)  # it took what it could
    assert any(r.get("reason") == "chat_busy" for r in sent)  # ten times the burst: the cap refused the rest
    await other.send(type="chat", text="still here")
    assert (await other.next("chat_result"))["status"] == "sent"
    await reader.next("chat", where=lambda e: e["text"] == "still here")
    await asyncio.gather(*(p.ws.close() for p in [*flood, other, reader]))


async def test_a_flooder_among_many_silent_addresses_cannot_keep_a_speaker_out_of_the_chat(live, http):
    # Shares go to the addresses sending, not to every open socket: sixty quiet viewers, each at its own
    # address, must not shrink a speaker's share to rate/62 while one address floods.
    relay, conn = await live(server={"trusted_proxies": ["127.0.0.0/8"]},
                             chat={"broadcast_messages_per_second": 10, "messages_per_second": 100, "burst": 100})
    silent = await asyncio.gather(*(forwarded(http, conn, f"198.18.0.{i}") for i in range(1, 61)))
    flood = await asyncio.gather(*(forwarded(http, conn, "203.0.113.7") for _ in range(4)))
    speaker, reader = await forwarded(http, conn, "198.51.100.1"), await forwarded(http, conn, "198.51.100.2")
    busy, stop = asyncio.Event(), asyncio.Event()

    async def flooding(p: Participant) -> None:  # one message in flight per socket, as fast as answered
        while not stop.is_set():
            await p.send(type="chat", text="spam")
            if (await p.next("chat_result")).get("reason") == "chat_busy":
                busy.set()

    floods = [asyncio.create_task(flooding(p)) for p in flood]
    try:
        await asyncio.wait_for(busy.wait(), 5)  # the cap is contended
        results = []
        for i in range(5):  # 3 a second: a tenth of what the flooder asks, well within a fair share
            await speaker.send(type="chat", text=f"still here {i}")
            results.append(await speaker.next("chat_result"))
            await asyncio.sleep(0.3)  # the speaker's own pace, not a wait for anything
    finally:
        stop.set()
        await asyncio.gather(*floods)
    assert [r["status"] for r in results] == ["sent"] * 5
    for i in range(5):
        await reader.next("chat", where=lambda e, i=i: e["text"] == f"still here {i}")
    await asyncio.gather(*(p.ws.close() for p in [*silent, *flood, speaker, reader]))


async def test_an_address_alone_may_use_the_whole_chat_cap(live, http):
    relay, conn = await live(chat={"broadcast_messages_per_second": 10, "messages_per_second": 5, "burst": 5})
    classroom = await asyncio.gather(*(join(http, conn) for _ in range(20)))  # one address, no proxy
    for p in classroom:
        for i in range(5):
            await p.send(type="chat", text=f"hi {i}")
    sent = [await p.next("chat_result") for p in classroom for _ in range(5)]
    assert sum(r["status"] == "sent" for r in sent) >= 10  # the whole burst (and what refilled meanwhile)
    await asyncio.gather(*(p.ws.close() for p in classroom))


async def test_an_address_at_its_max_sockets_cannot_fill_the_queue(live, http):
    relay, conn = await live(limits={"events_sockets_per_address": 20}, server={"trusted_proxies": ["127.0.0.0/8"]},
                             orchestration={"mode": "queue", "queue_max": 10, "queue_interval_seconds": 60})
    flood = await asyncio.gather(*(forwarded(http, conn, "203.0.113.7") for _ in range(20)))
    other = await forwarded(http, conn, "198.51.100.1")
    for i, p in enumerate(flood):
        await p.send(type="input", prompt=f"a volcano number {i}")
    results = [await p.next("input_result") for p in flood]
    # The first input went out at once (an empty queue forwards at the next tick), so up to 8 wait.
    assert 7 <= sum(r["status"] == "queued" for r in results) <= 8
    refused = [r for r in results if r["status"] == "rejected"]
    assert refused and all(r["reason"] == "rate_limited" and r["code"] == "RATE_LIMITED" for r in refused)
    assert all(r["retry_after"] == 60 for r in refused)  # one queue interval
    await other.send(type="input", prompt="a glacier")
    assert (await other.next("input_result"))["status"] == "queued"
    await asyncio.gather(*(p.ws.close() for p in [*flood, other]))


async def test_an_address_at_its_max_sockets_cannot_fill_the_ballot(live, http):
    relay, conn = await live(limits={"events_sockets_per_address": 20}, server={"trusted_proxies": ["127.0.0.0/8"]},
                             orchestration={"mode": "vote", "max_candidates": 10, "vote_window_seconds": 60})
    flood = await asyncio.gather(*(forwarded(http, conn, "203.0.113.7") for _ in range(20)))
    other = await forwarded(http, conn, "198.51.100.1")
    for i, p in enumerate(flood):
        await p.send(type="input", prompt=f"a volcano number {i}")
    results = [await p.next("input_result") for p in flood]
    assert sum(r["status"] == "candidate" for r in results) == 5 + 5 // 2  # upper half + its share of the lower
    refused = [r for r in results if r["status"] == "rejected"]
    assert all(r["reason"] == "rate_limited" and r["code"] == "RATE_LIMITED" and 0 < r["retry_after"] <= 60
               for r in refused)
    await other.send(type="input", prompt="a glacier")
    assert (await other.next("input_result"))["status"] == "candidate"
    await asyncio.gather(*(p.ws.close() for p in [*flood, other]))


async def test_turns_alternate_between_addresses_not_the_first_address_line(live, http):
    relay, conn = await live(server={"trusted_proxies": ["127.0.0.0/8"]},
                             orchestration={"mode": "turns", "turn_seconds": 60})
    flood = [await forwarded(http, conn, "203.0.113.7") for _ in range(3)]
    other = await forwarded(http, conn, "198.51.100.1")
    for p in [*flood, other]:  # the flooder's hands first
        await p.send(type="raise_hand")
        assert (await p.next("turn_result"))["status"] == "raised"

    async def holder() -> str:
        async with http.get(conn.broadcast["webrtc_url"] + "/orchestration", headers=HOST) as r:
            return (await r.json())["turn"]["holder"]["participant_id"]

    assert await holder() == flood[0].hello["participant_id"]
    await flood[0].send(type="release_turn")
    assert (await flood[0].next("turn_result"))["status"] == "released"
    assert await holder() == other.hello["participant_id"]  # not flood[1]: the other address's turn
    await asyncio.gather(*(p.ws.close() for p in [*flood, other]))


# -------------------------------------------------------------------------------------------- invites

async def test_invite_only_refuses_the_uninvited_and_an_invite_is_one_resumable_identity(live, http):
    relay, conn = await live(orchestration={"mode": "queue", "cooldown_seconds": 0})
    invites_url = conn.broadcast["webrtc_url"] + "/invites"
    async with http.post(invites_url, json={"count": 2}, headers=HOST) as r:
        assert r.status == 201
        minted = (await r.json())["invites"]
    assert len(minted) == 2 and minted[0]["invite"] != minted[1]["invite"]
    assert minted[0]["watch_url"].endswith(f"&invite={minted[0]['invite']}")
    token = conn.broadcast["spectator_token"]
    async with http.post(invites_url, json={"count": 1}, headers={"Authorization": f"Bearer {token}"}) as r:
        assert r.status == 403  # a spectator cannot mint
    async with http.post(invites_url, json={"count": 0}, headers=HOST) as r:
        assert r.status == 400 and (await r.json())["error"]["details"]["field"] == "count"
    state = await set_mode(http, conn, invite_only=True)
    assert state["settings"]["invite_only"] is True

    guest = await join(http, conn)
    assert guest.hello["invited"] is False
    await guest.send(type="input", prompt="snow")
    refused = await guest.next("input_result")
    assert (refused["reason"], refused["code"]) == ("invite_required", "INVITE_REQUIRED")
    forged = Participant(await http.ws_connect(events_url(conn, invite=minted[0]["participant_id"] + ".0000")))
    assert (await forged.next("hello"))["invited"] is False  # a forged code is no invite

    invited = Participant(await http.ws_connect(events_url(conn, invite=minted[0]["invite"])))
    invited.hello = await invited.next("hello")
    assert invited.hello["participant_id"] == minted[0]["participant_id"] and invited.hello["invited"] is True
    await invited.send(type="input", prompt="snow")
    assert (await invited.next("input_result"))["status"] == "queued"
    # The same code again is the same person: the newer socket takes over, the older is "replaced".
    again = Participant(await http.ws_connect(events_url(conn, invite=minted[0]["invite"])))
    hello = await again.next("hello")
    assert hello["participant_id"] == minted[0]["participant_id"] and hello["resumed"] is True
    await invited.ws.receive()
    assert invited.ws.close_code == 4001
    await again.send(type="input", prompt="rain")
    assert (await again.next("input_result"))["reason"] == "already_queued"  # its queued input is its own
    # Reconnecting with only the resume token keeps the invited identity invited.
    await again.ws.close()
    back = await join(http, conn, resume=hello["resume_token"])
    assert back.hello["invited"] is True
