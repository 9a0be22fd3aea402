"""relay.client.Publisher against a WHIP endpoint written here: a real aiohttp server answering with a real
aiortc peer, so what the publisher offers, sends, receives and ends is checked without the relay."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import av
import numpy as np
import pytest
from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription, VideoStreamTrack

from relay.client import PROMPTS_CHANNEL, HostConnection, Publisher, RelayAPIError, RelayClient, codec_preferences
from tests.conftest import eventually, frames_for

TOKEN = "publish-token-1"


class SmallTrack(VideoStreamTrack):
    """Small grey frames at aiortc's 30 fps pace: cheap to encode and decode twice per test."""

    async def recv(self) -> av.VideoFrame:
        pts, time_base = await self.next_timestamp()
        frame = av.VideoFrame.from_ndarray(np.full((96, 160, 3), 128, np.uint8), format="rgb24")
        frame.pts, frame.time_base = pts, time_base
        return frame


class WhipEndpoint:
    """POST offer -> 201 + Location + answer; DELETE ends. Keeps what the publisher sent, for the test."""

    def __init__(self) -> None:
        self.pcs: list[RTCPeerConnection] = []
        self.offers: list[str] = []
        self.tracks: list = []
        self.channels: list = []
        self.deleted: list[str] = []
        self.channel_open = asyncio.Event()
        app = web.Application()
        app.router.add_post("/whip", self.post)
        app.router.add_delete("/whip/{session}", self.delete)
        app.router.add_post("/busy", self.busy)
        self.app = app

    async def post(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.json_response({"error": {"code": "unauthorized", "message": "Wrong publish token.",
                                                "action": "Use the connection's publish_token.", "details": {}}},
                                     status=401)
        assert request.content_type == "application/sdp"
        offer = await request.text()
        self.offers.append(offer)
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.pcs.append(pc)
        pc.on("track", self.tracks.append)

        @pc.on("datachannel")
        def on_channel(channel) -> None:
            self.channels.append(channel)
            self.channel_open.set()

        await pc.setRemoteDescription(RTCSessionDescription(offer, "offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        return web.Response(status=201, text=pc.localDescription.sdp, content_type="application/sdp",
                            headers={"Location": f"/whip/s{len(self.pcs)}"})

    async def busy(self, request: web.Request) -> web.Response:
        return web.json_response({"error": {"code": "publisher_exists", "message": "A publisher is already live.",
                                            "action": "End the other publisher first.", "details": {}}}, status=409)

    async def delete(self, request: web.Request) -> web.Response:
        self.deleted.append(request.match_info["session"])
        return web.Response(status=200)

    async def close(self) -> None:
        for pc in self.pcs:
            await pc.close()


@pytest.fixture
async def whip(aiohttp_server):
    endpoint = WhipEndpoint()
    server = await aiohttp_server(endpoint.app)
    endpoint.url = str(server.make_url("/whip"))
    yield endpoint
    await endpoint.close()


def video_codecs(sdp: str) -> set[str]:
    return {line.split()[1].split("/")[0] for line in sdp.splitlines() if line.startswith("a=rtpmap:")}


async def test_publishes_h264_by_default_and_frames_arrive(whip):
    async with Publisher(whip.url, TOKEN, SmallTrack()) as publisher:
        assert video_codecs(whip.offers[0]) == {"H264", "rtx"}  # the relay can only take it as H.264
        assert publisher.location == whip.url + "/s1"
        await eventually(lambda: whip.tracks, what="the publisher's track at the endpoint")
        frames = await frames_for(whip.tracks[0], 2)
        assert len(frames) >= 20, f"{len(frames)} frames in 2 s of a 30 fps track"
        assert (frames[-1].width, frames[-1].height) == (160, 96)
        assert not whip.channels  # no on_prompt: no prompts channel
    assert whip.deleted == ["s1"]


async def test_vp8_is_selectable(whip):
    async with Publisher(whip.url, TOKEN, SmallTrack(), codec="VP8"):
        assert video_codecs(whip.offers[0]) == {"VP8", "rtx"}
        await eventually(lambda: whip.tracks, what="the publisher's track at the endpoint")
        assert await asyncio.wait_for(whip.tracks[0].recv(), 10)


def test_unknown_codec_is_refused():
    with pytest.raises(ValueError, match="codec"):
        codec_preferences("AV1")


async def test_prompts_reach_the_callback_and_junk_is_dropped(whip):
    prompts: list[dict] = []
    async with Publisher(whip.url, TOKEN, SmallTrack(), on_prompt=prompts.append) as publisher:
        await publisher.prompts_ready()
        await asyncio.wait_for(whip.channel_open.wait(), 10)
        channel = whip.channels[0]
        assert channel.label == PROMPTS_CHANNEL
        await eventually(lambda: channel.readyState == "open", what="the prompts channel open at the endpoint")
        for message in ("not json", "[1, 2]", json.dumps({"type": "update", "prompt": "night falls"})):
            channel.send(message)
        await eventually(lambda: prompts, what="a prompt at the publisher")
        assert prompts == [{"type": "update", "prompt": "night falls"}]


async def test_refusal_raises_the_error_shape_and_leaves_nothing_open(whip):
    publisher = Publisher(whip.url, "wrong-token", SmallTrack())
    with pytest.raises(RelayAPIError) as refused:
        async with publisher:
            pass
    assert (refused.value.status, refused.value.code) == (401, "unauthorized")
    assert publisher.pc is None and publisher.location is None and whip.deleted == []

    busy = Publisher(whip.url.replace("/whip", "/busy"), TOKEN, SmallTrack())
    with pytest.raises(RelayAPIError) as conflict:
        await busy.publish()
    assert (conflict.value.status, conflict.value.code) == (409, "publisher_exists")
    await busy.close()
    assert busy.pc is None


async def test_close_is_idempotent_and_survives_a_gone_relay(whip, aiohttp_server):
    publisher = Publisher(whip.url, TOKEN, SmallTrack())
    await publisher.publish()
    with pytest.raises(RuntimeError, match="already publishing"):
        await publisher.publish()
    assert len(whip.pcs) == 1
    await publisher.close()
    await publisher.close()
    assert whip.deleted == ["s1"]

    # The relay went away before close: close() still frees the peer connection and the session.
    gone = web.Application()
    gone_whip = WhipEndpoint()
    gone.router.add_post("/whip", gone_whip.post)
    server = await aiohttp_server(gone)
    lonely = Publisher(str(server.make_url("/whip")), TOKEN, SmallTrack())
    await lonely.publish()
    await server.close()
    await lonely.close()
    assert lonely.pc is None and lonely.location is None
    await gone_whip.close()


async def test_host_connection_offers_a_publisher_only_on_a_whip_relay():
    async with aiohttp.ClientSession() as session:
        client = RelayClient("http://127.0.0.1:1", "key", session=session)
        whip_info = {"connection_id": "c1", "broadcast": {}, "whip_url": "http://relay/v1/connections/c1/whip",
                     "publish_token": "pt"}
        conn = HostConnection(client, whip_info)
        assert (conn.whip_url, conn.publish_token) == (whip_info["whip_url"], "pt")
        publisher = conn.publisher(SmallTrack(), codec="VP8")
        assert (publisher.whip_url, publisher.token) == (whip_info["whip_url"], "pt")
        await publisher.close()  # never published: nothing to end, and the client's session stays open
        assert not session.closed

        plain = HostConnection(client, {"connection_id": "c2", "broadcast": {}})
        assert plain.whip_url is None and plain.publish_token is None
        with pytest.raises(RuntimeError, match="whip"):
            plain.publisher(SmallTrack())
