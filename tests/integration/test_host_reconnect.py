"""A host whose console reloads keeps the broadcast: the control socket's close is not the end.

The connection lives until an explicit DELETE or the reaper's idle timeout (from config); spectators
keep receiving meanwhile, and the audience is told the host is reconnecting, then which way it ended.
"""

from __future__ import annotations

import aiohttp

from relay.client import Spectator
from tests.conftest import API_KEY, eventually, frames_for


async def receive_until(ws: aiohttp.ClientWebSocketResponse, kind: str, timeout: float = 5) -> dict:
    """The next event of type ``kind`` on an events socket, skipping the others (viewers, ...)."""
    while True:
        msg = await ws.receive_json(timeout=timeout)
        if msg["type"] == kind:
            return msg


async def open_live(http: aiohttp.ClientSession, url: str) -> tuple[dict, aiohttp.ClientWebSocketResponse]:
    async with http.post(f"{url}/v1/connections", headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        assert r.status == 201
        conn = await r.json()
    control = await http.ws_connect(f"{conn['control_url']}?token={conn['client_token']}")
    assert (await control.receive_json(timeout=5))["type"] == "connected"
    await control.send_json({"type": "start_stream", "prompt": "a lighthouse"})
    await receive_until(control, "stream_started", timeout=10)
    return conn, control


def events_url(conn: dict) -> str:
    b = conn["broadcast"]
    return b["webrtc_url"].replace("http://", "ws://", 1) + f"/events?token={b['spectator_token']}"


async def test_control_socket_loss_keeps_the_broadcast_until_the_idle_timeout(relay_factory, http):
    relay = await relay_factory(limits={"idle_timeout_seconds": 2, "stream_max_seconds": 30})
    conn, control = await open_live(http, relay.url)
    events = await http.ws_connect(events_url(conn))
    hello = await events.receive_json(timeout=5)
    assert hello["host"] == "connected" and hello["live"] is True
    b = conn["broadcast"]
    async with Spectator(b["whep_url"], b["spectator_token"]) as viewer:
        await control.close()  # the console reloads
        assert (await receive_until(events, "host"))["host"] == "reconnecting"
        assert len(await frames_for(viewer.track, 1.0)) >= 10  # still watching while the host is away
        assert conn["connection_id"] in relay.sessions.connections
        async with http.get(b["webrtc_url"], params={"token": b["spectator_token"]}) as r:
            assert (await r.json())["host"] == "reconnecting"

        # The reloaded console comes back with the same client token: same connection, same stream.
        control = await http.ws_connect(f"{conn['control_url']}?token={conn['client_token']}")
        assert (await control.receive_json(timeout=5))["type"] == "connected"
        assert (await control.receive_json(timeout=5))["type"] == "stream_started"
        assert (await receive_until(events, "host"))["host"] == "connected"
        assert len(await frames_for(viewer.track, 0.5)) >= 5

        # Gone for good: the reaper ends it after the idle timeout, and says why.
        await control.close()
        assert (await receive_until(events, "host"))["host"] == "reconnecting"
        ended = await receive_until(events, "disconnected", timeout=2 + 3)
        assert ended["reason"] == "idle_timeout"
    await eventually(lambda: conn["connection_id"] not in relay.sessions.connections, timeout=5,
                     what="the connection closed")
    await events.close()


async def test_audience_learns_a_shutdown_apart_from_the_hosts_end(relay_factory, http):
    relay = await relay_factory()
    ended_by_host, control = await open_live(http, relay.url)
    restarted, other = await open_live(http, relay.url)
    host_events = await http.ws_connect(events_url(ended_by_host))
    shutdown_events = await http.ws_connect(events_url(restarted))
    await host_events.receive_json(timeout=5)
    await shutdown_events.receive_json(timeout=5)

    async with http.delete(f"{relay.url}/v1/connections/{ended_by_host['connection_id']}",
                           headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        assert r.status == 204
    assert (await receive_until(host_events, "disconnected"))["reason"] == "disconnected"

    await relay.sessions.close()  # what `relay serve` does on SIGTERM
    assert (await receive_until(shutdown_events, "disconnected"))["reason"] == "shutdown"
    closing = await shutdown_events.receive(timeout=5)
    assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == 1001  # going away, not "closed"
    for ws in (control, other, host_events, shutdown_events):
        await ws.close()
