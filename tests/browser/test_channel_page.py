"""A channel's watch page in real Chromium: opened before any host, it says what it is and that it
starts soon, then plays once live, without a reload, across hosts."""

from __future__ import annotations

import pytest
from playwright.async_api import expect

from relay.client import RelayClient
from tests.browser.conftest import CHROMIUM, HAVE_CHROMIUM
from tests.browser.test_pages import LONG, assert_playing, expect_badge
from tests.conftest import API_KEY

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
