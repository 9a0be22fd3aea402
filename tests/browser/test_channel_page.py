"""A channel's watch page in real Chromium: opened before any host, it says what it is and that it
starts soon, then plays once live, without a reload, across hosts."""

from __future__ import annotations

import signal
import socket

import pytest
from playwright.async_api import expect

from relay.client import RelayClient
from tests.browser.conftest import CHROMIUM, HAVE_CHROMIUM
from tests.browser.test_pages import LONG, assert_playing, expect_badge
from tests.conftest import API_KEY, start_relay_process

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not HAVE_CHROMIUM, reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"),
]


async def test_channel_watch_page_opened_before_the_host_plays_once_live(relay_factory, open_page):
    relay = await relay_factory(limits=LONG)
    async with RelayClient(relay.url, API_KEY) as client:
        channel = await client.create_channel("Friday <b>worlds</b>", slug="friday")
        page = await open_page(channel["broadcast"]["watch_url"])
        await page.evaluate("window.__samePage = true")
        await expect_badge(page, "soon", "Starting soon")
        note = page.locator("#stage-note")
        await expect(note).to_contain_text("Friday <b>worlds</b>: starting soon")  # the title, as text
        await expect(page.locator("#message")).to_be_hidden()

        async with client.connect("friday") as conn:
            await conn.start_stream("a calm ocean at sunset")
            await assert_playing(page)
            await expect_badge(page, "live", "Live")
            await expect(note).to_be_hidden()

        # The host left: the channel is between streams, not over.
        await expect_badge(page, "soon", "Starting soon")
        await expect(note).to_be_visible()
        await expect(page.locator("#message")).to_be_hidden()

        async with client.connect("friday") as conn:
            await conn.start_stream("snowy mountains at dawn")
            await expect_badge(page, "live", "Live")
            await assert_playing(page)
        assert await page.evaluate("window.__samePage === true")  # never reloaded


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_channel_watch_page_plays_again_after_a_relay_restart(tmp_path, open_page):
    """kill -9 and restart on the same port: the open page finds the same broadcast and plays the next stream."""
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[server]\nport = {free_port()}\ndata_dir = "{tmp_path / "data"}"\n[auth]\napi_keys = ["{API_KEY}"]\n'
        "[world_model]\nwidth = 320\nheight = 176\n[limits]\nstream_max_seconds = 60\nidle_timeout_seconds = 60\n"
    )
    proc, base = await start_relay_process(config)
    try:
        async with RelayClient(base, API_KEY) as client:
            channel = await client.create_channel("Restart-proof", slug="lasting")
            page = await open_page(channel["broadcast"]["watch_url"])
            await page.evaluate("window.__samePage = true")
            info = await client.request("POST", "/v1/connections", json={"channel_id": "lasting"})
            await client.request("POST", f"/v1/connections/{info['connection_id']}/streams", json={"prompt": "dunes"})
            await assert_playing(page)
        proc.send_signal(signal.SIGKILL)
        await proc.wait()

        proc, base = await start_relay_process(config)
        async with RelayClient(base, API_KEY) as client:
            async with client.connect("lasting") as conn:
                assert conn.broadcast["watch_url"] == channel["broadcast"]["watch_url"]
                await conn.start_stream("a green forest in spring")
                await expect_badge(page, "live", "Live", timeout=20_000)
                await assert_playing(page, first_frame_ms=20_000)
        assert await page.evaluate("window.__samePage === true")
    finally:
        proc.terminate()
        await proc.wait()
