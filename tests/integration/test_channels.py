"""Channels end to end: a watch link that lasts across connections, streams and relay restarts."""

from __future__ import annotations

import asyncio
import signal
import subprocess

import pytest

from relay.client import RelayAPIError, RelayClient, Spectator
from tests.conftest import API_KEY, OTHER_KEY, eventually, start_relay_process
from tests.integration.test_storage_limits import Disk

AUTH = {"Authorization": f"Bearer {API_KEY}"}


async def receives_frames(spectator: Spectator, count: int = 10, timeout: float = 10.0) -> None:
    for _ in range(count):
        await asyncio.wait_for(spectator.track.recv(), timeout)


async def test_spectator_joined_before_the_host_watches_every_connection_on_the_channel(relay_factory):
    relay = await relay_factory(limits={"stream_max_seconds": 30})
    async with RelayClient(relay.url, API_KEY) as client:
        channel = await client.create_channel("Friday night worlds", description="Weekly", slug="friday",
                                              host_name="Ada")
        b = channel["broadcast"]
        assert channel["live"] is False and channel["connection_id"] is None
        assert b["watch_url"].endswith(f"/watch/{b['broadcast_id']}?token={b['spectator_token']}")
        async with client.http.get(f"{relay.url}/v1/broadcasts/{b['broadcast_id']}",
                                   headers={"Authorization": f"Bearer {b['spectator_token']}"}) as r:
            state = await r.json()
        assert r.status == 200, state
        assert (state["title"], state["description"], state["host_name"]) == ("Friday night worlds", "Weekly", "Ada")
        assert state["channel"] is True and state["live"] is False

        # A spectator joins while nobody is live, and stays connected.
        async with Spectator(b["whep_url"], b["spectator_token"]) as viewer:
            async with client.connect("friday") as conn:  # by slug
                assert conn.broadcast == b  # the same links: id, watch URL, token
                assert conn.info["channel_id"] == channel["channel_id"]
                assert (await client.get_channel("friday"))["connection_id"] == conn.connection_id
                await conn.start_stream("a calm ocean at sunset")
                await receives_frames(viewer)
                pc = viewer.pc
                # A second host on the same channel while one is connected: refused, clearly.
                with pytest.raises(RelayAPIError) as refused:
                    await client.request("POST", "/v1/connections", json={"channel_id": channel["channel_id"]})
                assert refused.value.status == 409
                assert refused.value.code == "CHANNEL_IN_USE"
            # The host left: the channel's broadcast stays, its spectator too.
            assert relay.sessions.broadcast(b["broadcast_id"]).connection_id is None
            async with client.connect(channel["channel_id"]) as again:
                assert again.broadcast == b
                await again.start_stream("snowy mountains at dawn")
                await receives_frames(viewer)
                assert viewer.pc is pc and pc.connectionState == "connected"


async def test_delete_channel_closes_its_connection_and_broadcast(relay_factory):
    relay = await relay_factory()
    async with RelayClient(relay.url, API_KEY) as client:
        channel = await client.create_channel("Short lived")
        b = channel["broadcast"]
        assert [c["channel_id"] for c in await client.list_channels()] == [channel["channel_id"]]
        info = await client.request("POST", "/v1/connections", json={"channel_id": channel["channel_id"]})
        await client.delete_channel(channel["channel_id"])
        assert info["connection_id"] not in relay.sessions.connections
        assert b["broadcast_id"] not in relay.sessions.broadcasts
        for path in (f"/v1/channels/{channel['channel_id']}", f"/v1/broadcasts/{b['broadcast_id']}"):
            async with client.http.get(relay.url + path,
                                       headers={"Authorization": f"Bearer {b['spectator_token']}"
                                                if "broadcasts" in path else f"Bearer {API_KEY}"}) as r:
                assert r.status == 404, path
        assert await client.list_channels() == []


async def error_of(response) -> tuple[int, str, dict]:
    body = await response.json()
    return response.status, body["error"]["code"], body["error"]["details"]


@pytest.mark.parametrize("body, status, code, field", [
    ({"title": "x" * 121}, 422, "INVALID_REQUEST", "title"),
    ({}, 422, "INVALID_REQUEST", "title"),
    ({"title": "  "}, 422, "INVALID_REQUEST", "title"),
    ({"title": 5}, 422, "INVALID_REQUEST", "title"),
    ({"title": "ok", "description": "d" * 1001}, 422, "INVALID_REQUEST", "description"),
    ({"title": "ok", "host_name": "a\nb"}, 422, "INVALID_REQUEST", "host_name"),
    ({"title": "ok", "slug": "Bad Slug!"}, 422, "INVALID_REQUEST", "slug"),
    ({"title": "ok", "slug": "-edge"}, 422, "INVALID_REQUEST", "slug"),
    ({"title": "ok", "slug": "a" * 49}, 422, "INVALID_REQUEST", "slug"),
    ({"title": "ok", "slug": ["x"]}, 422, "INVALID_REQUEST", "slug"),
])
async def test_bad_channel_bodies_are_refused(relay_factory, http, body, status, code, field):
    relay = await relay_factory()
    async with http.post(f"{relay.url}/v1/channels", json=body, headers=AUTH) as r:
        got = await error_of(r)
    assert got[:2] == (status, code) and got[2]["field"] == field, got


async def test_channel_bounds_and_ownership(relay_factory, http):
    relay = await relay_factory(limits={"channels_per_key": 2})
    url = f"{relay.url}/v1/channels"
    async with http.post(url, json={"title": "one", "slug": "one"}) as r:
        assert r.status == 401
    async with http.post(url, json={"title": "one", "slug": "one"}, headers=AUTH) as r:
        mine = await r.json()
        assert r.status == 201, mine
    async with http.post(url, json={"title": "again", "slug": "one"}, headers=AUTH) as r:
        assert await error_of(r) == (409, "SLUG_TAKEN", {"slug": "one"})
    async with http.post(url, json={"title": "two"}, headers=AUTH) as r:
        assert r.status == 201
    async with http.post(url, json={"title": "three"}, headers=AUTH) as r:
        assert await error_of(r) == (409, "CHANNEL_LIMIT_REACHED", {"count": 2, "limit": 2})

    other = {"Authorization": f"Bearer {OTHER_KEY}"}
    async with http.post(url, json={"title": "theirs", "slug": "one"}, headers=other) as r:
        assert r.status == 201  # slugs are per key
    async with http.get(f"{url}/one", headers=other) as r:
        assert (await r.json())["channel_id"] != mine["channel_id"]  # its own "one"
    for ref in (mine["channel_id"], "no-such-channel"):  # another key's channel is as unknown as none
        async with http.get(f"{url}/{ref}", headers=other) as r:
            assert (await error_of(r))[:2] == (404, "NOT_FOUND")
        async with http.delete(f"{url}/{ref}", headers=other) as r:
            assert r.status == 404
    for channel_id, status in ((mine["channel_id"], 404), ("nope", 404), (7, 400)):
        async with http.post(f"{relay.url}/v1/connections", json={"channel_id": channel_id}, headers=other) as r:
            assert r.status == status
    assert not relay.sessions.connections  # nothing opened, no streamer held


async def test_update_a_channel_keeps_its_links(relay_factory, http):
    relay = await relay_factory()
    async with RelayClient(relay.url, API_KEY) as client:
        channel = await client.create_channel("Tpyo", slug="first", host_name="Ada")
        await client.create_channel("Other", slug="taken")
        b = channel["broadcast"]
        watching = relay.sessions.broadcast(b["broadcast_id"])  # a spectator made it already
        events = await http.ws_connect(f"{relay.url}/v1/broadcasts/{b['broadcast_id']}/events"
                                       f"?token={b['spectator_token']}")  # an open watch page
        hello = await events.receive_json(timeout=5)
        assert (hello["type"], hello["title"], hello["host_name"]) == ("hello", "Tpyo", "Ada")
        changed = await client.update_channel("first", title="Typo fixed", slug="second", host_name=None)
        while (pushed := await events.receive_json(timeout=5))["type"] != "about":
            pass  # told at once, not on the next hello
        assert pushed == {"type": "about", "channel": True, "title": "Typo fixed", "description": None,
                          "host_name": None}
        await events.close()
        assert (changed["title"], changed["slug"], changed["host_name"]) == ("Typo fixed", "second", None)
        assert changed["broadcast"] == b and changed["channel_id"] == channel["channel_id"]
        assert watching.state()["title"] == "Typo fixed"
        assert (await client.get_channel("second"))["title"] == "Typo fixed"
    url = f"{relay.url}/v1/channels/second"
    for body, status, code in (({"slug": "taken"}, 409, "SLUG_TAKEN"), ({"title": None}, 422, "INVALID_REQUEST"),
                               ({"title": "t" * 121}, 422, "INVALID_REQUEST"), ({"slug": "No!"}, 422, "INVALID_REQUEST")):
        async with http.patch(url, json=body, headers=AUTH) as r:
            assert (await error_of(r))[:2] == (status, code), body
    async with http.patch(url, json={"title": "theirs now"}, headers={"Authorization": f"Bearer {OTHER_KEY}"}) as r:
        assert r.status == 404
    async with http.get(url, headers=AUTH) as r:
        assert (await r.json())["title"] == "Typo fixed"



def left_behind(baseline: set[asyncio.Task]) -> set[asyncio.Task]:
    """Tasks started since ``baseline`` and still running, but the test's own and aiohttp's keep-alive
    handlers of the client's open HTTP connections."""
    return {t for t in asyncio.all_tasks() - baseline - {asyncio.current_task()}
            if t.get_coro().__qualname__ != "RequestHandler.start"}


async def test_an_unused_channel_broadcast_is_released_and_plays_again_when_a_spectator_comes(relay_factory):
    relay = await relay_factory(limits={"channel_release_seconds": 0.3, "stream_max_seconds": 30})
    baseline = set(asyncio.all_tasks())
    async with RelayClient(relay.url, API_KEY) as client:
        channel = await client.create_channel("Comes and goes")
        b = channel["broadcast"]
        async with client.connect(channel["channel_id"]) as conn:  # one stream: HLS segments to free
            await conn.start_stream("a calm ocean at sunset")
            async with Spectator(b["whep_url"], b["spectator_token"]) as viewer:
                await receives_frames(viewer)
        first = relay.sessions.broadcasts[b["broadcast_id"]]  # the host and the viewer left; it stays a while
        await eventually(lambda: b["broadcast_id"] not in relay.sessions.broadcasts, timeout=5,
                         what="the unused broadcast released")
        assert first.closed and len(first.spectators) == 0 and first.audience.participants == 0
        await eventually(lambda: not left_behind(baseline), timeout=5,
                         what="no task left behind by the released broadcast")

        # The same watch link still works: a spectator arriving after the release plays once the host is live.
        async with Spectator(b["whep_url"], b["spectator_token"]) as viewer:
            again = relay.sessions.broadcasts[b["broadcast_id"]]
            assert again is not first and again.spectator_token == b["spectator_token"]
            async with client.connect(channel["channel_id"]) as conn:
                assert conn.broadcast == b
                await conn.start_stream("snowy mountains at dawn")
                await receives_frames(viewer)

@pytest.fixture
def disk(tmp_path):
    """data_dir on its own 4 MB tmpfs (as test_storage_limits.py's), so the disk can really be filled."""
    path = tmp_path / "data"
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield Disk(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


async def test_a_full_disk_refuses_a_new_channel_with_507_and_keeps_the_old_list(relay_factory, disk, http):
    relay = await relay_factory(server={"data_dir": str(disk.path)})
    async with http.post(f"{relay.url}/v1/channels", json={"title": "kept"}, headers=AUTH) as r:
        assert r.status == 201
    disk.fill()
    try:
        async with http.post(f"{relay.url}/v1/channels", json={"title": "x" * 120}, headers=AUTH) as r:
            assert (await error_of(r))[:2] == (507, "INSUFFICIENT_STORAGE")
        async with http.get(f"{relay.url}/v1/channels", headers=AUTH) as r:
            assert [c["title"] for c in (await r.json())["channels"]] == ["kept"]
        assert not list(disk.path.rglob("*.tmp"))
    finally:
        disk.free()


async def test_the_watch_url_survives_a_relay_restart(tmp_path):
    data = tmp_path / "data"
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[server]\nport = 0\ndata_dir = "{data}"\n[auth]\napi_keys = ["{API_KEY}"]\n'
        "[world_model]\nwidth = 320\nheight = 176\n[limits]\nstream_max_seconds = 60\n"
    )
    proc, base = await start_relay_process(config)
    try:
        async with RelayClient(base, API_KEY) as client:
            channel = await client.create_channel("Survives restarts", slug="lasting")
            async with client.connect("lasting") as conn:
                await conn.start_stream("a desert of red dunes")
    finally:
        proc.send_signal(signal.SIGKILL)  # no goodbye: the channel must already be on disk
        await proc.wait()

    proc, base = await start_relay_process(config)
    try:
        async with RelayClient(base, API_KEY) as client:
            again = await client.get_channel("lasting")
            assert again["broadcast"]["broadcast_id"] == channel["broadcast"]["broadcast_id"]
            assert again["broadcast"]["spectator_token"] == channel["broadcast"]["spectator_token"]
            b = again["broadcast"]
            async with Spectator(b["whep_url"], b["spectator_token"]) as viewer:
                async with client.connect("lasting") as conn:
                    assert conn.broadcast["watch_url"] == b["watch_url"]
                    await conn.start_stream("a green forest in spring")
                    await receives_frames(viewer)
                async with client.http.get(b["watch_url"]) as r:
                    assert r.status == 200
                # Between hosts the spectator stays connected.
                await eventually(lambda: viewer.pc.connectionState == "connected", timeout=2,
                                 what="the spectator still connected")
    finally:
        proc.terminate()
        await proc.wait()
