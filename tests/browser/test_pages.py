"""The watch page and the host console in real headless Chromium, against the real relay.

Every wait is bounded (Playwright's wait_for_function / expect with a timeout, or a polled
server-side condition with a deadline); the generous first-frame timeout is for a loaded
2-core CI machine, the common case takes about a second.
"""

from __future__ import annotations

import os
import re

import pytest
from playwright.async_api import Page, expect

from relay.client import RelayClient
from tests.browser.conftest import CHROMIUM, DESKTOP, HAVE_CHROMIUM, PHONE, SHOTS_DIR
from tests.browser.helpers import ADVANCE_MS, FIRST_FRAME_MS, CuttableLink, assert_playing, video_reading
from tests.conftest import API_KEY, eventually

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not HAVE_CHROMIUM, reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"),
]

UI_MS = 10_000

# Generous for every expect() without its own timeout: CI machines are small and busy.
expect.set_options(timeout=UI_MS)

# A live stream that outlasts the test, and a host that may stay silent (RelayClient sends no
# keepalives) without being reaped.
LONG = {"stream_max_seconds": 30, "idle_timeout_seconds": 60}

XSS = "<img src=x onerror=window.__xss=1>"


# ---------------------------------------------------------------------------------- helpers

async def expect_badge(page: Page, state: str, text: str | None = None, timeout: int = UI_MS) -> None:
    badge = page.locator("#state")
    await expect(badge).to_have_attribute("data-state", state, timeout=timeout)
    if text is not None:
        await expect(badge).to_have_text(text)


async def assert_no_horizontal_overflow(page: Page) -> None:
    overflow = await page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"{page.url} is {overflow}px wider than the viewport"


def only_connection(relay):
    conns = list(relay.sessions.connections.values())
    assert len(conns) == 1, conns
    return conns[0]


def conn_broadcast(relay):
    return only_connection(relay).broadcast


# ------------------------------------------------------------------------------------ tests

async def test_watch_page_plays_counts_viewers_and_follows_prompts(relay_factory, open_page):
    relay = await relay_factory(limits=LONG)
    async with RelayClient(relay.url, API_KEY) as client, client.connect() as conn:
        await conn.start_stream("a calm ocean at sunset")
        watch_url = conn.broadcast["watch_url"]

        page = await open_page(watch_url)
        await assert_playing(page)
        await expect_badge(page, "live", "Live")
        await expect(page.locator("#current-prompt")).to_have_text("a calm ocean at sunset")
        await expect(page.locator("#viewer-count")).to_have_text("1", timeout=5_000)
        await expect(page.locator("#viewers")).to_be_visible()
        await expect(page.locator("#message")).to_be_hidden()
        await expect(page.locator("#stage-note")).to_be_hidden()

        second = await open_page(watch_url)
        await second.wait_for_function("document.getElementById('video').videoWidth > 0", timeout=FIRST_FRAME_MS)
        await expect(page.locator("#viewer-count")).to_have_text("2", timeout=5_000)
        await expect(second.locator("#viewer-count")).to_have_text("2", timeout=5_000)

        assert await conn.interact("neon night over a lava desert") == "neon night over a lava desert"
        for p in (page, second):
            await expect(p.locator("#current-prompt")).to_have_text("neon night over a lava desert", timeout=5_000)

        # A spectator who leaves is counted out at once (WHEP DELETE on pagehide).
        await second.close()
        await expect(page.locator("#viewer-count")).to_have_text("1", timeout=5_000)
        await assert_playing(page)


async def test_host_console_runs_a_stream(relay_factory, open_page):
    relay = await relay_factory(limits=LONG)
    streamers = relay.sessions.streamers_free
    page = await open_page(f"{relay.url}/host")
    await expect(page.locator("#connection-state")).to_have_text("Not connected")
    await expect(page.locator("#start")).to_be_disabled()

    await page.fill("#api-key", API_KEY)
    await page.click("#connect")
    await expect(page.locator("#connection-state")).to_have_text("Connected", timeout=UI_MS)
    conn = only_connection(relay)
    assert relay.sessions.streamers_free == streamers - 1
    # Short ids, the whole one a click away (its title, and the clipboard).
    for selector, full in (("#connection-id", conn.connection_id), ("#broadcast-id", conn.broadcast.broadcast_id)):
        chip = page.locator(f"{selector} .id-chip")
        await expect(chip).to_have_text(f"{full[:8]}…")
        await expect(chip).to_have_attribute("title", f"{full} (click to copy)")

    # The watch link is the broadcast's watch URL, spectator token included.
    b = conn.broadcast
    watch_url = f"{relay.url}/watch/{b.broadcast_id}?token={b.spectator_token}"
    link = page.locator("#watch-url")
    await expect(link).to_be_visible()
    await expect(link).to_have_attribute("href", watch_url)
    await expect(link).to_have_text(watch_url)
    await expect(page.locator("#copy-watch-url")).to_be_enabled()
    hls_url = f"{relay.url}/v1/broadcasts/{b.broadcast_id}/hls/index.m3u8?token={b.spectator_token}"
    await expect(page.locator("#hls-url")).to_have_attribute("href", hls_url)
    await expect(page.locator("#hls-url")).to_be_visible()

    await page.fill("#prompt", "a calm ocean at sunset")
    await page.click("#start")
    status = page.locator("#stream-status")
    await expect(status).to_have_attribute("data-state", "live", timeout=FIRST_FRAME_MS)
    stream = conn.stream
    assert stream is not None and stream.live and stream.prompt == "a calm ocean at sunset"
    await expect(status).to_contain_text(stream.stream_id[:8])
    await assert_playing(page, "#preview")
    await expect(page.locator("#preview-state")).to_have_text("Live", timeout=UI_MS)
    await expect(page.locator("#history li")).to_have_count(1)

    async with RelayClient(relay.url, API_KEY) as client:
        await page.fill("#prompt", "neon night over a lava desert")
        await page.click("#send")

        async def applied() -> bool:
            state = await client.get_stream(stream.stream_id)
            return state["last_applied_prompt"] == "neon night over a lava desert"

        await eventually(applied, what="the host's prompt applied on the server")

        # The link works as is: it opens the watch page, which plays the stream.
        async with page.context.expect_page(timeout=UI_MS) as popup_info:
            await link.click()
        watcher = await popup_info.value
        await assert_playing(watcher)
        await expect(watcher.locator("#current-prompt")).to_have_text("neon night over a lava desert")
        await watcher.close()

        await page.click("#end")
        await expect(status).to_have_attribute("data-state", "ended", timeout=UI_MS)
        await expect(status).to_contain_text("ended")
        await expect(page.locator("#preview-state")).to_have_text("Connected", timeout=UI_MS)
        await expect(page.locator("#start")).to_be_enabled()
        await expect(page.locator("#send")).to_be_disabled()
        state = await client.get_stream(stream.stream_id)
        assert (state["status"], state["end_reason"]) == ("ended", "ended")

    await page.click("#disconnect")
    await expect(page.locator("#connection-state")).to_have_text("Not connected", timeout=UI_MS)
    await eventually(lambda: relay.sessions.streamers_free == streamers, what="the streamer freed")
    assert relay.sessions.connections == {}
    await expect(link).to_be_hidden()
    await expect(page.locator("#hls-url")).to_be_hidden()
    await expect(page.locator("#connect")).to_be_enabled()


async def test_host_console_follows_the_relays_limits(relay_factory, open_page):
    """The relay ends the stream at stream_max_seconds, then the connection at its maximum age."""
    relay = await relay_factory(limits={"stream_max_seconds": 1.5, "connection_max_seconds": 5})
    page = await open_page(f"{relay.url}/host")
    await page.fill("#api-key", API_KEY)
    await page.click("#connect")
    await expect(page.locator("#connection-state")).to_have_text("Connected", timeout=UI_MS)
    await page.fill("#prompt", "a short one")
    await page.click("#start")
    status = page.locator("#stream-status")
    await expect(status).to_have_attribute("data-state", "live", timeout=UI_MS)
    await expect(status).to_have_attribute("data-state", "ended", timeout=UI_MS)
    await expect(status).to_contain_text("ended: it reached the time limit")  # words, not "duration_limit"
    await expect(page.locator("#history .reason")).to_have_text("ended: it reached the time limit")

    # The ended stream's "Recording" opens its replay page (signed link fetched with the API key,
    # retried while the recording is still being finished).
    recording = page.locator("#history .recording")
    await expect(recording).to_be_visible()
    async with page.context.expect_page(timeout=UI_MS) as popup_info:
        await recording.click()
    replay = await popup_info.value
    await expect(replay.locator("#timeline .tl-prompt")).to_have_text(["a short one"], timeout=UI_MS)
    assert "/recordings/" in replay.url and "signature=" in replay.url
    await replay.wait_for_function("document.getElementById('replay-video').duration > 1", timeout=UI_MS)
    await replay.close()

    await expect(page.locator("#connection-state")).to_have_text("Not connected", timeout=UI_MS)
    await expect(page.locator("#host-message")).to_contain_text("maximum age")
    await expect(page.locator("#watch-url")).to_be_hidden()
    await expect(page.locator("#preview-state")).to_have_text("Off")
    await expect(page.locator("#connect")).to_be_enabled()
    assert relay.sessions.connections == {}


async def test_watch_page_plays_across_consecutive_streams(relay_factory, open_page):
    relay = await relay_factory(limits=LONG)
    async with RelayClient(relay.url, API_KEY) as client, client.connect() as conn:
        page = await open_page(conn.broadcast["watch_url"])
        # Before any stream: connected and waiting, not an error.
        await expect_badge(page, "waiting", "Waiting for the host")
        await expect(page.locator("#message")).to_be_hidden()
        await expect(page.locator("#stage-note")).to_contain_text("not started")

        await conn.start_stream("first world")
        await assert_playing(page)
        await expect_badge(page, "live", "Live")
        await page.evaluate("window.__samePage = true")
        spectators = set(conn_broadcast(relay).spectators)
        assert len(spectators) == 1

        await conn.end_stream()
        await expect_badge(page, "ended", "Stream ended")
        await expect(page.locator("#message")).to_be_hidden()
        # The last picture stays, covered by the ended state, and nobody is counted "watching" it.
        await expect(page.locator("#ended")).to_be_visible()
        await expect(page.locator("#viewers")).to_be_hidden()
        frames = (await video_reading(page, "#video"))["frames"]
        assert (await video_reading(page, "#video"))["width"] == 320

        await conn.start_stream("second world")
        await expect_badge(page, "live", "Live")
        await expect(page.locator("#ended")).to_be_hidden()
        await expect(page.locator("#current-prompt")).to_have_text("second world")
        await page.wait_for_function(
            "f => document.getElementById('video').getVideoPlaybackQuality().totalVideoFrames > f + 5",
            arg=frames, timeout=ADVANCE_MS,
        )
        await assert_playing(page)
        # Same document, same WHEP session: the relay switched the stream under the spectator.
        assert await page.evaluate("window.__samePage === true")
        assert set(conn_broadcast(relay).spectators) == spectators

        # The host leaving ends the broadcast for good: an ended state, not a crash.
        await conn.disconnect()
        await expect_badge(page, "ended", "Stream ended")
        await expect(page.locator("#message")).to_contain_text("ended")
        await expect(page.locator("#message")).to_have_attribute("data-kind", "info")
        await expect(page.locator("#ended")).to_be_visible()
        await expect(page.locator("#current-prompt")).to_have_text("second world")


async def test_prompts_are_text_never_html(relay_factory, open_page):
    relay = await relay_factory(limits=LONG)
    async with RelayClient(relay.url, API_KEY) as client, client.connect() as conn:
        await conn.start_stream(XSS)
        page = await open_page(conn.broadcast["watch_url"])
        prompt = page.locator("#current-prompt")
        await expect(prompt).to_have_text(XSS, timeout=UI_MS)
        await assert_playing(page)

        payload2 = XSS.replace("__xss=1", "__xss=2") + "<script>window.__xss=3</script>"
        await conn.interact(payload2)
        await expect(prompt).to_have_text(payload2, timeout=5_000)
        assert await page.evaluate("document.querySelectorAll('img:not(#share-qr), #current-prompt script').length") == 0
        assert await page.evaluate("typeof window.__xss") == "undefined"


async def test_host_console_shows_prompts_as_text(relay_factory, open_page):
    relay = await relay_factory(limits=LONG)
    page = await open_page(f"{relay.url}/host")
    await page.fill("#api-key", API_KEY)
    await page.click("#connect")
    await expect(page.locator("#connection-state")).to_have_text("Connected", timeout=UI_MS)
    await page.fill("#prompt", XSS)
    await page.press("#prompt", "Enter")  # Enter starts a stream when none is live
    await expect(page.locator("#stream-status")).to_have_attribute("data-state", "live", timeout=FIRST_FRAME_MS)
    await expect(page.locator("#history .prompt")).to_have_text(XSS)
    await expect(page.locator("#log")).to_contain_text(XSS)
    await assert_playing(page, "#preview")
    assert await page.evaluate("document.querySelectorAll('img').length") == 0
    assert await page.evaluate("typeof window.__xss") == "undefined"
    await page.click("#disconnect")
    await eventually(lambda: not relay.sessions.connections, what="the connection closed")


@pytest.mark.parametrize(
    "case",
    ["wrong-token", "no-token", "unknown-broadcast"],
)
async def test_watch_page_with_a_bad_link_shows_an_error(relay_factory, open_page, case):
    relay = await relay_factory(limits=LONG)
    async with RelayClient(relay.url, API_KEY) as client, client.connect() as conn:
        await conn.start_stream("a calm ocean at sunset")
        b = conn.broadcast
        url = {
            "wrong-token": f"{relay.url}/watch/{b['broadcast_id']}?token=not-the-token",
            "no-token": f"{relay.url}/watch/{b['broadcast_id']}",
            "unknown-broadcast": f"{relay.url}/watch/no-such-broadcast?token={b['spectator_token']}",
        }[case]
        page = await open_page(url)
        await expect_badge(page, "error", "Unavailable")
        message = page.locator("#message")
        await expect(message).to_be_visible()
        await expect(message).to_have_attribute("data-kind", "error")
        expected = {"wrong-token": "not valid", "no-token": "incomplete", "unknown-broadcast": "no broadcast"}[case]
        await expect(message).to_contain_text(expected, ignore_case=True)
        await expect(page.locator("#stage-note")).to_be_visible()
        await expect(page.locator("#viewers")).to_be_hidden()  # no made-up "0 watching"
        # It joined nothing and shows nothing of the broadcast it may not watch.
        assert not conn_broadcast(relay).spectators
        await expect(page.locator("#current-prompt")).to_have_text("")
        assert await page.evaluate("document.getElementById('video').videoWidth") == 0


async def shoot(label: str, page: Page) -> None:
    for name, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
        await page.set_viewport_size(viewport)
        await assert_no_horizontal_overflow(page)
        size = f"{viewport['width']}x{viewport['height']}"
        await page.screenshot(path=os.path.join(SHOTS_DIR, f"{label}-{name}-{size}.png"), full_page=True)


async def test_screenshots_desktop_and_phone(relay_factory, open_page):
    """Each page at 1280x800 and 360x740, for a human to look at, and no sideways scrolling."""
    os.makedirs(SHOTS_DIR, exist_ok=True)
    relay = await relay_factory(limits=LONG)
    host = await open_page(f"{relay.url}/host")
    await shoot("host-idle", host)
    await host.fill("#api-key", API_KEY)
    await host.click("#connect")
    await expect(host.locator("#connection-state")).to_have_text("Connected", timeout=UI_MS)
    watch_url = await host.locator("#watch-url").get_attribute("href")
    watch = await open_page(watch_url)
    await expect_badge(watch, "waiting")
    await shoot("watch-waiting", watch)

    long_prompt = ("a very long prompt that keeps going " * 6) + "averyveryverylongwordwithoutanyspacesatall" * 3
    await host.fill("#prompt", long_prompt)
    await host.click("#start")
    await assert_playing(host, "#preview")
    await assert_playing(watch)
    # The host's preview joins with the connection's client_token: it watches, uncounted.
    await expect(watch.locator("#viewer-count")).to_have_text("1", timeout=5_000)
    broadcast = conn_broadcast(relay)
    assert len(broadcast.spectators) == 2 and broadcast.viewers == 1
    await shoot("host-live", host)
    await shoot("watch-live", watch)

    bad = await open_page(watch_url.replace("token=", "token=x"))
    await expect_badge(bad, "error")
    await shoot("watch-error", bad)

    await host.click("#disconnect")
    await eventually(lambda: not relay.sessions.connections, what="the connection closed")
    await expect_badge(watch, "ended")
    await shoot("watch-ended", watch)


async def test_host_console_reconnects_its_control_channel_after_the_first_token_expired(relay_factory, open_page):
    # The client_token opens things for 4 s here (600 s by default): the console keeps asking the
    # control socket for fresh ones, so a network drop after that still finds its way back.
    relay = await relay_factory(limits={**LONG, "client_token_seconds": 4})
    link = CuttableLink(relay.server.port)
    try:
        page = await open_page(f"{await link.start()}/host")
        await page.fill("#api-key", API_KEY)
        await page.click("#connect")
        await expect(page.locator("#connection-state")).to_have_text("Connected", timeout=UI_MS)
        conn = only_connection(relay)
        first = conn.client_token
        await eventually(lambda: conn.control_sockets == 1, what="the control socket open")
        await eventually(lambda: relay.sessions.connection_for_client_token(first) is None, timeout=8,
                         what="the first client_token's end")
        assert conn.client_token != first  # the page asked for a new one before the first ran out

        link.cut()  # the network drops
        await eventually(lambda: conn.control_sockets == 0, what="the relay seeing the control socket gone")
        await eventually(lambda: conn.control_sockets == 1, timeout=15, what="the control socket reopened")
        await expect(page.locator("#connection-state")).to_have_text("Connected")
        await page.fill("#prompt", "a harbour at night")
        await page.click("#start")
        await eventually(lambda: conn.stream is not None and conn.stream.prompt == "a harbour at night",
                         what="a stream started over the reopened channel")
    finally:
        await link.close()


async def test_chromium_plays_the_hls_url_in_a_plain_video_element(relay_factory, open_page):
    # Asked for the moment the stream starts: the relay holds the first playlist until it lists
    # three segments (with fewer, Chromium's built-in HLS gives up: DEMUXER_ERROR_COULD_NOT_PARSE).
    relay = await relay_factory(limits=LONG, media={"keyframe_interval_seconds": 0.5})
    async with RelayClient(relay.url, API_KEY) as client, client.connect() as conn:
        await conn.start_stream("a calm ocean at sunset")
        page = await open_page(f"{relay.url}/healthz")  # any page of the relay's origin
        await page.set_content(f'<video id="video" muted autoplay playsinline src="{conn.broadcast["hls_url"]}"></video>')
        await assert_playing(page)


async def test_watch_page_falls_back_to_hls_where_udp_is_blocked(relay_factory):
    # Chromium told to use no UDP for WebRTC (and there is no proxy to use instead): as on a
    # network that blocks UDP, WHEP answers but ICE never connects. The page switches to HLS
    # after 8 s and says so.
    from playwright.async_api import async_playwright

    from tests.browser.conftest import CHROMIUM_ARGS

    relay = await relay_factory(limits=LONG, media={"keyframe_interval_seconds": 0.5})
    async with RelayClient(relay.url, API_KEY) as client, client.connect() as conn:
        await conn.start_stream("a calm ocean at sunset")
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(
                executable_path=CHROMIUM, headless=True,
                args=[a for a in CHROMIUM_ARGS if a != "--allow-loopback-in-peer-connection"]
                + ["--webrtc-ip-handling-policy=disable_non_proxied_udp"])
            try:
                page = await browser.new_page(viewport=DESKTOP)
                errors: list[str] = []
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                await page.goto(conn.broadcast["watch_url"])
                await expect(page.locator("#message")).to_contain_text("playing over HLS", timeout=20_000)
                await assert_playing(page)
                await expect_badge(page, "live", "Live")
                assert await page.evaluate("document.getElementById('video').src.includes('/hls/index.m3u8')")
                # The viewer is told which path it is on and how far behind live that puts it.
                await expect(page.locator("#latency")).to_have_text(
                    re.compile(r"^HLS · (at least \d+(\.\d)? s|a few seconds) behind live$"))
                broadcast = relay.sessions.broadcast(conn.broadcast["broadcast_id"])
                await eventually(lambda: broadcast.spectators == {}, what="the failed WebRTC attempt gone")
                assert not errors, errors
            finally:
                await browser.close()
