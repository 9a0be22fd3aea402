"""Failures as a viewer sees them, in real Chromium against three `relay serve` nodes and a real Redis:
the node serving a watch page killed -9 (the page rejoins through another node by itself), and the
broadcast's origin killed -9 (every page says it ended, every node answers 404, nothing is left behind
on the survivors). Heartbeat 0.25 s and node_timeout 1.5 s (tests/cluster/conftest.py) keep it quick."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
from playwright.async_api import Page, expect

from tests.browser.conftest import CHROMIUM, HAVE_CHROMIUM
from tests.browser.helpers import assert_playing, video_reading
from tests.cluster.conftest import AUTH, all_joined, open_connection
from tests.conftest import eventually

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not HAVE_CHROMIUM, reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"),
]

# The origin drops a dead edge's feed peer once it has heard nothing for this long.
SECTIONS = {"limits": {"spectator_timeout_seconds": 2, "stream_max_seconds": 60, "idle_timeout_seconds": 60}}
SIZE = (160, 96)  # tests/cluster/conftest.py's world model


async def live_broadcast(http: aiohttp.ClientSession, origin) -> dict:
    conn = await open_connection(http, origin)
    async with http.post(f"{origin.url}/v1/connections/{conn['connection_id']}/streams", headers=AUTH,
                         json={"prompt": "a calm ocean"}) as r:
        assert r.status == 201, await r.text()
    return conn["broadcast"]


async def watch(open_page, node, broadcast: dict) -> Page:
    page = await open_page(f"{node.url}/watch/{broadcast['broadcast_id']}?token={broadcast['spectator_token']}")
    await assert_playing(page, size=SIZE)
    # It knows where else to go before anything fails.
    await expect(page.locator("#stage")).to_have_attribute("data-nodes", "3", timeout=5000)
    return page


async def gauges(http: aiohttp.ClientSession, node) -> dict[str, float]:
    async with http.get(f"{node.url}/metrics") as r:
        text = await r.text()
    values = {}
    for line in text.splitlines():
        if line.startswith("relay_") and " " in line:
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


async def whep_status(http: aiohttp.ClientSession, node, broadcast: dict) -> int:
    async with http.post(f"{node.url}/v1/broadcasts/{broadcast['broadcast_id']}/whep", data="v=0\r\n",
                         params={"token": broadcast["spectator_token"]},
                         headers={"Content-Type": "application/sdp"}) as r:
        return r.status


async def test_edge_killed_the_watch_page_plays_again_through_another_node(cluster, open_page, http):
    a, b, c = await cluster(3, **SECTIONS)
    await all_joined(http, [a, b, c])
    broadcast = await live_broadcast(http, a)
    page = await open_page()
    hellos: list[dict] = []  # the events sockets' hellos, wherever the page opens them

    def on_socket(ws) -> None:
        def on_frame(payload) -> None:
            msg = json.loads(payload) if isinstance(payload, str) else {}
            if msg.get("type") == "hello":
                hellos.append({**msg, "at": ws.url.split("/v1/")[0]})
        ws.on("framereceived", on_frame)
    page.on("websocket", on_socket)
    await page.goto(f"{b.url}/watch/{broadcast['broadcast_id']}?token={broadcast['spectator_token']}")
    await assert_playing(page, size=SIZE)  # through B, an edge for A's broadcast
    await expect(page.locator("#stage")).to_have_attribute("data-nodes", "3", timeout=5000)
    assert len(hellos) == 1 and hellos[0]["at"] == b.url.replace("http", "ws", 1)

    b.kill()
    killed = time.monotonic()
    await page.wait_for_function(f"document.getElementById('stage').dataset.node !== undefined "
                                 f"&& document.getElementById('stage').dataset.node !== {b.url!r}", timeout=10_000)
    home = await page.evaluate("document.getElementById('stage').dataset.node")
    assert home in (a.url, c.url)
    # B is dead, so frames that arrive now came through the new node.
    first = await video_reading(page, "#video")
    await page.wait_for_function(
        """([t, frames]) => {
            const v = document.getElementById('video');
            return v.currentTime > t + 0.5 && v.getVideoPlaybackQuality().totalVideoFrames >= frames + 12;
        }""", arg=[first["t"], first["frames"]], timeout=10_000)
    back = time.monotonic() - killed
    print(f"\nwatch page playing again through {home} {back:.2f} s after its edge was killed")
    assert back < 8, f"the page took {back:.1f} s to play again"
    await expect(page.locator("#state")).to_have_attribute("data-state", "live")
    # Its events socket came back at the new node as the same participant (the resume token held).
    await eventually(lambda: len(hellos) >= 2, timeout=5, what="the events socket's hello at the new node")
    again = hellos[-1]
    assert again["at"] == home.replace("http", "ws", 1)
    assert again["resumed"] is True and again["participant_id"] == hellos[0]["participant_id"]

    # On the survivors: the page's one peer where it watches now, plus (if that is C, an edge) C's feed
    # at A; the dead B's feed peer at A is gone. Nothing else.
    expected = {a.url: 1, c.url: 0} if home == a.url else {a.url: 1, c.url: 2}

    async def settled() -> bool:
        return all([(await gauges(http, node))["relay_peer_connections"] == expected[node.url] for node in (a, c)])
    await eventually(settled, timeout=6, what=f"peer connections settling at {expected}")
    assert (await gauges(http, a))["relay_cluster_edge_feeds"] == 0
    assert (await gauges(http, c))["relay_cluster_edge_feeds"] == (1 if home == c.url else 0)


async def test_origin_killed_pages_say_ended_whep_404_everywhere_and_nothing_leaks(cluster, open_page, http):
    a, b, c = await cluster(3, **SECTIONS)
    await all_joined(http, [a, b, c])
    before = {node.url: await gauges(http, node) for node in (b, c)}
    broadcast = await live_broadcast(http, a)
    # A page at each edge, and one at the origin itself (which must move to a survivor to learn it ended).
    pages = await asyncio.gather(watch(open_page, b, broadcast), watch(open_page, c, broadcast),
                                 watch(open_page, a, broadcast))
    for node in (b, c):
        got = await gauges(http, node)
        assert got["relay_cluster_edge_feeds"] == 1 and got["relay_peer_connections"] == 2  # feed + page
    assert (await gauges(http, a))["relay_peer_connections"] == 3  # the page's, and a feed for each edge

    a.kill()
    killed = time.monotonic()
    for page in pages:  # (the one at A has moved to B or C to hear it)
        await expect(page.locator("#state")).to_have_attribute("data-state", "ended", timeout=10_000)
        await expect(page.locator("#message")).to_contain_text("ended")
    print(f"\nall three pages said the broadcast ended {time.monotonic() - killed:.2f} s after its origin was killed")
    for node in (b, c):
        assert await whep_status(http, node, broadcast) == 404
        async with http.get(f"{node.url}/v1/broadcasts/{broadcast['broadcast_id']}",
                            params={"token": broadcast["spectator_token"]}) as r:
            assert r.status == 404

    # The survivors drop their feeds, and every peer, task and thread the broadcast brought (the pages
    # closed first: each open keep-alive connection of theirs is a task of the node's HTTP server).
    for page in pages:
        await page.context.close()
    async def clean(node) -> bool:
        now, then = await gauges(http, node), before[node.url]
        return (now["relay_cluster_edge_feeds"] == 0 and now["relay_peer_connections"] == 0
                and now["relay_tasks"] <= then["relay_tasks"] and now["relay_threads"] <= then["relay_threads"])

    for node in (b, c):
        try:
            await eventually(lambda: clean(node), timeout=6, what=f"{node.node_id} back to its figures before")
        except AssertionError:
            now, then = await gauges(http, node), before[node.url]
            keys = ("relay_cluster_edge_feeds", "relay_peer_connections", "relay_tasks", "relay_threads")
            raise AssertionError({k: (then[k], now[k]) for k in keys}) from None
