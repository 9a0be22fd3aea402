"""The watch page as a viewer expects it, in real Chromium against the real relay: full screen and
picture in picture, a share dialog whose QR code decodes (zxing-cpp, a real decoder) to the watch
link, link-preview tags, a vote round's winner told to its author and to everyone, and an axe-core
scan of the watch page, host console and replay page with no serious or critical violation.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import zxingcpp
from playwright.async_api import Page, expect

from relay.client import RelayClient
from tests.browser.conftest import CHROMIUM, HAVE_CHROMIUM, PHONE
from tests.browser.helpers import shoot
from tests.browser.test_participation import candidate, joined, set_mode, set_name
from tests.conftest import API_KEY, eventually

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not HAVE_CHROMIUM, reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"),
]

UI_MS = 10_000
FIRST_FRAME_MS = 15_000
expect.set_options(timeout=UI_MS)

LONG = {"stream_max_seconds": 30, "idle_timeout_seconds": 60}
# axe-core from package.json (`npm install` at the repository's root; .ci/run does it).
AXE = Path(__file__).resolve().parents[2] / "node_modules" / "axe-core" / "axe.min.js"
BLOCKING = ("serious", "critical")


async def has_picture(page: Page) -> None:
    await page.wait_for_function("document.getElementById('video').videoWidth > 0", timeout=FIRST_FRAME_MS)


class MetaTags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: dict[str, str] = {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "meta" and (a.get("property") or a.get("name", "")).startswith(("og:", "twitter:")):
            self.tags[a.get("property") or a["name"]] = a.get("content", "")


def meta_tags(html: str) -> dict[str, str]:
    parser = MetaTags()
    parser.feed(html)
    return parser.tags


async def test_full_screen_and_picture_in_picture_are_offered(relay_factory, open_page):
    relay = await relay_factory(limits=LONG)
    async with RelayClient(relay.url, API_KEY) as client, client.connect() as conn:
        await conn.start_stream("a calm ocean at sunset")
        page = await open_page(conn.broadcast["watch_url"])
        await has_picture(page)
        # How far behind live this viewer is, and over which path.
        await expect(page.locator("#latency")).to_have_text(re.compile(r"^WebRTC · (under 0\.1|\d+\.\d) s behind live$"))
        await shoot("watch-controls", page)  # no sideways scrolling at either size, controls and all
        full, pip = page.locator("#fullscreen"), page.locator("#pip")
        await expect(full).to_be_visible()
        await expect(full).to_be_enabled()
        await expect(pip).to_be_visible()

        # The button puts the stage (video and its overlay) full screen; a double-click takes it back.
        await full.click()
        await page.wait_for_function("document.fullscreenElement?.id === 'stage'")
        await expect(full).to_have_attribute("aria-pressed", "true")
        await page.dblclick("#video")
        await page.wait_for_function("document.fullscreenElement === null")
        await expect(full).to_have_attribute("aria-pressed", "false")
        await page.dblclick("#video")
        await page.wait_for_function("document.fullscreenElement?.id === 'stage'")
        await page.evaluate("document.exitFullscreen()")

        # Picture in picture: entered where the browser has it, else a disabled button that says why.
        if await page.evaluate("document.pictureInPictureEnabled"):
            await expect(pip).to_be_enabled()
            await pip.click()
            await page.wait_for_function("document.pictureInPictureElement?.id === 'video'")
            await expect(pip).to_have_attribute("aria-pressed", "true")
        else:
            await expect(pip).to_be_disabled()
            await expect(pip).to_have_attribute("title", re.compile("no picture in picture"))
        # A silent stream says so rather than offering an Unmute that does nothing.
        await expect(page.locator("#no-sound")).to_be_visible()
        await expect(page.locator("#unmute")).to_be_hidden()


async def test_a_double_tap_goes_full_screen_on_a_phone(relay_factory, browser):
    relay = await relay_factory(limits=LONG)
    async with RelayClient(relay.url, API_KEY) as client, client.connect() as conn:
        context = await browser.new_context(viewport=PHONE, has_touch=True, is_mobile=True)
        try:
            page = await context.new_page()
            await page.goto(conn.broadcast["watch_url"])
            await expect(page.locator("#state")).to_have_attribute("data-state", "waiting")
            box = await page.locator("#stage").bounding_box()
            x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
            await page.touchscreen.tap(x, y)
            await page.touchscreen.tap(x, y)
            await page.wait_for_function("document.fullscreenElement?.id === 'stage'")
            # One tap is not two: it leaves full screen alone.
            await page.wait_for_timeout(400)  # past the double-tap window, so the next tap starts a new pair
            await page.touchscreen.tap(x, y)
            await page.wait_for_timeout(400)  # a single tap's window closes with nothing toggled
            assert await page.evaluate("document.fullscreenElement?.id") == "stage"
        finally:
            await context.close()


async def test_a_retry_line_is_two_sentences(relay_factory, open_page):
    # No spectator may join: the page is told 503 with Retry-After and says it will retry.
    relay = await relay_factory(limits={**LONG, "spectators_per_broadcast": 0})
    async with RelayClient(relay.url, API_KEY) as client, client.connect() as conn:
        page = await open_page(conn.broadcast["watch_url"])
        message = page.locator("#message")
        await expect(message).to_have_text(re.compile(r"\w[.!?] Retrying in \d+ s\.$"))
        assert ".." not in await message.text_content()


async def test_share_qr_code_decodes_to_the_watch_link(relay_factory, open_page, http):
    relay = await relay_factory(limits=LONG)
    async with RelayClient(relay.url, API_KEY) as client, client.connect() as conn:
        watch_url = conn.broadcast["watch_url"]
        bid = conn.broadcast["broadcast_id"]
        # With a trailing slash too (a link pasted from somewhere that adds one).
        page = await open_page(watch_url.replace(f"/watch/{bid}?", f"/watch/{bid}/?"), viewport=PHONE)
        await expect(page.locator("#state")).to_have_attribute("data-state", "waiting")
        await page.click("#share")
        await expect(page.locator("#share-dialog")).to_be_visible()
        await expect(page.locator("#share-url")).to_have_value(watch_url)
        await page.wait_for_function("document.getElementById('share-qr').naturalWidth > 0")
        await shoot("watch-share", page, restore=PHONE)
        # The QR image as drawn, read back as pixels and decoded by zxing-cpp.
        pixels = await page.evaluate("""() => {
            const img = document.getElementById('share-qr');
            const c = document.createElement('canvas');
            c.width = c.height = 400;
            const g = c.getContext('2d');
            g.fillStyle = '#fff';
            g.fillRect(0, 0, 400, 400);
            g.drawImage(img, 0, 0, 400, 400);
            return Array.from(g.getImageData(0, 0, 400, 400).data);
        }""")
        gray = np.array(pixels, dtype=np.uint8).reshape(400, 400, 4)[:, :, 0].copy()
        codes = zxingcpp.read_barcodes(gray)
        assert [c.text for c in codes] == [watch_url]
        assert codes[0].format == zxingcpp.BarcodeFormat.QRCode

        # A link preview (no scripts run) gets the og: tags in the HTML itself.
        async with http.get(watch_url) as response:
            assert response.status == 200
            tags = meta_tags(await response.text())
        assert tags["og:url"] == watch_url
        assert tags["og:title"] and tags["og:description"] and tags["og:type"] == "video.other"
        # A wrong token learns nothing of the broadcast: generic tags, and no QR code.
        async with http.get(f"{relay.url}/watch/{bid}?token=wrong") as response:
            assert response.status == 200
            assert "og:url" not in meta_tags(await response.text())
        async with http.get(f"{relay.url}/v1/broadcasts/{bid}/qr.svg?token=wrong") as response:
            assert response.status == 401
            assert (await response.json())["error"]["code"] == "UNAUTHORIZED"
        async with http.get(f"{relay.url}/v1/broadcasts/nope/qr.svg?token=x") as response:
            assert response.status == 404
            assert (await response.json())["error"]["code"] == "NOT_FOUND"



async def test_a_channels_watch_page_shows_its_title_and_host_name(relay_factory, open_page, http):
    relay = await relay_factory(limits=LONG)
    async with RelayClient(relay.url, API_KEY) as client:
        channel = await client.create_channel("Worlds <b>live</b>", description="Every Friday",
                                              host_name="Ada & <i>co</i>")
        watch_url = channel["broadcast"]["watch_url"]
        page = await open_page(watch_url, viewport=PHONE)
        about = page.locator("#about")
        await expect(about).to_be_visible()
        await expect(page.locator("#broadcast-title")).to_have_text("Worlds <b>live</b>")  # as text, not markup
        await expect(page.locator("#broadcast-host")).to_have_text("Hosted by Ada & <i>co</i>")
        assert await page.title() == "Worlds <b>live</b> · relay"
        async with client.connect(channel["channel_id"]) as conn:  # live, the same words stay
            await conn.start_stream("a calm ocean at sunset")
            await has_picture(page)
            await expect(page.locator("#broadcast-title")).to_have_text("Worlds <b>live</b>")
            await expect(page.locator("#broadcast-host")).to_be_visible()
        async with http.get(watch_url) as response:  # and a link preview reads them
            tags = meta_tags(await response.text())
        assert tags["og:title"] == "Worlds <b>live</b>" and tags["og:description"] == "Every Friday"
        # A plain connection's page has neither: no empty heading.
        async with client.connect() as conn:
            plain = await open_page(conn.broadcast["watch_url"])
            await expect(plain.locator("#state")).to_have_attribute("data-state", "waiting")
            await expect(plain.locator("#about")).to_be_hidden()

async def test_a_vote_rounds_winner_is_told_to_its_author_and_to_everyone(relay_factory, open_page):
    relay = await relay_factory(limits=LONG)
    async with RelayClient(relay.url, API_KEY) as client, client.connect() as conn:
        bid = conn.broadcast["broadcast_id"]
        await conn.start_stream("a quiet lake")
        await set_mode(client, bid, "vote", vote_window_seconds=3, cooldown_seconds=0)
        author = await open_page(conn.broadcast["watch_url"])
        voter = await open_page(conn.broadcast["watch_url"])
        await joined(author)
        await joined(voter)
        await set_name(author, "Ada")

        await author.fill("#input-prompt", "a dragon over the sea")
        await author.click("#input-send")
        await expect(author.locator("#input-result")).to_contain_text("Proposed")
        await candidate(voter, "a dragon over the sea").locator(".vote-btn").click()
        await expect(voter.locator("#input-result")).to_contain_text("Vote counted")

        # The round closes: its winner goes to the world, and each page says so in its own words.
        await expect(author.locator("#input-result")).to_have_text("Your prompt won the vote: it is on screen now.")
        await expect(author.locator("#round-winner")).to_have_text("Last round won by you: “a dragon over the sea”")
        await expect(voter.locator("#round-winner")).to_have_text("Last round won by Ada: “a dragon over the sea”")
        # What was said about the closed round goes with it: no "Vote counted" beside "No candidates yet".
        await expect(voter.locator("#candidates li")).to_have_count(0)
        await expect(voter.locator("#input-result")).to_be_hidden()
        await expect(voter.locator("#current-prompt")).to_have_text("a dragon over the sea")


async def axe_scan(page: Page) -> list[dict]:
    """axe-core's serious and critical violations (WCAG 2.2's target size included), and every visible
    button, copy-id chip, checkbox or select smaller than 24 x 24 px (AA's target size, no spacing excuse)."""
    if not await page.evaluate("typeof axe !== 'undefined'"):
        await page.add_script_tag(path=str(AXE))
    result = await page.evaluate("""async () => {
        const r = await axe.run(document, {resultTypes: ['violations'], rules: {'target-size': {enabled: true}}});
        const found = r.violations.map((v) => ({id: v.id, impact: v.impact, help: v.help,
                                                nodes: v.nodes.map((n) => n.target.join(' ')).slice(0, 5)}));
        const small = [...document.querySelectorAll('button, [role=button], input[type=checkbox], select')]
            .filter((e) => e.getClientRects().length && getComputedStyle(e).visibility !== 'hidden')
            .map((e) => [e, e.getBoundingClientRect()])
            .filter(([, r]) => r.width < 24 || r.height < 24)
            .map(([e, r]) => `${e.id ? '#' + e.id : e.className || e.tagName} ${r.width}x${r.height}`);
        if (small.length) found.push({id: 'target-24px', impact: 'serious', nodes: small.slice(0, 8)});
        return found;
    }""")
    return [v for v in result if v["impact"] in BLOCKING]


@pytest.mark.skipif(not AXE.exists(), reason="axe-core is not installed: run `npm install` at the repository's root")
async def test_axe_finds_no_serious_violation_on_watch_host_and_replay_pages(relay_factory, open_page):
    relay = await relay_factory(limits=LONG)
    found: dict[str, list[dict]] = {}
    async with RelayClient(relay.url, API_KEY) as client, client.connect() as conn:
        await set_mode(client, conn.broadcast["broadcast_id"], "vote", vote_window_seconds=20)
        host = await open_page(f"{relay.url}/host")
        await host.select_option("#channel", "new")  # the channel picker's fields too
        await expect(host.locator("#channel-title")).to_be_visible()
        found["host"] = await axe_scan(host)
        await conn.start_stream("a calm ocean at sunset")
        watch = await open_page(conn.broadcast["watch_url"])
        await joined(watch)
        await has_picture(watch)
        await expect(watch.locator("#state")).to_have_attribute("data-state", "live")  # the Live badge's contrast
        found["watch live"] = await axe_scan(watch)
        # The chat panel open, with a message in it (and its reactions).
        await expect(watch.locator("#chat")).to_be_visible()
        await watch.fill("#chat-text", "hello from the front row")
        await watch.click("#chat-send")
        await expect(watch.locator("#chat-log")).to_contain_text("hello from the front row")
        found["watch chat"] = await axe_scan(watch)
        # The host console connected and live: its control room, the audience panel, the chat.
        console = await open_page(f"{relay.url}/host")
        await console.fill("#api-key", API_KEY)
        await console.click("#connect")
        await expect(console.locator("#connection-state")).to_have_text("Connected")
        await console.fill("#prompt", "a lighthouse in a storm")
        await console.click("#start")
        await expect(console.locator("#stream-status")).to_have_attribute("data-state", "live")
        await expect(console.locator("#room")).to_be_visible()
        await expect(console.locator("#watch-url")).to_be_visible()
        found["host live"] = await axe_scan(console)
        await conn.end_stream()
        await expect(watch.locator("#ended")).to_be_visible()
        await shoot("watch-ended", watch)
        found["watch ended"] = await axe_scan(watch)

        async def complete() -> bool:
            recording.update(await client.request("GET", f"/v1/recordings/{conn.stream_id}"))
            return recording.get("status") == "complete"

        recording: dict = {}
        await eventually(complete, timeout=10, what="the recording complete")
    replay = await open_page(recording["replay_url"])
    await expect(replay.locator("#rec-state")).to_have_text("Replay")
    found["replay"] = await axe_scan(replay)
    assert found == {"host": [], "watch live": [], "watch chat": [], "host live": [], "watch ended": [],
                     "replay": []}, found
