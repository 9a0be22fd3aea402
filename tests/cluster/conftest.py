"""A real Redis for the cluster tests: Debian's redis-server on a free loopback port, started and
stopped by the fixture (nothing persisted: no RDB, no AOF)."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket

import aiohttp
import pytest

from tests.conftest import eventually, start_relay_process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """One redis-server process; stop() and start() again on the same port (a Redis outage)."""

    def __init__(self, tmp_path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._dir = tmp_path
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(self._dir), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while True:  # ready once it answers PING
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.write(b"PING\r\n")
                if (await asyncio.wait_for(reader.readline(), 2)).startswith(b"+PONG"):
                    writer.close()
                    return
                writer.close()
            except OSError:
                pass
            if loop.time() > deadline:
                raise RuntimeError("redis-server did not start")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await self.proc.wait()
        self.proc = None


@pytest.fixture
async def redis_server(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (Debian's redis-server; .ci/run installs it)")
    server = RedisServer(tmp_path)
    await server.start()
    yield server
    await server.stop()


CLUSTER_KEY = "cluster-key-1"
AUTH = {"Authorization": f"Bearer {CLUSTER_KEY}"}


class Node:
    """One `relay serve` process of a test cluster."""

    def __init__(self, proc: asyncio.subprocess.Process, url: str, node_id: str) -> None:
        self.proc, self.url, self.node_id = proc, url, node_id

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()  # SIGKILL: no goodbye, the others must notice by the heartbeat alone

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 15)
            except asyncio.TimeoutError:
                self.proc.kill()
        await self.proc.wait()


def node_config(tmp_path, redis_url: str, name: str, **sections) -> tuple[str, str]:
    """A node's TOML config file (the same for every node but port, public_url and data_dir); (path, id)."""
    port = free_port()
    data: dict = {
        "server": {"host": "127.0.0.1", "port": port, "public_url": f"http://127.0.0.1:{port}",
                   "data_dir": str(tmp_path / name), "shutdown_seconds": 3},
        "auth": {"api_keys": [CLUSTER_KEY]},
        "limits": {"streamers": 2, "stream_max_seconds": 60, "idle_timeout_seconds": 30},
        "world_model": {"width": 160, "height": 96, "fps": 25},
        "webrtc": {"ice_host_addresses": ["127.0.0.1"]},
        "recordings": {"enabled": False},
        "cluster": {"redis_url": redis_url, "node_id": name, "heartbeat_seconds": 0.25, "node_timeout_seconds": 1.5},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    lines = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml(value)}" for key, value in values.items()]
    path = tmp_path / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path), name


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


@pytest.fixture
async def cluster(redis_server, tmp_path):
    """start(n, **sections) -> n nodes of one cluster on the test's Redis; all stopped at the end."""
    nodes: list[Node] = []

    async def start(n: int = 3, **sections) -> list[Node]:
        started = []
        for i in range(n):
            path, name = node_config(tmp_path, redis_server.url, f"node{len(nodes) + 1}", **sections)
            proc, url = await start_relay_process(path)
            node = Node(proc, url, name)
            nodes.append(node)
            started.append(node)
        return started

    yield start
    await asyncio.gather(*(node.stop() for node in nodes))


async def open_connection(http: aiohttp.ClientSession, node) -> dict:
    async with http.post(f"{node.url}/v1/connections", headers=AUTH) as r:
        assert r.status == 201, await r.text()
        return await r.json()


async def members(http: aiohttp.ClientSession, node) -> set[str]:
    async with http.get(f"{node.url}/readyz") as r:
        return {n["node_id"] for n in (await r.json())["cluster"]["nodes"]}


async def all_joined(http, nodes) -> None:
    names = {n.node_id for n in nodes}

    async def joined():
        return all([await members(http, n) == names for n in nodes])
    await eventually(joined, timeout=10, what="every node sees every node")
