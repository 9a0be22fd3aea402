"""Shared fixtures: a real relay on loopback with small, fast limits from config."""

from __future__ import annotations

import asyncio
import copy
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from relay.api.app import create_app
from relay.config import Settings
from relay.sessions import SessionManager
from relay.web import SESSIONS

API_KEY = "test-key-1"
OTHER_KEY = "test-key-2"

BASE: dict[str, Any] = {
    "server": {"host": "127.0.0.1", "port": 0, "max_body_bytes": 64 * 1024},
    "auth": {"api_keys": [API_KEY, OTHER_KEY]},
    "limits": {"stream_max_seconds": 3, "idle_timeout_seconds": 10, "spectator_timeout_seconds": 8},
    # Small frames keep three decoding test spectators and the encoder well inside 2 cores.
    "world_model": {"width": 320, "height": 176, "fps": 25},
    "webrtc": {"ice_host_addresses": ["127.0.0.1"]},
}


def make_settings(tmp_path, **sections: dict[str, Any]) -> Settings:
    data = copy.deepcopy(BASE)
    data["server"]["data_dir"] = str(tmp_path / "data")
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return Settings.from_dict(data)


@dataclass
class Relay:
    server: TestServer
    app: web.Application

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    @property
    def sessions(self) -> SessionManager:
        return self.app[SESSIONS]


@pytest.fixture
async def http():
    """One aiohttp client session for a test's raw HTTP and WebSocket calls."""
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def relay_factory(aiohttp_server, tmp_path):
    async def start(**sections: dict[str, Any]) -> Relay:
        app = create_app(make_settings(tmp_path, **sections))
        server = await aiohttp_server(app)
        return Relay(server, app)

    return start


@pytest.fixture
async def relay(relay_factory) -> Relay:
    return await relay_factory()


def mean_rgb(frame) -> np.ndarray:
    return frame.to_ndarray(format="rgb24").reshape(-1, 3).mean(axis=0)


async def frames_for(track, seconds: float) -> list:
    """Receive decoded frames for `seconds` of wall time."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    frames = []
    while (remaining := end - loop.time()) > 0:
        try:
            frames.append(await asyncio.wait_for(track.recv(), remaining))
        except asyncio.TimeoutError:
            break
    return frames


async def eventually(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> None:
    """Polls a condition (sync or async) until true, or fails after `timeout` s: waits on the event
    meant, not on a sleep that hopes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if loop.time() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        await asyncio.sleep(0.05)


async def next_of(ws, *types: str, timeout: float = 10.0) -> dict:
    """The next JSON message on a WebSocket whose ``type`` is one of ``types`` (the others skipped)."""
    async with asyncio.timeout(timeout):
        while True:
            message = await ws.receive_json()
            if message["type"] in types:
                return message


async def twin_session(http: aiohttp.ClientSession, base: str) -> tuple[str, str]:
    """An /odyssey session as the hosted API's SDK asks for one: its id and its signalling socket's URL."""
    async with http.post(f"{base}/odyssey/auth/token", json={"api_key": API_KEY}) as r:
        access = {"Authorization": f"Bearer {(await r.json())['access_token']}"}
    async with http.post(f"{base}/odyssey/sessions/request", headers=access, json={}) as r:
        session = await r.json()
    async with http.post(f"{base}/odyssey/sessions/token", headers=access,
                         json={"session_id": session["session_id"]}) as r:
        token = (await r.json())["session_token"]
    url = session["signalling_url"].replace("http://", "ws://", 1)
    return session["session_id"], f"{url}/client/{session['session_id']}?token={quote(token, safe='')}"


async def open_signalling(http: aiohttp.ClientSession, base: str) -> tuple[aiohttp.ClientWebSocketResponse, str]:
    """The SDK's signalling socket, left at the relay's offer; and the session's id."""
    session_id, url = await twin_session(http, base)
    ws = await http.ws_connect(url)
    assert (await ws.receive_json(timeout=10))["type"] == "offer"
    return ws, session_id


async def start_relay_process(config, stderr=asyncio.subprocess.DEVNULL) -> tuple[asyncio.subprocess.Process, str]:
    """`relay serve --config FILE` as a real subprocess; returns it and its base URL once listening."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay.cli", "serve", "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=stderr)
    while True:
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert line, "serve exited before listening"
        if m := re.search(r"listening on (\S+)", line):
            return proc, m.group(1)


async def frames_pass(relay: Relay, broadcast_id: str, frames: int) -> None:
    """Wait until the broadcast's live stream has produced `frames` more encoded frames: a point
    later in the stream's own time, e.g. to give two prompts distinct offsets."""
    hub = relay.sessions.broadcast(broadcast_id).media.hub
    target = hub.published + frames
    await eventually(lambda: hub.published >= target, timeout=10, what=f"{frames} more frames")
