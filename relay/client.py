"""A small Python client for the relay: host a connection, and watch a broadcast by WHEP.

    async with RelayClient("http://127.0.0.1:8080", api_key) as client:
        async with client.connect() as conn:
            stream = await conn.start_stream("a calm ocean at sunset")
            print(conn.broadcast["watch_url"])
            await conn.interact("night falls")
            await conn.end_stream()

    async with Spectator(conn.broadcast["whep_url"], conn.broadcast["spectator_token"]) as viewer:
        frame = await viewer.track.recv()      # av.VideoFrame, decoded

    # With [world_model] kind = "whip" the connection's video comes from a publisher (WHIP, RFC 9725):
    async with client.connect() as conn:
        async with Publisher(conn.whip_url, conn.publish_token, my_track, on_prompt=steer) as publisher:
            await conn.start_stream("a calm ocean at sunset")   # steer({"type": ..., "prompt": ...}) per prompt
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator
from urllib.parse import urljoin

import aiohttp
from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack


class RelayAPIError(Exception):
    """An error answer from the relay, with its documented fields."""

    def __init__(self, status: int, body: Any) -> None:
        error = body.get("error", {}) if isinstance(body, dict) else {}
        self.status = status
        self.code = error.get("code")
        self.message = error.get("message", str(body))
        self.details = error.get("details", {})
        super().__init__(f"{status} {self.code}: {self.message}")


async def _check(response: aiohttp.ClientResponse) -> Any:
    if response.status >= 400:
        try:
            body = await response.json(content_type=None)
        except (ValueError, aiohttp.ContentTypeError):
            body = await response.text()
        raise RelayAPIError(response.status, body)
    text = await response.text()
    return json.loads(text) if text else None


class RelayClient:
    def __init__(self, base_url: str, api_key: str, *, session: aiohttp.ClientSession | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self._session = session
        self._owns_session = session is None

    @property
    def http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    async def request(self, method: str, path: str, *, token: str | None = None, **kwargs: Any) -> Any:
        headers = {"Authorization": f"Bearer {token or self.api_key}", **kwargs.pop("headers", {})}
        async with self.http.request(method, self.base_url + path, headers=headers, **kwargs) as response:
            return await _check(response)

    @asynccontextmanager
    async def connect(self, channel_id: str | None = None,
                      share_replay: bool | None = None) -> AsyncIterator["HostConnection"]:
        """Open a connection (reserving a streamer); it is disconnected on exit. On a channel (its
        channel_id or slug) it streams into the channel's broadcast, whose watch URL stays. With
        ``share_replay`` each stream's end hands spectators a link to its replay."""
        fields = {"channel_id": channel_id, "share_replay": share_replay}
        body = {k: v for k, v in fields.items() if v is not None} or None
        info = await self.request("POST", "/v1/connections", json=body)
        conn = HostConnection(self, info)
        try:
            yield conn
        finally:
            await conn.disconnect()

    async def get_stream(self, stream_id: str) -> dict[str, Any]:
        return await self.request("GET", f"/v1/streams/{stream_id}")

    # -- channels: a watch link that lasts across connections and restarts -----------------------

    async def create_channel(self, title: str, *, description: str | None = None, slug: str | None = None,
                             host_name: str | None = None) -> dict[str, Any]:
        """{channel_id, title, ..., broadcast: {broadcast_id, watch_url, whep_url, spectator_token, ...}}."""
        body = {"title": title, "description": description, "slug": slug, "host_name": host_name}
        return await self.request("POST", "/v1/channels", json={k: v for k, v in body.items() if v is not None})

    async def list_channels(self) -> list[dict[str, Any]]:
        return (await self.request("GET", "/v1/channels"))["channels"]

    async def get_channel(self, channel_id: str) -> dict[str, Any]:
        """By channel_id or slug."""
        return await self.request("GET", f"/v1/channels/{channel_id}")

    async def update_channel(self, channel_id: str, **fields: Any) -> dict[str, Any]:
        """Change title, description, slug or host_name (None clears an optional one); the links stay."""
        return await self.request("PATCH", f"/v1/channels/{channel_id}", json=fields)

    async def delete_channel(self, channel_id: str) -> None:
        await self.request("DELETE", f"/v1/channels/{channel_id}")

    # -- simulations: scripts run offline as jobs, each script producing one recording ----------

    async def simulate(self, script: list[dict[str, Any]], portrait: bool = False) -> dict[str, Any]:
        """Queue one script; returns {job_id, status: "pending", created_at, estimated_wait_seconds}."""
        return await self.request("POST", "/v1/simulations", json={"script": script, "portrait": portrait})

    async def simulate_batch(self, scripts: list[list[dict[str, Any]]], portrait: bool = False) -> dict[str, Any]:
        """Queue several scripts as one job (one recording each)."""
        return await self.request("POST", "/v1/simulations", json={"scripts": scripts, "portrait": portrait})

    async def get_simulation(self, job_id: str) -> dict[str, Any]:
        return await self.request("GET", f"/v1/simulations/{job_id}")

    async def list_simulations(self, status: str | None = None, active: bool | None = None, limit: int = 20,
                               offset: int = 0) -> dict[str, Any]:
        params: dict[str, str] = {"limit": str(limit), "offset": str(offset)}
        if status is not None:
            params["status"] = status
        if active is not None:
            params["active"] = "true" if active else "false"
        return await self.request("GET", "/v1/simulations", params=params)

    async def cancel_simulation(self, job_id: str) -> dict[str, Any]:
        return await self.request("DELETE", f"/v1/simulations/{job_id}")

    async def wait_simulation(self, job_id: str, timeout: float = 600, interval: float = 0.5) -> dict[str, Any]:
        """Poll until the job is completed, failed or cancelled; returns it (TimeoutError past ``timeout``)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            job = await self.get_simulation(job_id)
            if job["status"] in ("completed", "failed", "cancelled"):
                return job
            if loop.time() >= deadline:
                raise TimeoutError(f"simulation {job_id} still {job['status']} after {timeout} s")
            await asyncio.sleep(interval)

    async def close(self) -> None:
        if self._session is not None and self._owns_session:
            await self._session.close()
        self._session = None

    async def __aenter__(self) -> "RelayClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class HostConnection:
    def __init__(self, client: RelayClient, info: dict[str, Any]) -> None:
        self._client = client
        self.info = info
        self.connection_id: str = info["connection_id"]
        self.broadcast: dict[str, Any] = info["broadcast"]
        self.stream_id: str | None = None
        self.closed = False

    @property
    def whip_url(self) -> str | None:
        """Where a publisher POSTs its offer, on a `[world_model] kind = "whip"` relay (else None)."""
        return self.info.get("whip_url")

    @property
    def publish_token(self) -> str | None:
        """The publisher's Bearer token, bound to this connection (never the API key)."""
        return self.info.get("publish_token")

    def publisher(self, track: MediaStreamTrack, **options: Any) -> "Publisher":
        """A Publisher of `track` to this connection (options as Publisher's); use it with `async with`."""
        if self.whip_url is None or self.publish_token is None:
            raise RuntimeError("this connection takes no publisher: the relay's world model is not kind \"whip\"")
        return Publisher(self.whip_url, self.publish_token, track, session=self._client.http, **options)

    async def start_stream(self, prompt: str, *, portrait: bool = False, image: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"prompt": prompt, "portrait": portrait}
        if image is not None:
            body["image"] = image
        started = await self._client.request("POST", f"/v1/connections/{self.connection_id}/streams", json=body)
        self.stream_id = started["stream_id"]
        return started

    async def interact(self, prompt: str) -> str:
        answer = await self._client.request("POST", f"/v1/streams/{self._stream()}/interact", json={"prompt": prompt})
        return answer["acknowledged_prompt"]

    async def end_stream(self) -> dict[str, Any]:
        return await self._client.request("DELETE", f"/v1/streams/{self._stream()}")

    async def keepalive(self) -> None:
        await self._client.request("POST", f"/v1/connections/{self.connection_id}/keepalive")

    async def state(self) -> dict[str, Any]:
        return await self._client.request("GET", f"/v1/connections/{self.connection_id}")

    async def disconnect(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            await self._client.request("DELETE", f"/v1/connections/{self.connection_id}")
        except RelayAPIError as err:
            if err.status != 404:  # already gone (reaped, or expired) is fine
                raise

    def _stream(self) -> str:
        if self.stream_id is None:
            raise RuntimeError("no stream started on this connection")
        return self.stream_id


async def _end_session(peer: "Spectator | Publisher", headers: dict[str, str] | None = None) -> None:
    """End a WHEP or WHIP session: DELETE its resource (a relay that is gone has nothing left to end),
    close the peer connection, and the HTTP session if the peer made it. Safe to call twice."""
    if peer.location is not None and peer._session is not None:
        try:
            async with peer._session.delete(peer.location, headers=headers) as response:
                await response.read()
        except aiohttp.ClientError:
            pass
        peer.location = None
    if peer.pc is not None:
        await peer.pc.close()
        peer.pc = None
    if peer._session is not None and peer._owns_session:
        await peer._session.close()
        peer._session = None


class Spectator:
    """Watch a broadcast over WHEP with aiortc: ``track`` yields decoded av.VideoFrames."""

    def __init__(self, whep_url: str, token: str, *, session: aiohttp.ClientSession | None = None,
                 audio: bool = True) -> None:
        self.whep_url = whep_url
        self.token = token
        self.pc: RTCPeerConnection | None = None
        self.location: str | None = None
        self.track: MediaStreamTrack | None = None
        self._session = session
        self._owns_session = session is None
        self._audio = audio
        self._track_ready = asyncio.Event()

    async def join(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        pc = self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTransceiver("video", direction="recvonly")
        if self._audio:
            pc.addTransceiver("audio", direction="recvonly")

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "video":
                self.track = track
                self._track_ready.set()

        await pc.setLocalDescription(await pc.createOffer())  # aiortc gathers before returning
        async with self._session.post(
            self.whep_url,
            data=pc.localDescription.sdp,
            headers={"Content-Type": "application/sdp", "Authorization": f"Bearer {self.token}"},
        ) as response:
            if response.status != 201:
                raise RelayAPIError(response.status, await response.json(content_type=None))
            answer = await response.text()
            self.location = urljoin(self.whep_url, response.headers["Location"])
        await pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        await asyncio.wait_for(self._track_ready.wait(), 10)

    async def leave(self) -> None:
        await _end_session(self)

    async def __aenter__(self) -> "Spectator":
        try:
            await self.join()
        except BaseException:
            await self.leave()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.leave()


PROMPTS_CHANNEL = "prompts"  # the data channel on which the relay delivers prompts to a publisher
PUBLISH_CODECS = ("H264", "VP8")


def codec_preferences(codec: str) -> list:
    """aiortc's capabilities for `codec` alone (with rtx, for retransmissions): the offer then carries
    only that codec, so the relay cannot pick another. H.264 is forwarded as it is; VP8 is transcoded."""
    if codec not in PUBLISH_CODECS:
        raise ValueError(f"codec must be one of {PUBLISH_CODECS}, not {codec!r}")
    return [c for c in RTCRtpSender.getCapabilities("video").codecs
            if c.mimeType in (f"video/{codec}", "video/rtx")]


class Publisher:
    """Publish a video track to a connection over WHIP (RFC 9725) with aiortc, as Spectator watches by WHEP.

    With `on_prompt`, it opens the `prompts` data channel, and each message the relay delivers there is
    passed to it as a dict: the hosted protocol's messages, {"type": "interactive_stream_start", "prompt",
    "portrait"} when a stream starts, {"type": "update", "prompt"} for each host's or audience's prompt,
    {"type": "interactive_stream_end"} when it ends; one that is not a JSON object is dropped. Without
    `on_prompt`, the publisher simply broadcasts.
    `close()` ends publishing (DELETE on the session's Location) and is safe to call twice.
    """

    def __init__(self, whip_url: str, token: str, track: MediaStreamTrack, *, codec: str = "H264",
                 on_prompt: Callable[[dict[str, Any]], object] | None = None,
                 session: aiohttp.ClientSession | None = None) -> None:
        self.whip_url = whip_url
        self.token = token
        self.track = track
        self.codecs = codec_preferences(codec)
        self.on_prompt = on_prompt
        self.pc: RTCPeerConnection | None = None
        self.location: str | None = None
        self.answer: str | None = None
        self._session = session
        self._owns_session = session is None
        self._prompts_open = asyncio.Event()

    async def publish(self) -> None:
        if self.pc is not None:
            raise RuntimeError("already publishing: close() first")  # a second peer would leak the first
        if self._session is None:
            self._session = aiohttp.ClientSession()
        pc = self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTransceiver(self.track, direction="sendonly").setCodecPreferences(self.codecs)
        if self.on_prompt is not None:
            channel = pc.createDataChannel(PROMPTS_CHANNEL)
            channel.on("open", self._prompts_open.set)
            channel.on("message", self._deliver)
        await pc.setLocalDescription(await pc.createOffer())  # aiortc gathers before returning: no trickle
        async with self._session.post(
            self.whip_url,
            data=pc.localDescription.sdp,
            headers={"Content-Type": "application/sdp", "Authorization": f"Bearer {self.token}"},
        ) as response:
            await _check_created(response)
            self.answer = await response.text()
            self.location = urljoin(self.whip_url, response.headers["Location"])
        await pc.setRemoteDescription(RTCSessionDescription(self.answer, "answer"))

    async def prompts_ready(self, timeout: float = 10) -> None:
        """Wait until the prompts channel is open (prompts sent before it would not reach this publisher)."""
        if self.on_prompt is None:
            raise RuntimeError("this publisher has no prompts channel (no on_prompt)")
        await asyncio.wait_for(self._prompts_open.wait(), timeout)

    def _deliver(self, data: str | bytes) -> None:
        try:
            message = json.loads(data)
        except ValueError:
            return
        if isinstance(message, dict):
            self.on_prompt(message)

    async def close(self) -> None:
        await _end_session(self, {"Authorization": f"Bearer {self.token}"})

    async def __aenter__(self) -> "Publisher":
        try:
            await self.publish()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def _check_created(response: aiohttp.ClientResponse) -> None:
    if response.status != 201:
        try:
            body = await response.json(content_type=None)
        except ValueError:
            body = await response.text()
        raise RelayAPIError(response.status, body)
