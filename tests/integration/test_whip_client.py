"""relay.client.Publisher against the real relay (`[world_model] kind = "whip"`): what it publishes
reaches a WHEP spectator, prompts from the host reach its `prompts` channel, and closing it ends
publishing so another publisher may take the connection."""

from __future__ import annotations

import av
import numpy as np
import pytest
from aiortc import VideoStreamTrack

from relay.client import RelayAPIError, RelayClient, Spectator
from tests.conftest import API_KEY, eventually, frames_for

FPS = 25
LONG = {"stream_max_seconds": 30, "idle_timeout_seconds": 60}


class ColourTrack(VideoStreamTrack):
    """320x176 frames whose colour steps each frame, at the relay's 25 fps."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = 0

    async def recv(self) -> av.VideoFrame:
        pts, time_base = await self.next_timestamp()
        self.sent += 1
        frame = av.VideoFrame.from_ndarray(np.full((176, 320, 3), (self.sent * 8) % 256, np.uint8), format="rgb24")
        frame.pts, frame.time_base = pts, time_base
        return frame


async def test_a_published_track_reaches_a_spectator_and_host_prompts_reach_the_publisher(relay_factory):
    relay = await relay_factory(world_model={"kind": "whip"}, limits=LONG)
    prompts: list[dict] = []
    async with RelayClient(relay.url, API_KEY) as client, client.connect() as conn:
        assert conn.whip_url == f"{relay.url}/v1/connections/{conn.connection_id}/whip"
        assert conn.publish_token and conn.publish_token != API_KEY
        async with conn.publisher(ColourTrack(), on_prompt=prompts.append) as publisher:
            await publisher.prompts_ready()
            await conn.start_stream("a colour ramp")
            async with Spectator(conn.broadcast["whep_url"], conn.broadcast["spectator_token"],
                                 audio=False) as viewer:
                await viewer.track.recv()
                frames = await frames_for(viewer.track, 2)
            assert len(frames) >= 0.6 * FPS * 2, f"{len(frames)} frames in 2 s of a {FPS} fps publisher"
            assert len({round(float(frame.to_ndarray(format="gray").mean()), -1) for frame in frames}) >= 5

            await conn.interact("night falls")
            await eventually(lambda: any(p.get("prompt") == "night falls" for p in prompts),
                             what="the host's prompt on the publisher's prompts channel")
            assert prompts[0] == {"type": "interactive_stream_start", "prompt": "a colour ramp", "portrait": False}
            assert {"type": "update", "prompt": "night falls"} in prompts

            # One publisher per connection: a second is refused in the error shape.
            with pytest.raises(RelayAPIError) as second:
                async with conn.publisher(ColourTrack()):
                    pass
            assert second.value.status == 409 and second.value.code

        # close() DELETEd the session: the stream it fed ends upstream_error, and the publisher may come back.
        async def ended() -> bool:
            return (await client.get_stream(conn.stream_id))["status"] == "ended"

        await eventually(ended, what="the stream of the publisher that left ended")
        assert (await client.get_stream(conn.stream_id))["end_reason"] == "upstream_error"
        async with conn.publisher(ColourTrack()) as again:
            assert again.location
            await conn.start_stream("the publisher is back")
            async with Spectator(conn.broadcast["whep_url"], conn.broadcast["spectator_token"],
                                 audio=False) as viewer:
                assert await viewer.track.recv()


async def test_a_publisher_that_returns_at_once_is_taken(relay_factory):
    relay = await relay_factory(world_model={"kind": "whip"}, limits=LONG)
    async with RelayClient(relay.url, API_KEY) as client, client.connect() as conn:
        for attempt in range(3):
            first = conn.publisher(ColourTrack())
            await first.publish()
            await conn.start_stream(f"attempt {attempt}")
            await first.close()  # DELETE while its stream runs, then straight back
            async with conn.publisher(ColourTrack()) as again:
                assert again.location

            async def ended() -> bool:
                return (await client.get_stream(conn.stream_id))["status"] == "ended"

            await eventually(ended, what="the stream ended before the next attempt")
