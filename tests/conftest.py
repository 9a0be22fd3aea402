"""Shared fixtures: a real relay on loopback with small, fast limits from config."""

from __future__ import annotations

import asyncio
import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from relay.api.app import create_app
from relay.api.common import SESSIONS
from relay.config import Settings
from relay.sessions import SessionManager

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
