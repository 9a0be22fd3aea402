"""The twin of the hosted world-model API (/odyssey), driven by a Python client that makes exactly the
SDK's calls in the SDK's order (`@odysseyml/odyssey` 1.3.1): token, regions, session request, session
token, {signalling_url}/config, the signalling socket, the relay's offer answered by aiortc (its
candidates trickled, as a browser does), the two data channels.
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any
from urllib.parse import quote

import aiohttp
import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from relay.client import Spectator
from relay.worldmodel import hosted_protocol as protocol
from relay.odyssey.server import TWIN
from relay.web import SETTINGS
from tests.conftest import API_KEY, OTHER_KEY, eventually, frames_for, mean_rgb

LONG = {"stream_max_seconds": 30, "idle_timeout_seconds": 30}


class HostedAPIError(Exception):
    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"{status}: {body}")
        self.status, self.body = status, body


class SdkLikeClient:
    """What Odyssey.connect() / startStream() / interact() / endStream() / disconnect() put on the wire."""

    def __init__(self, http: aiohttp.ClientSession, relay_url: str, api_key: str) -> None:
        self.http = http
        self.api_url = relay_url + "/odyssey"
        self.api_key = api_key
        self.access_token: str | None = None
        self.session_id: str | None = None
        self.signalling_url: str | None = None
        self.capabilities: dict[str, Any] = {}
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.pc: RTCPeerConnection | None = None
        self.track = None
        self.channels: dict[str, Any] = {}
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()  # streamerToClient
        self.signals: asyncio.Queue[dict[str, Any]] = asyncio.Queue()  # socket messages after the offer
        self._reader: asyncio.Task | None = None

    async def call(self, method: str, path: str, *, auth: bool = True, **kwargs: Any) -> Any:
        headers = {"Authorization": f"Bearer {self.access_token}"} if auth else {}
        async with self.http.request(method, self.api_url + path, headers=headers, **kwargs) as r:
            body = await r.json(content_type=None)
            if r.status >= 400:
                raise HostedAPIError(r.status, body)
            return body

    async def authenticate(self) -> None:
        data = await self.call("POST", "/auth/token", auth=False, json={"api_key": self.api_key})
        assert data["expires_in"] > 60
        self.access_token = data["access_token"]

    async def request_session(self) -> None:
        assert (await self.call("GET", "/regions")) == {"regions": []}
        data = await self.call("POST", "/sessions/request", json={})
        self.session_id, self.signalling_url = data["session_id"], data["signalling_url"]
        self.capabilities = data["capabilities"]

    async def session_token(self) -> str:
        data = await self.call("POST", "/sessions/token", json={"session_id": self.session_id})
        assert protocol.session_id_of(data["session_token"]) == self.session_id  # the SDK's extractSessionId
        return data["session_token"]

    async def open_signalling(self, token: str) -> None:
        async with self.http.get(self.signalling_url + "/config") as r:
            assert (await r.json())["iceServers"] == []
        url = self.signalling_url.replace("http://", "ws://", 1) + f"/client/{self.session_id}?token={quote(token)}"
        self.ws = await self.http.ws_connect(url)

    async def connect(self) -> None:
        await self.authenticate()
        await self.request_session()
        await self.open_signalling(await self.session_token())
        offer = await self.ws.receive_json(timeout=10)
        assert offer["type"] == "offer"
        await self.answer(offer["sdp"])
        self._reader = asyncio.create_task(self._read_socket())
        await asyncio.wait_for(self._ready(), 10)

    async def answer(self, offer_sdp: str) -> None:
        pc = self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        opened = self._opened = asyncio.Event()

        @pc.on("track")
        def on_track(track) -> None:
            if track.kind == "video":
                self.track = track

        @pc.on("datachannel")
        def on_channel(channel) -> None:
            self.channels[channel.label] = channel
            if channel.label == protocol.STREAMER_TO_CLIENT:
                channel.on("message", lambda data: self.events.put_nowait(json.loads(data)))
            if channel.label == protocol.CLIENT_TO_STREAMER:
                opened.set()  # the relay created it: it arrives open

        await pc.setRemoteDescription(RTCSessionDescription(offer_sdp, "offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        # A browser's answer carries no candidates; they follow one by one as ice_candidate.
        lines = pc.localDescription.sdp.splitlines()
        candidates = [line[2:] for line in lines if line.startswith("a=candidate:")]
        bare = "\r\n".join(line for line in lines
                           if not line.startswith("a=candidate:") and line != "a=end-of-candidates") + "\r\n"
        await self.ws.send_json({"type": "answer", "sdp": bare})
        for candidate in candidates:
            await self.ws.send_json({"type": "ice_candidate", "candidate": candidate, "sdpMid": "0",
                                     "sdpMLineIndex": 0})

    async def _ready(self) -> None:
        while not (self.pc.connectionState == "connected" and self.track is not None and self._opened.is_set()):
            await asyncio.sleep(0.02)

    async def _read_socket(self) -> None:
        async for msg in self.ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                self.signals.put_nowait(json.loads(msg.data))

    def send(self, message: dict[str, Any]) -> None:
        self.channels[protocol.CLIENT_TO_STREAMER].send(json.dumps(message))

    async def expect(self, kind: str, timeout: float = 10) -> dict[str, Any]:
        while True:
            event = await asyncio.wait_for(self.events.get(), timeout)
            if event["type"] == kind:
                return event
            assert event["type"] not in (protocol.STREAM_ERROR,), event

    async def start_stream(self, prompt: str, *, broadcast: bool = False, portrait: bool = False) -> str:
        self.send({"type": "interactive_stream_start", "prompt": prompt, "portrait": portrait,
                   "broadcast": broadcast})
        return (await self.expect(protocol.STREAM_STARTED))["stream_id"]

    async def disconnect(self) -> None:
        """As the SDK's cleanup(): channels and peer first, then client_disconnecting, then close 1000."""
        if self.pc is not None:
            await self.pc.close()
        if self.ws is not None and not self.ws.closed:
            await self.ws.send_json({"type": "client_disconnecting"})
            await self.ws.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)


async def test_the_sdk_sequence_streams_interacts_broadcasts_and_ends(relay_factory, http):
    relay = await relay_factory(limits={**LONG, "streamers": 1})
    client = SdkLikeClient(http, relay.url, API_KEY)
    await client.connect()
    assert client.capabilities == {"image_to_video": True}
    conn = relay.sessions.connection(client.session_id)  # the session is a relay Connection
    assert relay.sessions.streamers_free == 0 and conn.control_sockets == 1

    stream_id = await client.start_stream("a calm ocean at sunset", broadcast=True)
    ready = await client.expect(protocol.BROADCAST_READY)
    assert ready["webrtc_url"] == f"{relay.url}/v1/broadcasts/{conn.broadcast.broadcast_id}"
    assert ready["spectator_token"] == conn.broadcast.spectator_token
    assert ready["broadcast_url"] == f"{ready['webrtc_url']}/hls/index.m3u8?token={ready['spectator_token']}"  # hlsUrl
    stream = relay.sessions.stream(stream_id)
    assert stream.live and stream.prompt == "a calm ocean at sunset"

    # The owner's video: decoded frames of the broadcast, at the stream's size (portrait false).
    await asyncio.wait_for(client.track.recv(), 10)
    frames = await frames_for(client.track, 1.0)
    assert len(frames) >= 15 and (frames[-1].width, frames[-1].height) == (320, 176)
    # ... and the owner is no spectator: neither counted nor listed.
    assert conn.broadcast.spectators == {} and stream.to_dict()["spectators"] == 0

    # A spectator watches the same broadcast the SDK's way: {webrtc_url}/whep with the token.
    async with Spectator(ready["webrtc_url"] + "/whep", ready["spectator_token"]) as viewer:
        await asyncio.wait_for(viewer.track.recv(), 10)
        assert len(conn.broadcast.spectators) == 1
        before = mean_rgb(frames[-1])
        drift = np.abs(mean_rgb(frames[0]) - before).sum()
        client.send({"type": "update", "prompt": "neon night over a lava desert"})
        ack = await client.expect(protocol.UPDATE_ACKNOWLEDGED)
        assert ack["prompt"] == "neon night over a lava desert"
        assert stream.last_applied_prompt == "neon night over a lava desert"
        changed = 0.0
        for _ in range(75):  # the owner's picture changes (the transition takes about a second)
            changed = np.abs(mean_rgb(await client.track.recv()) - before).sum()
            if changed > max(30.0, 4 * drift):
                break
        assert changed > max(30.0, 4 * drift), (changed, drift)
        assert len(await frames_for(viewer.track, 0.5)) >= 5  # the spectator keeps watching

    # A start while one is live: the core's 409, as the SDK's stream error.
    client.send({"type": "interactive_stream_start", "prompt": "again", "portrait": False, "broadcast": False})
    error = await client.expect(protocol.STREAM_ERROR)
    assert error["reason"] == "stream_already_active"

    client.send({"type": "interactive_stream_end"})
    ended = await client.expect(protocol.STREAM_ENDED)
    assert ended["stream_id"] == stream_id
    assert not stream.live and stream.end_reason == "ended"
    client.send({"type": "update", "prompt": "too late"})
    assert (await client.expect(protocol.STREAM_ERROR))["reason"] == "no_active_stream"

    # The next stream on the same session (over the socket, as the SDK does with an image).
    await client.ws.send_json({"type": "interactive_stream_start", "prompt": "snowy mountains", "portrait": True,
                               "broadcast": False, "input_image_base64": "data:image/png;base64,iVBORw0KGgo="})
    second = (await client.expect(protocol.STREAM_STARTED))["stream_id"]
    assert second != stream_id and relay.sessions.stream(second).portrait
    frame = await asyncio.wait_for(client.track.recv(), 10)
    for _ in range(50):  # frames already in flight may still be landscape
        if (frame.width, frame.height) == (176, 320):
            break
        frame = await client.track.recv()
    assert (frame.width, frame.height) == (176, 320)

    # Keepalives count as signs of life; disconnecting frees the streamer at once.
    await client.ws.send_json({"type": "keepalive"})
    await client.disconnect()
    await eventually(lambda: relay.sessions.streamers_free == 1)
    assert relay.sessions.connections == {}
    assert relay.sessions.stream(second).end_reason == "disconnected"
    assert relay.app[TWIN].live == {}


async def test_stream_duration_limit_reaches_the_sdk(relay_factory, http):
    relay = await relay_factory(limits={"stream_max_seconds": 1, "idle_timeout_seconds": 30})
    client = SdkLikeClient(http, relay.url, API_KEY)
    await client.connect()
    try:
        await client.start_stream("forest")
        error = await client.expect(protocol.STREAM_ERROR, timeout=5)
        assert error["reason"] == "stream_duration_exceeded" and "1 s" in error["message"]
        assert (await client.expect(protocol.STREAM_ENDED))["reason"] == "duration_limit"
    finally:
        await client.disconnect()


async def test_server_side_close_sends_error_then_closes(relay_factory, http):
    relay = await relay_factory(limits=LONG)
    client = SdkLikeClient(http, relay.url, API_KEY)
    await client.connect()
    conn = relay.sessions.connection(client.session_id)
    await relay.sessions.close_connection(conn, "expired")  # as the reaper does at connection_max_seconds
    message = await asyncio.wait_for(client.signals.get(), 5)
    assert message == {"type": "error", "reason": "duration_limit_reached"}
    await asyncio.wait_for(client._reader, 5)  # then the relay closes the socket
    assert client.ws.closed
    await client.disconnect()


async def test_shutdown_tells_the_sdk_and_releases_everything(relay_factory, http):
    relay = await relay_factory(limits=LONG)
    client = SdkLikeClient(http, relay.url, API_KEY)
    await client.connect()
    stream_id = await client.start_stream("forest")
    twin = relay.app[TWIN]
    session = twin.live[client.session_id]
    await relay.server.close()
    assert await asyncio.wait_for(client.signals.get(), 5) == {"type": "error", "reason": "streamer_disconnected"}
    assert twin.live == {} and twin.closing == set() and session.peer.pc.connectionState == "closed"
    assert relay.sessions.connections == {} and relay.sessions.stream(stream_id).end_reason == "disconnected"
    await client.disconnect()


async def test_socket_close_leaves_the_connection_to_the_idle_timeout(relay_factory, http):
    relay = await relay_factory(limits={"stream_max_seconds": 30, "idle_timeout_seconds": 0.6})
    client = SdkLikeClient(http, relay.url, API_KEY)
    await client.connect()
    conn = relay.sessions.connection(client.session_id)
    for _ in range(10):  # 1 s, past the idle timeout: the open socket keeps the connection alive
        await asyncio.sleep(0.1)
        assert not conn.closed
    await client.ws.close()  # gone without client_disconnecting (a tab closed)
    await eventually(lambda: conn.control_sockets == 0, timeout=5)
    assert not conn.closed
    await eventually(lambda: conn.closed, timeout=5)
    assert conn.close_reason == "idle_timeout"
    # A connection reads closed at once; its streamer comes back when the close has run.
    limit = relay.app[SETTINGS].limits.streamers
    await eventually(lambda: relay.sessions.streamers_free == limit, timeout=5, what="the streamer given back")
    await client.disconnect()


async def test_pool_exhausted_is_503_and_frees_for_the_next_poll(relay_factory, http):
    relay = await relay_factory(limits={**LONG, "streamers": 1})
    first = SdkLikeClient(http, relay.url, API_KEY)
    await first.connect()
    second = SdkLikeClient(http, relay.url, API_KEY)
    await second.authenticate()
    with pytest.raises(HostedAPIError) as caught:
        await second.request_session()
    assert caught.value.status == 503  # the SDK keeps polling on exactly this status
    await first.disconnect()
    await eventually(lambda: relay.sessions.streamers_free == 1)
    await second.request_session()  # the next poll gets the freed streamer
    assert second.session_id in relay.sessions.connections


async def test_concurrent_streams_is_a_hosted_usage_error(relay_factory, http):
    relay = await relay_factory(limits={**LONG, "concurrent_streams": 1, "streamers": 3})
    a = SdkLikeClient(http, relay.url, API_KEY)
    b = SdkLikeClient(http, relay.url, API_KEY)
    await a.connect()
    await b.connect()  # opened before the limit was reached: its start meets the core's 429
    try:
        await a.start_stream("forest")
        b.send({"type": "interactive_stream_start", "prompt": "desert", "portrait": False, "broadcast": False})
        error = await b.expect(protocol.STREAM_ERROR)
        assert error["reason"] == "concurrent_limit_reached"

        # A new session at the limit: 429 with the body the SDK turns into ConcurrentLimitReachedError.
        c = SdkLikeClient(http, relay.url, API_KEY)
        await c.authenticate()
        async with http.post(c.api_url + "/sessions/request", json={},
                             headers={"Authorization": f"Bearer {c.access_token}"}) as r:
            assert r.status == 429 and "Retry-After" in r.headers
            assert r.headers["Access-Control-Allow-Origin"] == "*"
            detail = (await r.json())["detail"]
        assert detail["error"] == detail["code"] == "CONCURRENT_LIMIT_REACHED"
        assert detail["details"] == {"active_count": 1, "limit": 1}
        assert detail["message"] and detail["action"]
        assert relay.sessions.streamers_free == 1  # nothing was reserved for it

        # Another key is not limited by this one's streams.
        other = SdkLikeClient(http, relay.url, OTHER_KEY)
        await other.authenticate()
        await other.request_session()
    finally:
        await a.disconnect()
        await b.disconnect()


async def test_credentials_are_checked(relay_factory, http):
    relay = await relay_factory(limits=LONG)
    api = relay.url + "/odyssey"
    async with http.post(api + "/auth/token", json={"api_key": "wrong"}) as r:
        assert r.status == 401  # the SDK: "Invalid API key"
        assert r.headers["Access-Control-Allow-Origin"] == "*"
    async with http.post(api + "/auth/token", json={}) as r:
        assert r.status == 422
    for path in ("/regions", "/stream-recordings", "/simulation-jobs"):
        async with http.get(api + path, headers={"Authorization": f"Bearer {API_KEY}"}) as r:
            assert r.status == 401, path  # the API key itself is no access token
    async with http.post(api + "/sessions/request", json={}) as r:
        assert r.status == 401

    client = SdkLikeClient(http, relay.url, API_KEY)
    await client.authenticate()
    await client.request_session()
    token = await client.session_token()
    ws_base = client.signalling_url.replace("http://", "ws://", 1) + "/client/"

    async def refused(url: str) -> int:
        with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
            await http.ws_connect(url)
        return caught.value.status

    tampered = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    assert await refused(f"{ws_base}{client.session_id}?token={tampered}") == 401
    assert await refused(f"{ws_base}{client.session_id}") == 401
    assert await refused(f"{ws_base}{client.session_id}?token={client.access_token}") == 401  # wrong kind
    assert await refused(f"{ws_base}someone-else?token={token}") == 401  # bound to its session
    claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    assert claims["exp"] - claims["iat"] == 600  # [limits] client_token_seconds
    expired = protocol.jwt_encode({**claims, "exp": claims["iat"] - 1}, relay.app[TWIN].secret)
    assert await refused(f"{ws_base}{client.session_id}?token={expired}") == 401
    ws = await http.ws_connect(f"{ws_base}{client.session_id}?token={token}")  # the real one opens
    assert (await ws.receive_json(timeout=10))["type"] == "offer"
    await ws.close()

    # A valid token for a session that has gone: a readable error at once (no 6 blind retries).
    await relay.sessions.close_connection(relay.sessions.connection(client.session_id))
    ws = await http.ws_connect(f"{ws_base}{client.session_id}?token={token}")
    assert await ws.receive_json(timeout=5) == {"type": "error", "reason": "session_not_found"}
    await ws.receive(timeout=5)
    assert ws.closed

    # Another key's access token does not reach this session.
    other = SdkLikeClient(http, relay.url, OTHER_KEY)
    await other.authenticate()
    with pytest.raises(HostedAPIError) as caught:
        await other.call("POST", "/sessions/token", json={"session_id": client.session_id})
    assert caught.value.status == 404  # the SDK: "Session not found or not authorized"

    # CORS preflight for the SDK's cross-origin calls.
    async with http.options(api + "/sessions/request", headers={
            "Origin": "http://elsewhere.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"}) as r:
        assert r.status == 204
        assert "Authorization" in r.headers["Access-Control-Allow-Headers"]
        assert "DELETE" in r.headers["Access-Control-Allow-Methods"]


async def test_simulations_and_recordings_through_the_hosted_paths(relay_factory, http):
    relay = await relay_factory(limits={**LONG, "pending_simulations": 2})
    client = SdkLikeClient(http, relay.url, API_KEY)
    await client.authenticate()
    script = [{"timestamp_ms": 0, "start": {"prompt": "a calm ocean"}},
              {"timestamp_ms": 500, "interact": {"prompt": "night falls"}},
              {"timestamp_ms": 1000, "end": {}}]
    body = {"script": script, "portrait": False, "output_video": True}  # what simulate() posts
    job = await client.call("POST", "/simulation-jobs", json=body)
    assert job["status"] == "pending" and job["priority"] and "estimated_wait_minutes" in job
    second = await client.call("POST", "/simulation-jobs", json=body)
    with pytest.raises(HostedAPIError) as caught:  # the core's quota: 429 on the one past it
        await client.call("POST", "/simulation-jobs", json=body)
    assert caught.value.status == 429 and caught.value.body["detail"]["code"] == "SIMULATION_QUEUE_FULL"
    with pytest.raises(HostedAPIError) as caught:
        await client.call("POST", "/simulation-jobs", json={"script_url": "https://example.com/s.json"})
    assert caught.value.status == 422

    cancelled = await client.call("DELETE", f"/simulation-jobs/{second['job_id']}")
    assert cancelled == {"job_id": second["job_id"], "status": "cancelled"}
    with pytest.raises(HostedAPIError) as caught:  # not cancellable: 400 with a string detail
        await client.call("DELETE", f"/simulation-jobs/{second['job_id']}")
    assert caught.value.status == 400 and isinstance(caught.value.body["detail"], str)

    listed = await client.call("GET", "/simulation-jobs?status=cancelled&limit=10&offset=0")
    assert [j["job_id"] for j in listed["jobs"]] == [second["job_id"]] and listed["total"] == 1

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 40
    while True:
        status = await client.call("GET", f"/simulation-jobs/{job['job_id']}")
        if status["status"] in ("completed", "failed", "cancelled"):
            break
        assert loop.time() < deadline, status
        await asyncio.sleep(0.3)
    assert status["status"] == "completed", status
    (stream,) = status["streams"]
    assert stream["script_index"] == 0 and stream["frame_count"] > 0

    recording = await client.call("GET", f"/recordings/{stream['stream_id']}")
    assert set(recording) == {"stream_id", "video_url", "events_url", "thumbnail_url", "preview_url",
                              "frame_count", "duration_seconds"}
    async with http.get(recording["video_url"]) as r:  # signed: no Authorization header needed
        assert r.status == 200 and r.content_type == "video/mp4"
    listing = await client.call("GET", "/stream-recordings?limit=5&offset=0")
    assert stream["stream_id"] in [r["stream_id"] for r in listing["recordings"]]
    other = SdkLikeClient(http, relay.url, OTHER_KEY)
    await other.authenticate()
    with pytest.raises(HostedAPIError) as caught:
        await other.call("GET", f"/recordings/{stream['stream_id']}")
    assert caught.value.status == 404


@pytest.mark.parametrize("mode", ["encode-once-sender", "per-spectator"])
async def test_the_owner_sees_video_in_the_other_media_modes(relay_factory, http, mode):
    relay = await relay_factory(limits=LONG, media={"mode": mode})
    client = SdkLikeClient(http, relay.url, API_KEY)
    await client.connect()
    try:
        await client.start_stream("a green forest")
        await asyncio.wait_for(client.track.recv(), 10)
        assert len(await frames_for(client.track, 0.6)) >= 8
        assert relay.sessions.connection(client.session_id).broadcast.media.hub.subscribers == 1  # the owner's track
    finally:
        await client.disconnect()
    await eventually(lambda: relay.sessions.connections == {})
