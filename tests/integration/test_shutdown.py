"""Graceful shutdown: SIGTERM tells every socket why (control, events, signalling), ends the stream,
finalizes its recording, and exits within [server] shutdown_seconds."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import aiohttp
from aiohttp import WSMsgType

from tests.conftest import API_KEY, eventually, open_signalling, start_relay_process

AUTH = {"Authorization": f"Bearer {API_KEY}"}


async def _until_closed(ws: aiohttp.ClientWebSocketResponse) -> tuple[list[dict], tuple]:
    """Every message the socket gets until the relay closes it, and the (code, reason) it closes with."""
    messages = []
    while True:
        msg = await asyncio.wait_for(ws.receive(), 10)
        if msg.type == WSMsgType.TEXT:
            messages.append(json.loads(msg.data))
        elif msg.type == WSMsgType.CLOSE:
            return messages, (msg.data, msg.extra)
        else:
            return messages, (None, repr(msg))  # gone without a close frame


async def test_sigterm_tells_every_socket_and_finalizes_the_recording_within_the_budget(tmp_path):
    data = tmp_path / "data"
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[server]\nport = 0\ndata_dir = "{data}"\nshutdown_seconds = 5\n[auth]\napi_keys = ["{API_KEY}"]\n'
        "[world_model]\nwidth = 320\nheight = 176\n[limits]\nstream_max_seconds = 60\n"
    )
    proc, base = await start_relay_process(config)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{base}/v1/connections", headers=AUTH) as r:
                conn = await r.json()
            control = await http.ws_connect(conn["control_url"], headers=AUTH)
            assert (await control.receive_json(timeout=10))["type"] == "connected"
            async with http.post(f"{base}/v1/connections/{conn['connection_id']}/streams", headers=AUTH,
                                 json={"prompt": "a lighthouse in a storm"}) as r:
                started = await r.json()
            stream_id, b = started["stream_id"], started["broadcast"]
            events = await http.ws_connect(f"{b['webrtc_url']}/events?token={b['spectator_token']}")
            assert (await events.receive_json(timeout=10))["type"] == "hello"
            signalling, _ = await open_signalling(http, base)
            video = data / "recordings" / stream_id / "video.mp4"
            await eventually(lambda: video.exists() and video.read_bytes().count(b"moof") >= 1, timeout=15,
                             what="a recorded fragment on disk")

            began = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            (control_messages, control_close), (events_messages, events_close), (sdk_messages, sdk_close) = (
                await asyncio.gather(_until_closed(control), _until_closed(events), _until_closed(signalling)))
            await asyncio.wait_for(proc.wait(), 10)
            elapsed = time.monotonic() - began

            assert {"type": "disconnected", "reason": "shutdown"} in control_messages, control_messages
            assert control_close == (1001, "shutdown")
            ended = [m for m in events_messages if m["type"] == "stream_ended"]
            assert ended and ended[0]["stream_id"] == stream_id, events_messages
            assert events_close == (1001, "shutdown")
            # The hosted API's SDK hears its own words for it, on the same close.
            assert sdk_messages == [{"type": "error", "reason": "streamer_disconnected"}]
            assert sdk_close == (1001, "shutdown")
            for ws in (control, events, signalling):
                await ws.close()
        assert proc.returncode == 0
        print(f"SIGTERM to exit: {elapsed:.2f} s")
        assert elapsed < 5, f"SIGTERM to exit took {elapsed:.2f} s"
        meta = json.loads((data / "recordings" / stream_id / "metadata.json").read_text())
        assert meta["status"] == "complete" and meta["ended_at"] is not None, meta
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
