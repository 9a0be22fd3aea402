"""Host API contract on a real server: status codes, error bodies, limits, the control socket."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from tests.conftest import API_KEY, OTHER_KEY, eventually


def auth(key: str = API_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def error_of(response: aiohttp.ClientResponse) -> dict:
    body = await response.json()
    assert set(body["error"]) >= {"code", "message", "action", "details"}
    return body["error"]


async def open_connection(http, relay, key: str = API_KEY) -> dict:
    async with http.post(f"{relay.url}/v1/connections", headers=auth(key)) as r:
        assert r.status == 201, await r.text()
        return await r.json()


async def test_connection_shape_and_state(relay, http):
    conn = await open_connection(http, relay)
    assert conn["status"] == "connected"
    assert conn["idle_timeout_seconds"] == 10
    assert conn["client_token_expires_in"] == 600
    b = conn["broadcast"]
    assert b["webrtc_url"] == f"{relay.url}/v1/broadcasts/{b['broadcast_id']}"
    assert b["whep_url"] == b["webrtc_url"] + "/whep"
    assert b["watch_url"] == f"{relay.url}/watch/{b['broadcast_id']}?token={b['spectator_token']}"
    assert b["hls_url"] == f"{b['webrtc_url']}/hls/index.m3u8?token={b['spectator_token']}"
    assert conn["control_url"].startswith("ws://")
    async with http.get(f"{relay.url}/v1/connections/{conn['connection_id']}", headers=auth()) as r:
        state = await r.json()
        assert r.status == 200 and state["stream"] is None and state["streams_started"] == 0


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic x"}])
async def test_missing_or_wrong_key_is_401(relay, http, headers):
    async with http.post(f"{relay.url}/v1/connections", headers=headers) as r:
        assert r.status == 401
        assert (await error_of(r))["code"] == "UNAUTHORIZED"


async def test_other_keys_connection_is_403_and_unknown_is_404(relay, http):
    conn = await open_connection(http, relay)
    async with http.get(f"{relay.url}/v1/connections/{conn['connection_id']}", headers=auth(OTHER_KEY)) as r:
        assert r.status == 403 and (await error_of(r))["code"] == "FORBIDDEN"
    async with http.get(f"{relay.url}/v1/connections/nope", headers=auth()) as r:
        assert r.status == 404 and (await error_of(r))["code"] == "NOT_FOUND"
    async with http.get(f"{relay.url}/v1/connections/nope") as r:
        assert r.status == 401
    async with http.get(f"{relay.url}/v1/streams/nope", headers=auth()) as r:
        assert r.status == 404


async def test_client_token_drives_only_its_connection(relay, http):
    mine = await open_connection(http, relay)
    other = await open_connection(http, relay)
    token = {"Authorization": f"Bearer {mine['client_token']}"}
    async with http.post(f"{relay.url}/v1/connections/{mine['connection_id']}/streams", json={"prompt": "sea"},
                         headers=token) as r:
        assert r.status == 201
    async with http.get(f"{relay.url}/v1/connections/{other['connection_id']}", headers=token) as r:
        assert r.status == 401
    async with http.post(f"{relay.url}/v1/connections", headers=token) as r:
        assert r.status == 401  # a client token cannot open connections


async def test_stream_conflicts_and_limits(relay_factory, http):
    relay = await relay_factory(limits={"streamers": 2, "concurrent_streams": 1})
    first = await open_connection(http, relay)
    second = await open_connection(http, relay)
    # The streamer pool is exhausted: 503 with Retry-After.
    async with http.post(f"{relay.url}/v1/connections", headers=auth()) as r:
        assert r.status == 503 and "Retry-After" in r.headers
        assert (await error_of(r))["code"] == "STREAMER_NOT_AVAILABLE"
    url = f"{relay.url}/v1/connections/{first['connection_id']}/streams"
    async with http.post(url, json={"prompt": "a forest"}, headers=auth()) as r:
        assert r.status == 201
        stream_id = (await r.json())["stream_id"]
    async with http.post(url, json={"prompt": "again"}, headers=auth()) as r:
        assert r.status == 409 and (await error_of(r))["code"] == "STREAM_ALREADY_ACTIVE"
    # Over concurrent_streams for this key: 429, details, Retry-After.
    async with http.post(f"{relay.url}/v1/connections/{second['connection_id']}/streams",
                         json={"prompt": "a desert"}, headers=auth()) as r:
        assert r.status == 429 and int(r.headers["Retry-After"]) >= 1
        err = await error_of(r)
        assert err["code"] == "CONCURRENT_LIMIT_REACHED" and err["details"] == {"active_count": 1, "limit": 1}
    # Ending it frees the slot; ending twice is 409.
    async with http.delete(f"{relay.url}/v1/streams/{stream_id}", headers=auth()) as r:
        body = await r.json()
        assert r.status == 200 and body["end_reason"] == "ended" and body["stream_id"] == stream_id
    async with http.delete(f"{relay.url}/v1/streams/{stream_id}", headers=auth()) as r:
        assert r.status == 409 and (await error_of(r))["code"] == "NO_ACTIVE_STREAM"
    async with http.post(f"{relay.url}/v1/streams/{stream_id}/interact", json={"prompt": "x"}, headers=auth()) as r:
        assert r.status == 409 and (await error_of(r))["code"] == "NO_ACTIVE_STREAM"
    # Disconnect frees the streamer at once.
    async with http.delete(f"{relay.url}/v1/connections/{first['connection_id']}", headers=auth()) as r:
        assert r.status == 204
    await open_connection(http, relay)


@pytest.mark.parametrize(
    "body, status",
    [
        (b"{not json", 400),
        (b"[1, 2]", 400),
        (b'{"prompt": ""}', 422),
        (b'{"prompt": 5}', 422),
        (b'{"prompt": "x", "portrait": "yes"}', 400),
        (b'{"prompt": "x", "image": "***"}', 400),
    ],
)
async def test_bad_stream_requests(relay, http, body, status):
    conn = await open_connection(http, relay)
    async with http.post(f"{relay.url}/v1/connections/{conn['connection_id']}/streams", data=body,
                         headers={**auth(), "Content-Type": "application/json"}) as r:
        assert r.status == status
        await error_of(r)
    state = relay.sessions.connection(conn["connection_id"])
    assert state.stream is None  # nothing half-started


async def test_huge_body_is_413(relay, http):
    conn = await open_connection(http, relay)
    big = b'{"prompt": "' + b"x" * (128 * 1024) + b'"}'
    async with http.post(f"{relay.url}/v1/connections/{conn['connection_id']}/streams", data=big,
                         headers={**auth(), "Content-Type": "application/json"}) as r:
        assert r.status == 413
        await error_of(r)


async def test_wrong_content_type_is_415(relay, http):
    conn = await open_connection(http, relay)
    async with http.post(f"{relay.url}/v1/connections/{conn['connection_id']}/streams", data="prompt=x",
                         headers={**auth(), "Content-Type": "application/x-www-form-urlencoded"}) as r:
        assert r.status == 415


async def test_control_socket_drives_a_stream(relay_factory, http):
    # A 1.5 s cap (not the fixtures' 3 s) for the second stream to reach; the first is ended long before.
    relay = await relay_factory(limits={"stream_max_seconds": 1.5})
    conn = await open_connection(http, relay)
    url = f"{conn['control_url']}?token={conn['client_token']}"
    async with http.ws_connect(url) as ws:
        hello = await ws.receive_json(timeout=5)
        assert hello["type"] == "connected" and hello["connection_id"] == conn["connection_id"]
        await ws.send_json({"type": "start_stream", "prompt": "a snowy forest"})
        started = await ws.receive_json(timeout=5)
        assert started["type"] == "stream_started" and started["prompt"] == "a snowy forest"
        assert (await ws.receive_json(timeout=5))["type"] == "broadcast_ready"
        await ws.send_json({"type": "interact", "prompt": "night"})
        assert await ws.receive_json(timeout=5) == {"type": "interact_acknowledged", "prompt": "night"}
        await ws.send_json({"type": "start_stream", "prompt": "again"})
        err = await ws.receive_json(timeout=5)
        assert err["type"] == "error" and err["code"] == "STREAM_ALREADY_ACTIVE" and err["fatal"] is False
        await ws.send_str("not json")
        assert (await ws.receive_json(timeout=5))["code"] == "INVALID_REQUEST"
        await ws.send_json({"type": "end_stream"})
        ended = await ws.receive_json(timeout=5)
        assert ended == {"type": "stream_ended", "stream_id": started["stream_id"], "reason": "ended"}
        # The stream that ends itself by the cap is announced too.
        await ws.send_json({"type": "start_stream", "prompt": "short"})
        second = await ws.receive_json(timeout=5)
        await ws.receive_json(timeout=5)  # broadcast_ready
        ended = await ws.receive_json(timeout=4.5)
        assert ended == {"type": "stream_ended", "stream_id": second["stream_id"], "reason": "duration_limit"}


async def test_control_socket_rejects_wrong_token(relay, http):
    conn = await open_connection(http, relay)
    with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
        async with http.ws_connect(f"{conn['control_url']}?token=wrong"):
            pass
    assert exc.value.status == 401


async def test_control_socket_refreshes_the_client_token_before_it_runs_out(relay_factory, http):
    # A browser host that holds only a client_token must be able to reopen its control socket
    # (and its preview) long after the first token's life: it asks for fresh ones as it goes.
    relay = await relay_factory(limits={"client_token_seconds": 2})
    conn = await open_connection(http, relay)
    first = conn["client_token"]
    async with http.ws_connect(f"{conn['control_url']}?token={first}") as ws:
        assert (await ws.receive_json(timeout=5))["type"] == "connected"
        await ws.send_json({"type": "refresh_token"})
        fresh = await ws.receive_json(timeout=5)
        assert fresh["type"] == "client_token" and fresh["client_token"] == first  # still young
        assert 0 < fresh["client_token_expires_in"] <= 2

        async def refreshed() -> bool:
            await ws.send_json({"type": "refresh_token"})
            return (await ws.receive_json(timeout=5))["client_token"] != first
        await eventually(refreshed, timeout=5, what="a new client_token past half the first one's life")
        second = relay.sessions.connections[conn["connection_id"]].client_token
    await eventually(lambda: relay.sessions.connection_for_client_token(first) is None, timeout=5,
                     what="the first token's end")
    state_url = f"{relay.url}/v1/connections/{conn['connection_id']}"
    async with http.post(f"{state_url}/streams", json={"prompt": "a quiet lake"}, headers=auth(second)) as r:
        assert r.status == 201
        stream_url = f"{relay.url}/v1/streams/{(await r.json())['stream_id']}"
    for url in (state_url, stream_url):  # an expired token opens nothing, a fresh one does
        async with http.get(url, headers=auth(first)) as r:
            assert r.status == 401, url
        async with http.get(url, headers=auth(second)) as r:
            assert r.status == 200, url
    async with http.ws_connect(f"{conn['control_url']}?token={second}") as ws:
        assert (await ws.receive_json(timeout=5))["type"] == "connected"
    with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
        async with http.ws_connect(f"{conn['control_url']}?token={first}"):
            pass
    assert exc.value.status == 401


async def test_open_control_socket_keeps_connection_alive_and_its_loss_reaps(relay_factory, http):
    relay = await relay_factory(limits={"idle_timeout_seconds": 0.6, "streamers": 1})
    conn = await open_connection(http, relay)
    ws = await http.ws_connect(f"{conn['control_url']}?token={conn['client_token']}")
    await ws.receive_json(timeout=5)
    for _ in range(10):  # 1 s, longer than the idle timeout: the open socket is a sign of life
        await asyncio.sleep(0.1)
        assert conn["connection_id"] in relay.sessions.connections
    await ws.close()  # the host vanishes
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while conn["connection_id"] in relay.sessions.connections and loop.time() < deadline:
        await asyncio.sleep(0.05)
    assert conn["connection_id"] not in relay.sessions.connections
    assert relay.sessions.streamers_free == 1


async def test_vanished_rest_host_is_reaped_and_keepalive_prevents_it(relay_factory, http):
    relay = await relay_factory(limits={"idle_timeout_seconds": 0.6})
    kept = await open_connection(http, relay)
    lost = await open_connection(http, relay)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 1.1  # the idle timeout and a reaper tick, with room
    while loop.time() < deadline:
        async with http.post(f"{relay.url}/v1/connections/{kept['connection_id']}/keepalive", headers=auth()) as r:
            assert r.status == 204
        await asyncio.sleep(0.2)  # a keepalive pace (as a client's) well inside the idle timeout
    assert lost["connection_id"] not in relay.sessions.connections
    assert kept["connection_id"] in relay.sessions.connections


async def test_operations_endpoints(relay, http):
    async with http.get(f"{relay.url}/healthz") as r:
        assert r.status == 200
    async with http.get(f"{relay.url}/readyz") as r:
        assert r.status == 200
    await open_connection(http, relay)
    async with http.get(f"{relay.url}/metrics") as r:
        text = await r.text()
        assert r.status == 200 and "relay_connections" in text and "relay_spectators" in text


async def test_unknown_route_is_json_404(relay, http):
    async with http.get(f"{relay.url}/v1/nothing-here") as r:
        assert r.status == 404 and (await error_of(r))["code"] == "NOT_FOUND"
