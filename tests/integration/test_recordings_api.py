"""Recordings on a real server: one per stream, playable, signed, range-served, crash-safe."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from urllib.parse import urlsplit

import av
import pytest

from relay.client import RelayClient, Spectator
from tests.conftest import API_KEY, OTHER_KEY, eventually, frames_pass, start_relay_process

AUTH = {"Authorization": f"Bearer {API_KEY}"}


async def finished_recording(http, base: str, stream_id: str, key: str = API_KEY, timeout: float = 15) -> dict:
    """GET the recording until it has finished (its files are written just after the stream ends)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        async with http.get(f"{base}/v1/recordings/{stream_id}", headers={"Authorization": f"Bearer {key}"}) as r:
            body = await r.json()
            if r.status == 200 and body["status"] not in ("recording", None):
                return body
        assert loop.time() < end, f"recording not finished: {body}"
        await asyncio.sleep(0.1)


async def test_a_three_second_stream_leaves_one_playable_recording(relay_factory, http):
    # Three prompts fit in 3 s (two of them 20 frames apart); the cap ends the stream, and the test waits for it.
    relay = await relay_factory(limits={"stream_max_seconds": 3})
    async with RelayClient(relay.url, API_KEY) as client, client.connect() as conn:
        started = await conn.start_stream("a calm ocean at sunset")
        stream_id = started["stream_id"]
        await frames_pass(relay, conn.broadcast["broadcast_id"], 20)
        await conn.interact("storm clouds roll in")
        await frames_pass(relay, conn.broadcast["broadcast_id"], 20)
        await conn.interact("night falls over the sea")
        rec = await finished_recording(http, relay.url, stream_id, timeout=20)
    assert rec["status"] == "complete", rec
    assert rec["width"] == 320 and rec["height"] == 176

    async with http.get(rec["video_url"]) as r:
        assert r.status == 200 and r.content_type == "video/mp4"
        video = await r.read()
    path = relay.app[relay_store_key()].path(stream_id, "video.mp4")
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        frames = sum(1 for _ in container.decode(stream))
        duration = float(container.duration or 0) / 1_000_000
    assert abs(duration - 3.0) <= 0.5, duration
    assert abs(frames - 75) <= 5, frames
    assert frames == rec["frame_count"]
    assert len(video) == path.stat().st_size

    async with http.get(rec["events_url"]) as r:
        events = [json.loads(line) for line in (await r.text()).splitlines()]
    prompts = [e["prompt"] for e in events if e["type"] in ("stream_started", "prompt_applied")]
    assert prompts == ["a calm ocean at sunset", "storm clouds roll in", "night falls over the sea"]
    assert events[-1]["type"] == "stream_ended" and events[-1]["reason"] == "duration_limit"
    offsets = [e["offset_ms"] for e in events]
    assert offsets == sorted(offsets)

    async with http.get(rec["thumbnail_url"]) as r:
        assert r.content_type == "image/jpeg"
        thumb = await r.read()
    assert thumb[:3] == b"\xff\xd8\xff"
    with av.open(str(path.parent / "thumbnail.jpg")) as img:
        frame = next(img.decode(video=0))
        assert abs(frame.width / frame.height - 320 / 176) < 0.05

    # HTTP Range: a player seeks without downloading everything.
    async with http.get(rec["video_url"], headers={"Range": "bytes=100-199"}) as r:
        assert r.status == 206
        assert r.headers["Content-Range"] == f"bytes 100-199/{len(video)}"
        assert await r.read() == video[100:200]

    async with http.get(f"{relay.url}/v1/recordings", headers=AUTH) as r:
        listing = await r.json()
    assert listing["total"] == 1 and listing["recordings"][0]["stream_id"] == stream_id
    async with http.get(f"{relay.url}/v1/recordings", headers={"Authorization": f"Bearer {OTHER_KEY}"}) as r:
        assert (await r.json())["total"] == 0  # a key sees only its own
    async with http.get(f"{relay.url}/v1/recordings/{stream_id}", headers={"Authorization": f"Bearer {OTHER_KEY}"}) as r:
        assert r.status == 404


def relay_store_key():
    from relay.web import RECORDINGS

    return RECORDINGS


async def test_signed_urls_refuse_tampering_expiry_and_traversal(relay_factory, http):
    relay = await relay_factory(limits={"stream_max_seconds": 1})
    async with RelayClient(relay.url, API_KEY) as client, client.connect() as conn:
        stream_id = (await conn.start_stream("forest"))["stream_id"]
        rec = await finished_recording(http, relay.url, stream_id)
    url = rec["video_url"]
    parts = urlsplit(url)
    query = dict(p.split("=", 1) for p in parts.query.split("&"))
    base = f"{parts.scheme}://{parts.netloc}"
    tampered_sig = query["signature"][:-2] + ("AA" if not query["signature"].endswith("AA") else "BB")
    cases = [
        f"{base}{parts.path}?expires={query['expires']}&signature={tampered_sig}",
        f"{base}{parts.path}?expires={int(query['expires']) + 60}&signature={query['signature']}",
        f"{base}/v1/recordings/{stream_id}/events.jsonl?expires={query['expires']}&signature={query['signature']}",
        f"{base}{parts.path}",
    ]
    for bad in cases:
        async with http.get(bad) as r:
            assert r.status == 403, bad
    store = relay.app[relay_store_key()]
    expired = store.signed_url(parts.path, now=store._clock.time() - 7200)
    async with http.get(base + expired) as r:
        assert r.status == 403
    for traversal in ("..%2F..%2Furl-signing.key", "metadata.json"):
        path = f"/v1/recordings/{stream_id}/{traversal}"
        async with http.get(base + store.signed_url(path)) as r:
            assert r.status == 404
    async with http.get(rec["video_url"]) as r:
        assert r.status == 200


@pytest.mark.parametrize("spectators", [0, 5])
async def test_one_recording_per_stream_whatever_the_audience(relay_factory, http, spectators):
    relay = await relay_factory(limits={"stream_max_seconds": 30})
    async with RelayClient(relay.url, API_KEY) as client, client.connect() as conn:
        stream_id = (await conn.start_stream("desert"))["stream_id"]
        b = conn.broadcast
        viewers = [Spectator(b["whep_url"], b["spectator_token"]) for _ in range(spectators)]
        try:
            for v in viewers:
                await v.join()
            await asyncio.gather(*(v.track.recv() for v in viewers))
        finally:
            for v in viewers:
                await v.leave()
        hub = relay.sessions.broadcast(b["broadcast_id"]).media.hub
        while hub.published < 25:  # a second of video, watched or not
            await asyncio.sleep(0.05)
        await conn.end_stream()
        rec = await finished_recording(http, relay.url, stream_id)
    assert rec["status"] == "complete"
    root = relay.app[relay_store_key()].root
    assert sorted(p.name for p in root.iterdir()) == [stream_id]
    async with http.get(rec["events_url"]) as r:
        events = [json.loads(line) for line in (await r.text()).splitlines()]
    counts = [e["count"] for e in events if e["type"] == "viewers"]
    assert max(counts, default=0) == spectators


async def test_unwritable_recordings_dir_leaves_the_stream_unharmed(relay_factory, tmp_path, http):
    if os.geteuid() == 0:
        # root ignores permissions: make the recordings root a file so nothing can be created in it
        blocker = tmp_path / "data" / "recordings"
        blocker.parent.mkdir(parents=True, exist_ok=True)
        blocker.write_text("not a directory")
    else:
        (tmp_path / "data" / "recordings").mkdir(parents=True)
        (tmp_path / "data" / "recordings").chmod(0o500)
    relay = await relay_factory(limits={"stream_max_seconds": 30})
    async with RelayClient(relay.url, API_KEY) as client, client.connect() as conn:
        stream_id = (await conn.start_stream("snow"))["stream_id"]
        b = conn.broadcast
        async with Spectator(b["whep_url"], b["spectator_token"]) as viewer:
            await viewer.track.recv()
            frames = 0
            loop = asyncio.get_running_loop()
            end = loop.time() + 1.0
            while loop.time() < end:
                await viewer.track.recv()
                frames += 1
            assert frames >= 18  # spectators keep their frame rate
        state = await client.get_stream(stream_id)
        assert state["status"] == "live"
        async with http.get(f"{relay.url}/v1/recordings/{stream_id}", headers=AUTH) as r:
            rec = await r.json()
        assert r.status == 200 and rec["status"] == "failed" and rec["error"], rec


async def test_kill_9_mid_stream_then_restart_lists_a_playable_partial_recording(tmp_path, http):
    data = tmp_path / "data"
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[server]\nport = 0\ndata_dir = "{data}"\n[auth]\napi_keys = ["{API_KEY}"]\n'
        "[world_model]\nwidth = 320\nheight = 176\n[limits]\nstream_max_seconds = 60\n"
        "[media]\nkeyframe_interval_seconds = 0.5\n"  # a fragment at each keyframe: half-second fragments
    )

    proc, base = await start_relay_process(config)
    try:
        async with RelayClient(base, API_KEY) as client:
            info = await client.request("POST", "/v1/connections")
            conn_id = info["connection_id"]
            stream_id = (await client.request("POST", f"/v1/connections/{conn_id}/streams",
                                              json={"prompt": "a volcano"}))["stream_id"]
            video = data / "recordings" / stream_id / "video.mp4"
            # Kill only once four fragments are on disk: at least 1.5 s of whole ones, whatever the kill cuts.
            await eventually(lambda: video.exists() and video.read_bytes().count(b"moof") >= 4, timeout=15,
                             what="four fragments on disk")
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()

    proc, base = await start_relay_process(config)
    try:
        rec = await finished_recording(http, base, stream_id)
        assert rec["status"] == "partial", rec
        assert rec["duration_seconds"] >= 1.0
        async with http.get(rec["video_url"]) as r:
            assert r.status == 200
        path = data / "recordings" / stream_id / "video.mp4"
        with av.open(str(path)) as container:
            decoded = sum(1 for _ in container.decode(video=0))
        assert decoded >= 25 and decoded == rec["frame_count"]
    finally:
        proc.terminate()
        await proc.wait()
