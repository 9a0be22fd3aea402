"""Live HLS on a real server: the playlist and segments over real HTTP, decoded with PyAV, and
ffmpeg's own HLS player (through PyAV) following the live playlist."""

from __future__ import annotations

import asyncio
import io
import re

import av
import numpy as np

from relay.client import RelayClient
from tests.conftest import API_KEY, eventually

LONG = {"stream_max_seconds": 60, "idle_timeout_seconds": 60}
# Half-second segments keep the test short; the default follows the 2 s keyframe interval.
FAST = {"keyframe_interval_seconds": 0.5, "hls_window_segments": 4}


def listed(playlist: str) -> list[tuple[float, str]]:
    """(duration, uri) of each segment the playlist lists."""
    return [(float(d), uri) for d, uri in re.findall(r"#EXTINF:([\d.]+),\n(\S+)", playlist)]


async def text(http, url: str) -> str:
    async with http.get(url) as r:
        assert r.status == 200, await r.text()
        return await r.text()


async def segments_after(http, hls_url: str, count: int) -> list[tuple[float, str]]:
    """Waits until the playlist lists `count` segments; returns them."""
    found: list[tuple[float, str]] = []

    async def enough() -> bool:
        nonlocal found
        found = listed(await text(http, hls_url))
        return len(found) >= count
    await eventually(enough, timeout=15, what=f"{count} HLS segments")
    return found


def sequence(uri: str) -> int:
    return int(uri.split(".", 1)[0])


def decode(data: bytes) -> list[av.VideoFrame]:
    with av.open(io.BytesIO(data)) as container:
        return list(container.decode(container.streams.video[0]))


async def test_a_live_stream_is_offered_as_hls(relay_factory, http):
    relay = await relay_factory(limits=LONG, media=FAST)
    async with RelayClient(relay.url, API_KEY) as client, client.connect() as conn:
        b = conn.broadcast
        base = f"{b['webrtc_url']}/hls"
        assert b["hls_url"] == f"{base}/index.m3u8?token={b['spectator_token']}"
        await conn.start_stream("a calm ocean at sunset")

        await segments_after(http, b["hls_url"], 3)
        playlist = await text(http, b["hls_url"])  # the window is 4: still at least 3
        assert playlist.startswith("#EXTM3U\n") and "#EXT-X-TARGETDURATION:1\n" in playlist
        segments = listed(playlist)
        assert all(uri.endswith(f".ts?token={b['spectator_token']}") for _, uri in segments)

        # The listed segments, fetched as a player would, decode back to back at 25 fps.
        data = b""
        for _, uri in segments:
            async with http.get(f"{base}/{uri}") as r:
                assert r.status == 200 and r.content_type == "video/mp2t"
                assert "immutable" in r.headers["Cache-Control"]
                data += await r.read()
        frames = decode(data)
        assert abs(len(frames) - 25 * sum(d for d, _ in segments)) <= 1, (len(frames), segments)
        metrics = await text(http, f"{relay.url}/metrics")
        served = float(re.search(r"^relay_hls_bytes_served_total (\S+)$", metrics, re.M).group(1))
        assert served >= len(data) and float(re.search(r"^relay_hls_segments_total (\S+)$", metrics, re.M).group(1)) >= 3
        assert (frames[0].width, frames[0].height) == (320, 176)
        steps = {b.pts - a.pts for a, b in zip(frames, frames[1:])}
        assert steps == {3600}, steps  # 90 kHz / 25 fps, no gaps between segments
        before = frames[-1]

        # A prompt changes the picture in the segments that follow.
        await conn.interact("neon night over a lava desert")
        last = sequence(segments[-1][1])

        async def later_segment() -> bytes | None:
            newest = listed(await text(http, b["hls_url"]))[-1][1]
            if sequence(newest) >= last + 4:  # 2 s on: the ~1 s transition is over
                async with http.get(f"{base}/{newest}") as r:
                    return await r.read()
            return None
        await eventually(later_segment, timeout=15, what="segments after the prompt")
        after = decode(await later_segment())[-1]
        shift = np.abs(after.to_ndarray(format="rgb24").astype(float) - before.to_ndarray(format="rgb24")).mean()
        assert shift > 20, shift

        # The next stream continues the same playlist, marked as a discontinuity.
        await conn.end_stream()
        await conn.start_stream("snowy mountains at night")

        async def discontinuity() -> bool:
            return "#EXT-X-DISCONTINUITY\n" in await text(http, b["hls_url"])
        await eventually(discontinuity, timeout=15, what="the next stream in the playlist")


async def test_ffmpegs_hls_player_follows_the_live_playlist(relay_factory, http):
    relay = await relay_factory(limits=LONG, media=FAST)
    async with RelayClient(relay.url, API_KEY) as client, client.connect() as conn:
        await conn.start_stream("a green valley in spring")
        await segments_after(http, conn.broadcast["hls_url"], 3)

        def play() -> list[av.VideoFrame]:  # blocking I/O: off the loop that serves it
            frames = []
            with av.open(conn.broadcast["hls_url"], timeout=10) as container:
                for frame in container.decode(container.streams.video[0]):
                    frames.append(frame)
                    if len(frames) == 40:  # more than the 3 segments there at the start: it reloads
                        return frames
            return frames

        frames = await asyncio.wait_for(asyncio.to_thread(play), 30)
        assert len(frames) == 40 and (frames[0].width, frames[0].height) == (320, 176)


async def test_hls_refuses_bad_tokens_unknown_ids_and_old_segments(relay_factory, http):
    relay = await relay_factory(limits=LONG, media={**FAST, "hls_window_segments": 3})
    async with RelayClient(relay.url, API_KEY) as client, client.connect() as conn:
        b = conn.broadcast
        base = f"{b['webrtc_url']}/hls"
        await conn.start_stream("a windy coast")
        for url in (f"{base}/index.m3u8", f"{base}/index.m3u8?token=wrong", f"{base}/0.ts?token=wrong"):
            async with http.get(url) as r:
                assert r.status == 401 and (await r.json())["error"]["code"] == "UNAUTHORIZED", url
        async with http.get(f"{relay.url}/v1/broadcasts/nope/hls/index.m3u8?token=x") as r:
            assert r.status == 404
        async with http.get(f"{base}/99999.ts?token={b['spectator_token']}") as r:
            error = (await r.json())["error"]
            assert r.status == 404 and "Read the playlist again" in error["action"]

        # Memory stays bounded: what the playlist lists (3 target durations of 1 s: about seven
        # half-second segments) and three older ones, however long it runs.
        hls = relay.sessions.broadcast(b["broadcast_id"]).hls
        await eventually(lambda: hls.segment(12) is not None, timeout=20, what="thirteen segments made")
        segments = listed(await text(http, b["hls_url"]))
        assert 3 <= sum(d for d, _ in segments) < 3 + 1 and hls.segments <= len(segments) + 3 + 1
        assert hls.segment(0) is None
        async with http.get(f"{base}/0.ts?token={b['spectator_token']}") as r:
            assert r.status == 404


async def test_without_hls_there_is_no_hls_url(relay_factory, http):
    relay = await relay_factory(limits=LONG, media={"hls": False})
    async with RelayClient(relay.url, API_KEY) as client, client.connect() as conn:
        b = conn.broadcast
        assert b["hls_url"] is None
        async with http.get(f"{b['webrtc_url']}/hls/index.m3u8?token={b['spectator_token']}") as r:
            assert r.status == 404 and "no HLS rendition" in (await r.json())["error"]["message"]
