"""WHEP against a stranger's offers: sizes, candidate floods, unplayable SDP, the close race,
sessions that never connect. Each answer is a 4xx in the error shape and the spectators
already watching keep their frame rate."""

from __future__ import annotations

import asyncio
import gc
import re
import time
import weakref

import aiohttp
import pytest
from aiortc import RTCPeerConnection

from relay import spectators as spectators_module
from relay import metrics
from relay.client import RelayClient, Spectator
from tests.conftest import API_KEY, eventually, frames_for

MIN_FPS = 22


async def live_relay(relay_factory, **limits):
    return await relay_factory(limits={"stream_max_seconds": 60, "idle_timeout_seconds": 60, **limits})


async def make_offer() -> str:
    pc = RTCPeerConnection()
    pc.addTransceiver("video", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


def with_candidates(sdp: str, count: int) -> str:
    """The offer with `count` distinct host candidates in place of its own."""
    lines = [line for line in sdp.splitlines() if not line.startswith("a=candidate:")]
    at = next(i for i, line in enumerate(lines) if line.startswith("a=ice-ufrag:"))
    extra = [f"a=candidate:{k} 1 udp 2130706431 10.{k // 65536 % 256}.{k // 256 % 256}.{k % 256} "
             f"{1024 + k % 60000} typ host" for k in range(count)]
    return "\r\n".join(lines[:at] + extra + lines[at:]) + "\r\n"


def spectators_gauge() -> float:
    return metrics.SPECTATORS._value.get()


async def post(http, b, sdp: str | bytes, **kwargs):
    headers = {"Content-Type": "application/sdp", "Authorization": f"Bearer {b['spectator_token']}"}
    return await http.post(b["whep_url"], data=sdp, headers=headers, **kwargs)


async def assert_error(response, status: int, code: str = "INVALID_REQUEST") -> dict:
    assert response.status == status, await response.text()
    body = await response.json()
    assert set(body["error"]) == {"code", "message", "action", "details"} and body["error"]["code"] == code
    return body["error"]


async def test_offer_flood_leaves_spectators_smooth_and_healthz_quick(relay_factory, http):
    relay = await live_relay(relay_factory, whep_offer_max_bytes=16384)
    offer = await make_offer()
    oversize = with_candidates(offer, 1000)  # ~60 KB: under the server's body limit, over the offer's
    crowded = with_candidates(offer, 200)  # ~12 KB: under the size bound, over 64 candidates
    assert len(oversize) > 50_000 and len(crowded) < 16384
    async with RelayClient(relay.url, API_KEY) as client, client.connect() as conn:
        await conn.start_stream("a calm ocean")
        b = conn.broadcast
        broadcast = relay.sessions.broadcast(b["broadcast_id"])
        async with Spectator(b["whep_url"], b["spectator_token"], session=http) as one, \
                Spectator(b["whep_url"], b["spectator_token"], session=http) as two:
            await asyncio.gather(one.track.recv(), two.track.recv())
            answers: list[int] = []
            health: list[float] = []

            async def flood(body: str, stop: asyncio.Event) -> None:
                while not stop.is_set():
                    async with await post(http, b, body) as r:
                        answers.append(r.status)
                        await assert_error(r, 413 if body is oversize else 422)

            async def probe(stop: asyncio.Event) -> None:
                while not stop.is_set():
                    start = time.perf_counter()
                    async with http.get(relay.url + "/healthz") as r:
                        assert r.status == 200
                    health.append(time.perf_counter() - start)
                    await asyncio.sleep(0.1)

            stop = asyncio.Event()
            attackers = [asyncio.create_task(flood(body, stop)) for body in (oversize, crowded) * 2]
            attackers.append(asyncio.create_task(probe(stop)))
            counts = await asyncio.gather(frames_for(one.track, 2.0), frames_for(two.track, 2.0))
            stop.set()
            await asyncio.gather(*attackers)
            assert [len(c) / 2.0 for c in counts] >= [MIN_FPS, MIN_FPS], [len(c) for c in counts]
            assert len(answers) >= 20 and set(answers) == {413, 422}
            assert max(health) < 0.5, health
            assert len(broadcast.spectators) == 2  # nothing half-joined


async def test_declared_length_over_the_bound_is_refused_before_the_body(relay_factory):
    relay = await live_relay(relay_factory, whep_offer_max_bytes=4096)
    async with RelayClient(relay.url, API_KEY) as client, client.connect() as conn:
        b = conn.broadcast
        path = b["whep_url"][len(relay.url):]
        reader, writer = await asyncio.open_connection(relay.server.host, relay.server.port)
        # Headers only: a relay that waited for the 40,000 promised bytes would never answer.
        writer.write((f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {b['spectator_token']}\r\n"
                      "Content-Type: application/sdp\r\nContent-Length: 40000\r\n\r\n").encode())
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 2)
        writer.close()
        assert status.split()[1] == b"413"


async def test_chunked_offer_over_the_bound_is_refused(relay_factory, http):
    relay = await live_relay(relay_factory, whep_offer_max_bytes=4096)
    offer = await make_offer()

    async def chunks():  # no Content-Length: only reading tells the size
        yield offer.encode()
        for _ in range(10):
            yield b"a=x-padding:" + b"p" * 1000 + b"\r\n"

    async with RelayClient(relay.url, API_KEY) as client, client.connect() as conn:
        b = conn.broadcast
        async with await post(http, b, chunks()) as r:
            error = await assert_error(r, 413)
            assert error["details"] == {"limit_bytes": 4096}
        assert relay.sessions.broadcast(b["broadcast_id"]).spectators == {}


async def test_trickled_candidates_share_the_offers_bound(relay_factory, http):
    relay = await live_relay(relay_factory, whep_offer_max_candidates=8)
    offer = with_candidates(await make_offer(), 6)
    async with RelayClient(relay.url, API_KEY) as client, client.connect() as conn:
        b = conn.broadcast
        async with await post(http, b, offer) as r:
            assert r.status == 201
            location = relay.url + r.headers["Location"]
        headers = {"Content-Type": "application/trickle-ice-sdpfrag"}
        frag = "a=mid:0\r\n" + "".join(f"a=candidate:{k} 1 udp 1 10.9.0.{k} 9 typ host\r\n" for k in range(2))
        async with http.patch(location, data=frag, headers=headers) as r:
            assert r.status == 204
        async with http.patch(location, data="a=mid:0\r\na=candidate:9 1 udp 1 10.9.1.1 9 typ host\r\n",
                              headers=headers) as r:
            error = await assert_error(r, 422)
            assert error["details"] == {"limit": 8, "candidates": 9}
        # Lines ended by a bare CR or U+0085 are lines to the SDP parser too: they count.
        for separator in ("\r", "\x85"):
            frag = separator.join(f"a=candidate:{k} 1 udp 1 10.9.2.{k} 9 typ host" for k in range(5))
            async with http.patch(location, data=frag.encode(), headers=headers) as r:
                assert (await assert_error(r, 422))["details"]["candidates"] >= 8 + 5 - 2


async def test_candidates_behind_odd_line_separators_still_count(relay_factory, http):
    relay = await live_relay(relay_factory, whep_offer_max_candidates=8)
    offer = with_candidates(await make_offer(), 20).replace("\r\n", "\r")  # a bare CR ends SDP lines too
    async with RelayClient(relay.url, API_KEY) as client, client.connect() as conn:
        async with await post(http, conn.broadcast, offer) as r:
            assert (await assert_error(r, 422))["details"] == {"limit": 8, "candidates": 20}


def _drop_lines(sdp: str, prefix: str) -> str:
    return "".join(line + "\r\n" for line in sdp.splitlines() if not line.startswith(prefix))


def _video_direction(sdp: str, direction: str) -> str:
    return sdp.replace("a=recvonly", f"a={direction}")


UNPLAYABLE = {
    "no fingerprint": lambda sdp: _drop_lines(sdp, "a=fingerprint:"),
    "inactive": lambda sdp: _video_direction(sdp, "inactive"),
    "sendonly": lambda sdp: _video_direction(sdp, "sendonly"),
    "port 0": lambda sdp: re.sub(r"^m=video \d+", "m=video 0", sdp, flags=re.M),
}


@pytest.mark.parametrize("case", list(UNPLAYABLE))
async def test_unplayable_offer_is_422_and_takes_no_slot(relay_factory, http, case):
    relay = await live_relay(relay_factory)
    offer = UNPLAYABLE[case](await make_offer())
    gauge = spectators_gauge()
    async with RelayClient(relay.url, API_KEY) as client, client.connect() as conn:
        b = conn.broadcast
        async with await post(http, b, offer) as r:
            await assert_error(r, 422)
        broadcast = relay.sessions.broadcast(b["broadcast_id"])
        assert broadcast.spectators == {} and broadcast.spectators._joins == {} and spectators_gauge() == gauge


async def test_malformed_offer_message_names_the_fault(relay_factory, http):
    relay = await live_relay(relay_factory)
    async with RelayClient(relay.url, API_KEY) as client, client.connect() as conn:
        # aiortc's parser fails on the port with a bare AssertionError (an empty message).
        async with await post(http, conn.broadcast, "v=0\r\nm=video x UDP/TLS/RTP/SAVPF 96\r\n") as r:
            error = await assert_error(r, 400)
        assert error["message"] == "Malformed SDP offer: AssertionError."


@pytest.mark.parametrize("held", ["before answering", "after answering"])
async def test_join_racing_the_close_leaves_no_peer(relay_factory, http, monkeypatch, held):
    relay = await live_relay(relay_factory)
    reached, release = asyncio.Event(), asyncio.Event()
    server_pcs: weakref.WeakSet[RTCPeerConnection] = weakref.WeakSet()
    answer = spectators_module.answer_spectator

    async def gated(*args, **kwargs):
        # The gate holds the join at one of its awaits while the connection closes.
        if held == "before answering":
            reached.set()
            await release.wait()
        peer = await answer(*args, **kwargs)
        server_pcs.add(peer.pc)
        if held == "after answering":
            reached.set()
            await release.wait()
        return peer

    monkeypatch.setattr(spectators_module, "answer_spectator", gated)
    gauge = spectators_gauge()
    offer = await make_offer()
    async with RelayClient(relay.url, API_KEY) as client, client.connect() as conn:
        b = conn.broadcast
        broadcast = relay.sessions.broadcast(b["broadcast_id"])
        joining = asyncio.create_task(post(http, b, offer))
        await asyncio.wait_for(reached.wait(), 5)
        closing = asyncio.create_task(conn.disconnect())
        await eventually(lambda: broadcast.closed, what="the broadcast closing")
        release.set()
        response = await asyncio.wait_for(joining, 5)
        async with response:
            error = await assert_error(response, 404, "NOT_FOUND")
            assert "broadcast" in error["message"]
        await asyncio.wait_for(closing, 5)
    assert broadcast.spectators == {} and broadcast.spectators._joins == {}
    assert spectators_gauge() == gauge

    def no_pc_left() -> bool:
        gc.collect()
        return all(pc.connectionState == "closed" for pc in server_pcs) and not list(server_pcs)

    await eventually(no_pc_left, timeout=5, what="the relay's peer connections gone")


def candidate_less(sdp: str) -> str:
    """An offer that can never finish ICE: no candidates, and none will be trickled."""
    return _drop_lines(_drop_lines(sdp, "a=candidate:"), "a=end-of-candidates")


@pytest.fixture
async def neighbour():
    """An HTTP client on another loopback address (127.0.0.2): a second address for the caps."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))) as session:
        yield session


async def test_pending_sessions_are_capped_per_address_and_hold_no_seat(relay_factory, http, neighbour):
    relay = await live_relay(relay_factory, pending_whep_per_address=2, spectators_per_broadcast=3,
                             whep_connect_seconds=30)
    offer = candidate_less(await make_offer())
    gauge = spectators_gauge()
    async with RelayClient(relay.url, API_KEY) as client, client.connect() as conn:
        await conn.start_stream("a calm ocean")
        b = conn.broadcast
        broadcast = relay.sessions.broadcast(b["broadcast_id"])
        statuses = []
        for r in await asyncio.gather(*(post(http, b, offer) for _ in range(3))):
            async with r:
                statuses.append(r.status)
                if r.status == 429:
                    error = await assert_error(r, 429, "RATE_LIMITED")
                    assert error["details"] == {"limit": 2}
                    assert 1 <= int(r.headers["Retry-After"]) <= 30
        assert sorted(statuses) == [201, 201, 429]
        assert len(broadcast.spectators) == 2 and broadcast.viewers == 0 and spectators_gauge() == gauge
        async with http.get(b["webrtc_url"], headers={"Authorization": f"Bearer {b['spectator_token']}"}) as r:
            assert (await r.json())["spectators"] == 0
        # From another address, real spectators take all 3 seats beside the 2 pending sessions,
        # and watch smoothly.
        viewers = []
        for seat in (1, 2, 3):
            viewer = Spectator(b["whep_url"], b["spectator_token"], session=neighbour)
            await viewer.join()
            viewers.append(viewer)
            await eventually(lambda: broadcast.viewers == seat, what=f"spectator {seat} connected")
        try:
            assert len(broadcast.spectators) == 5 and spectators_gauge() == gauge + 3
            counts = await asyncio.gather(*(frames_for(v.track, 2.0) for v in viewers))
            assert [len(c) / 2.0 for c in counts] >= [MIN_FPS] * 3, [len(c) for c in counts]
        finally:
            for viewer in viewers:
                await viewer.leave()


async def test_session_that_never_connects_is_dropped_at_the_deadline(relay_factory, http):
    relay = await live_relay(relay_factory, pending_whep_per_address=3, whep_connect_seconds=1)
    offer = candidate_less(await make_offer())
    async with RelayClient(relay.url, API_KEY) as client, client.connect() as conn:
        await conn.start_stream("a calm ocean")
        b = conn.broadcast
        broadcast = relay.sessions.broadcast(b["broadcast_id"])
        async with Spectator(b["whep_url"], b["spectator_token"], session=http) as viewer:
            await eventually(lambda: broadcast.viewers == 1, what="the spectator connected")
            pending = []
            for _ in range(3):
                async with await post(http, b, offer) as r:
                    assert r.status == 201
                    pending.append(relay.url + r.headers["Location"])
            async with await post(http, b, offer) as r:
                await assert_error(r, 429, "RATE_LIMITED")
            assert len(broadcast.spectators) == 4 and broadcast.viewers == 1
            frames = await frames_for(viewer.track, 2.0)  # the pending sessions' deadline passes meanwhile
            assert len(frames) / 2.0 >= MIN_FPS, len(frames)
            await eventually(lambda: len(broadcast.spectators) == 1, timeout=3, what="pending sessions dropped")
            async with http.delete(pending[0]) as r:
                await assert_error(r, 404, "NOT_FOUND")
            # The address's slots are free again: a real spectator joins and plays.
            async with Spectator(b["whep_url"], b["spectator_token"], session=http) as late:
                await asyncio.wait_for(late.track.recv(), 10)
                await eventually(lambda: broadcast.viewers == 2, what="the late spectator connected")


async def test_one_address_holds_at_most_spectators_per_address_seats(relay_factory, http, neighbour):
    # Seats are first come first served: one address (connected or still connecting) must not take them all.
    relay = await live_relay(relay_factory, spectators_per_address=2, spectators_per_broadcast=4)
    offer = candidate_less(await make_offer())
    async with RelayClient(relay.url, API_KEY) as client, client.connect() as conn:
        await conn.start_stream("a calm ocean")
        b = conn.broadcast
        broadcast = relay.sessions.broadcast(b["broadcast_id"])
        viewer = Spectator(b["whep_url"], b["spectator_token"], session=http)
        await viewer.join()
        try:
            await eventually(lambda: broadcast.viewers == 1, what="the first spectator connected")
            async with await post(http, b, offer) as r:  # a pending session is a seat held too
                assert r.status == 201
                pending = r.headers["Location"]
            async with await post(http, b, offer) as r:
                error = await assert_error(r, 429, "RATE_LIMITED")
                assert error["details"] == {"limit": 2} and r.headers["Retry-After"] == "10"
            async with neighbour.post(b["whep_url"], data=offer, headers={
                    "Content-Type": "application/sdp", "Authorization": f"Bearer {b['spectator_token']}"}) as r:
                assert r.status == 201  # another address still finds the seats the first one could not take
            # A seat given back (DELETE) is the address's to take again.
            url = pending if pending.startswith("http") else relay.url + pending
            async with http.delete(url, headers={"Authorization": f"Bearer {b['spectator_token']}"}) as r:
                assert r.status in (200, 204)
            async with await post(http, b, offer) as r:
                assert r.status == 201
        finally:
            await viewer.leave()
