"""Channels from the host console, in real Chromium: the host names a channel, goes live on it, and the
watch link stays the same on the next connection; a renamed channel reaches open watch pages at once."""

from __future__ import annotations

import pytest
from playwright.async_api import expect

from relay.client import RelayClient
from tests.browser.conftest import CHROMIUM, HAVE_CHROMIUM
from tests.browser.test_pages import assert_playing, expect_badge
from tests.conftest import API_KEY

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not HAVE_CHROMIUM, reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"),
]

expect.set_options(timeout=10_000)


async def test_the_console_creates_a_channel_and_keeps_its_watch_link_across_connections(relay_factory, open_page):
    relay = await relay_factory(limits={"stream_max_seconds": 30})
    host = await open_page(f"{relay.url}/host")
    await host.fill("#api-key", API_KEY)
    await host.locator("#api-key").dispatch_event("change")  # the picker lists this key's channels
    await host.select_option("#channel", "new")
    await expect(host.locator("#channel-new")).to_be_visible()
    await host.fill("#channel-title", "Friday <i>worlds</i>")
    await host.fill("#channel-host", "Ada")
    await host.click("#connect")
    await expect(host.locator("#connection-state")).to_have_text("Connected")
    async with RelayClient(relay.url, API_KEY) as client:
        [channel] = await client.list_channels()
    assert (channel["title"], channel["host_name"]) == ("Friday <i>worlds</i>", "Ada")
    assert await host.locator("#channel").input_value() == channel["channel_id"]  # chosen for next time
    await expect(host.locator("#channel")).to_be_disabled()  # no switching while connected
    link = host.locator("#watch-url")
    await expect(link).to_be_visible()
    watch_url = await link.get_attribute("href")
    assert watch_url == channel["broadcast"]["watch_url"]

    await host.fill("#prompt", "a lighthouse in a storm")
    await host.click("#start")
    await expect(host.locator("#stream-status")).to_have_attribute("data-state", "live")
    watch = await open_page(watch_url)
    await assert_playing(watch)
    await expect(watch.locator("#broadcast-title")).to_have_text("Friday <i>worlds</i>")  # as text
    await expect(watch.locator("#broadcast-host")).to_have_text("Hosted by Ada")

    # A title fixed while the page is open reaches it over the events socket, no reload.
    await watch.evaluate("window.__samePage = true")
    async with RelayClient(relay.url, API_KEY) as client:
        await client.update_channel(channel["channel_id"], title="Friday worlds, live", host_name=None)
    await expect(watch.locator("#broadcast-title")).to_have_text("Friday worlds, live")
    await expect(watch.locator("#broadcast-host")).to_be_hidden()

    # Disconnect and connect again: the same channel is still chosen, the watch link the same.
    await host.click("#disconnect")
    await expect(host.locator("#connection-state")).to_have_text("Not connected")
    await expect_badge(watch, "soon", "Starting soon")  # between hosts, not ended
    await host.click("#connect")
    await expect(host.locator("#connection-state")).to_have_text("Connected")
    await expect(link).to_have_attribute("href", watch_url)
    await host.fill("#prompt", "snowy mountains at dawn")
    await host.click("#start")
    await expect_badge(watch, "live", "Live")
    await assert_playing(watch)
    assert await watch.evaluate("window.__samePage === true")


async def test_a_new_channel_without_a_title_is_asked_for_not_sent(relay_factory, open_page):
    relay = await relay_factory()
    host = await open_page(f"{relay.url}/host")
    await host.fill("#api-key", API_KEY)
    await host.select_option("#channel", "new")
    await host.click("#connect")
    await expect(host.locator("#host-message")).to_contain_text("Give the new channel a title")
    await expect(host.locator("#connection-state")).to_have_text("Not connected")
    await expect(host.locator("#channel-title")).to_be_focused()
    assert not relay.sessions.connections
