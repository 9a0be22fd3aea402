"""The `relay` command as a newcomer runs it: a real subprocess."""

from __future__ import annotations

import asyncio
import os
import re
import sys

import aiohttp
import pytest

from relay.client import Spectator


async def run_relay(*args: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay.cli", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )


async def test_version():
    proc = await run_relay("--version")
    out, _ = await proc.communicate()
    assert proc.returncode == 0 and out.decode().startswith("relay ")


@pytest.mark.parametrize(
    "toml, key",
    [
        ("[limits]\nstreamers = 0\n", "limits.streamers"),
        ("[limits]\nstreamrs = 2\n", "limits.streamrs"),
        ("[world_model]\nwidth = 641\n", "world_model.width"),
        ("[server]\nport = \"eighty\"\n", "server.port"),
    ],
)
async def test_bad_config_stops_serve_naming_the_key(tmp_path, toml, key):
    path = tmp_path / "relay.toml"
    path.write_text(toml)
    proc = await run_relay("serve", "--config", str(path))
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    assert key in err.decode()


async def test_demo_serves_a_live_watch_url(tmp_path):
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[server]\nport = 0\ndata_dir = "{tmp_path / "data"}"\n'
        "[world_model]\nwidth = 320\nheight = 176\n"
        "[media]\nkeyframe_interval_seconds = 0.5\n"  # half-second HLS segments: the 3 the GET waits for come sooner
    )
    proc = await run_relay("serve", "--demo", "--config", str(config), env={"RELAY_API_KEY": ""})
    try:
        lines = []
        watch = key = hls = None
        while hls is None:
            line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
            assert line, "serve exited early: " + (await proc.stderr.read()).decode()
            lines.append(line)
            if m := re.search(r"API key .*: (\S+)", line):
                key = m.group(1)
            if m := re.search(r"demo watch URL: (\S+)", line):
                watch = m.group(1)
            if m := re.search(r"demo HLS URL: +(\S+)", line):
                hls = m.group(1)
        assert key and watch, lines  # no key configured: serve made one and printed it
        base, broadcast_id, token = re.match(r"(http://[^/]+)/watch/([^?]+)\?token=(.+)", watch).groups()
        async with Spectator(f"{base}/v1/broadcasts/{broadcast_id}/whep", token) as viewer:
            frame = await asyncio.wait_for(viewer.track.recv(), 15)
            assert (frame.width, frame.height) == (320, 176)
        async with aiohttp.ClientSession() as http, http.get(hls) as r:  # held until 3 segments exist
            assert r.status == 200 and (await r.text()).count("#EXTINF") >= 3
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 15)
    assert proc.returncode == 0


async def test_a_taken_port_stops_serve_with_one_clear_line(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "relay.toml"
        config.write_text(f'[server]\nport = {port}\ndata_dir = "{tmp_path / "data"}"\n')
        proc = await run_relay("serve", "--config", str(config))
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in err.decode() and "Traceback" not in err.decode()
