"""The host console as a host uses it: a reload keeps the broadcast, a relay restart is said plainly,
and the control room shows the audience. Real Chromium, real relay (in-process or `relay serve`)."""

from __future__ import annotations

import asyncio
import signal
import socket

import pytest
from playwright.async_api import Page, expect

from relay.client import Spectator
from tests.browser.conftest import CHROMIUM, HAVE_CHROMIUM
from tests.browser.test_pages import assert_playing, expect_badge, only_connection
from tests.conftest import API_KEY, eventually, frames_for, start_relay_process

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not HAVE_CHROMIUM, reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"),
]

UI_MS = 10_000
expect.set_options(timeout=UI_MS)


async def connect_and_start(page: Page, prompt: str) -> None:
    await page.fill("#api-key", API_KEY)
    await page.click("#connect")
    await expect(page.locator("#connection-state")).to_have_text("Connected")
    await page.fill("#prompt", prompt)
    await page.click("#start")
    await expect(page.locator("#stream-status")).to_have_attribute("data-state", "live")


async def watch_messages(page: Page) -> None:
    """Keep every text the watch page's message line shows, to read back with said()."""
    await page.evaluate("""() => {
        window.__said = [];
        const m = document.getElementById('message');
        new MutationObserver(() => { if (!m.hidden) window.__said.push(m.textContent); })
            .observe(m, {childList: true, characterData: true, subtree: true, attributes: true});
    }""")


async def said(page: Page) -> list[str]:
    return await page.evaluate("window.__said")


async def test_a_host_reload_keeps_the_broadcast_for_viewers(relay_factory, open_page):
    relay = await relay_factory(limits={"stream_max_seconds": 30, "idle_timeout_seconds": 10})
    host = await open_page(f"{relay.url}/host/")  # with the trailing slash people type
    await connect_and_start(host, "a lighthouse in a storm")
    conn = only_connection(relay)
    b = conn.broadcast
    watch = await open_page(await host.locator("#watch-url").get_attribute("href"))
    await assert_playing(watch)
    await watch_messages(watch)

    dialogs: list[str] = []

    async def leave_anyway(dialog) -> None:
        dialogs.append(dialog.type)
        await dialog.accept()

    host.on("dialog", leave_anyway)
    async with Spectator(f"{relay.url}/v1/broadcasts/{b.broadcast_id}/whep", b.spectator_token) as viewer:
        await host.reload()
        assert dialogs == ["beforeunload"]  # asked before leaving a live stream
        # The reloaded console is back on the same connection and the same live stream.
        await expect(host.locator("#connection-state")).to_have_text("Connected")
        await expect(host.locator("#stream-status")).to_have_attribute("data-state", "live")
        await expect(host.locator("#watch-url")).to_be_visible()
        assert only_connection(relay) is conn and conn.stream.live
        await eventually(lambda: conn.control_sockets == 1, what="the reloaded console's control socket")
        assert len(await frames_for(viewer.track, 1.0)) >= 10  # the aiortc spectator never stopped
    await assert_playing(watch)
    await expect_badge(watch, "live", "Live")
    texts = await said(watch)
    assert any("host is reconnecting" in t for t in texts), texts
    assert not any("ended" in t for t in texts), texts
    await expect(watch.locator("#message")).to_be_hidden()  # the host is back: nothing to say


# Every WebSocket the page makes, so a test can drop one as a network would (the page's own code
# did not close it: its close handler must treat it as a drop).
KEEP_SOCKETS = """(() => {
    const Native = window.WebSocket;
    window.__sockets = [];
    window.WebSocket = class extends Native {
        constructor(...args) { super(...args); window.__sockets.push(this); }
    };
})()"""


async def test_the_console_reopens_a_dropped_control_socket(relay_factory, open_page):
    relay = await relay_factory(limits={"stream_max_seconds": 30, "idle_timeout_seconds": 10})
    host = await open_page()
    await host.add_init_script(KEEP_SOCKETS)
    await host.goto(f"{relay.url}/host")
    await connect_and_start(host, "a harbour at night")
    conn = only_connection(relay)
    await eventually(lambda: conn.control_sockets == 1, what="the console's control socket")
    await host.evaluate("window.__sockets.filter((s) => s.url.includes('/control')).forEach((s) => s.close())")
    await expect(host.locator("#connection-state")).to_have_text("Reconnecting…")
    # The relay still has the connection: the console reopens (after a 1 s backoff) onto the same live stream.
    await expect(host.locator("#connection-state")).to_have_text("Connected")
    await eventually(lambda: conn.control_sockets == 1, what="the reopened control socket")
    assert only_connection(relay) is conn and conn.stream.live
    await expect(host.locator("#stream-status")).to_have_attribute("data-state", "live")
    await host.click("#end")  # and it steers through the new socket
    await expect(host.locator("#stream-status")).to_have_attribute("data-state", "ended")
    assert not conn.stream.live


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_the_console_says_its_connection_is_gone_after_a_relay_restart(tmp_path, open_page):
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {free_port()}\ndata_dir = "{tmp_path / "data"}"\n'
        f'[auth]\napi_keys = ["{API_KEY}"]\n[world_model]\nwidth = 320\nheight = 176\n'
        '[limits]\nstream_max_seconds = 60\n[webrtc]\nice_host_addresses = ["127.0.0.1"]\n'
    )
    proc, base = await start_relay_process(config)
    try:
        host = await open_page(f"{base}/host")
        await connect_and_start(host, "a volcano at dawn")
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        await expect(host.locator("#connection-state")).to_have_text("Reconnecting…")
        proc, base = await start_relay_process(config)
        restarted = asyncio.get_running_loop().time()
        message = host.locator("#host-message")
        await expect(message).to_contain_text("connection is gone", timeout=5_000)
        elapsed = asyncio.get_running_loop().time() - restarted
        print(f"the console said the connection is gone {elapsed:.2f} s after the relay was back")
        assert elapsed < 5
        # The countdown stopped, the dead links are gone, and a new connection can be made.
        status = host.locator("#stream-status")
        await expect(status).to_have_attribute("data-state", "ended")
        await expect(status).not_to_contain_text("left")
        await expect(host.locator("#watch-url")).to_be_hidden()
        await expect(host.locator("#copy-watch-url")).to_be_disabled()
        await expect(host.locator("#connection-state")).to_have_text("Not connected")
        await expect(host.locator("#connect")).to_be_enabled()
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()


async def test_the_control_room_counts_a_real_spectator_and_lists_recordings_after_a_reload(relay_factory, open_page):
    relay = await relay_factory(limits={"stream_max_seconds": 30, "idle_timeout_seconds": 10})
    host = await open_page(f"{relay.url}/host")
    await connect_and_start(host, "a harbour at night")
    b = only_connection(relay).broadcast
    room = host.locator("#room")
    await expect(room).to_be_visible()
    await expect(host.locator("#room-viewers")).to_have_text("0 (0 live · 0 over HLS)")
    async with Spectator(f"{relay.url}/v1/broadcasts/{b.broadcast_id}/whep", b.spectator_token):
        # The host's own preview is not counted; the aiortc spectator is.
        await expect(host.locator("#room-viewers")).to_have_text("1 (1 live · 0 over HLS)")
        await expect(host.locator("#room-health")).to_contain_text("fps")
        await expect(host.locator("#room-health")).to_contain_text("Mbps")
    await expect(host.locator("#room-viewers")).to_have_text("0 (0 live · 0 over HLS)")

    stream_id = only_connection(relay).stream.stream_id
    await host.click("#end")
    await expect(host.locator("#stream-status")).to_have_attribute("data-state", "ended")
    await host.reload()  # not live: no question asked
    await expect(host.locator("#connection-state")).to_have_text("Connected")
    await expect(host.locator("#library .id").first).to_have_attribute("title", stream_id)
    await expect(host.locator("#library .recording").first).to_have_text("Replay")



async def test_streams_this_session_survive_a_reload(relay_factory, open_page):
    relay = await relay_factory(limits={"stream_max_seconds": 30, "idle_timeout_seconds": 10})
    host = await open_page(f"{relay.url}/host")
    await connect_and_start(host, "a harbour at night")
    first = only_connection(relay).stream.stream_id
    await host.click("#end")
    await expect(host.locator("#stream-status")).to_have_attribute("data-state", "ended")
    await host.fill("#prompt", "a lighthouse in a storm")
    await host.click("#start")
    await expect(host.locator("#stream-status")).to_have_attribute("data-state", "live")
    second = only_connection(relay).stream.stream_id
    host.on("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))  # live: the browser asks
    await host.reload()
    await expect(host.locator("#connection-state")).to_have_text("Connected")
    rows = host.locator("#history li")
    await expect(rows).to_have_count(2)
    # Newest first: the live one (live again once the console re-attached), then the ended one.
    await expect(rows.nth(0).locator(".id-chip")).to_have_attribute("title", f"{second} (click to copy)")
    await expect(rows.nth(0).locator(".reason")).to_have_text("live")
    await expect(rows.nth(0).locator(".prompt")).to_have_text("a lighthouse in a storm")
    await expect(rows.nth(1).locator(".id-chip")).to_have_attribute("title", f"{first} (click to copy)")
    await expect(rows.nth(1).locator(".reason")).to_have_text("ended")
    await expect(rows.nth(1).locator(".recording")).to_be_visible()
    await host.click("#end")
    await expect(rows.nth(0).locator(".reason")).to_have_text("ended")
    await expect(rows.nth(0).locator(".recording")).to_be_visible()

async def test_viewers_read_unavailable_not_ended_when_the_relay_shuts_down(relay_factory, open_page):
    relay = await relay_factory(limits={"stream_max_seconds": 30})
    host = await open_page(f"{relay.url}/host")
    await connect_and_start(host, "a quiet harbour")
    watch = await open_page(await host.locator("#watch-url").get_attribute("href"))
    await assert_playing(watch)
    await relay.sessions.close()  # what `relay serve` does on SIGTERM: disconnected {reason: shutdown}
    await expect_badge(watch, "error", "Unavailable")
    message = watch.locator("#message")
    await expect(message).to_contain_text("unavailable: the relay restarted")
    await expect(message).not_to_contain_text("host has ended")
