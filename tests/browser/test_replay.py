"""The replay page in real Chromium: a recorded stream's video with its prompt timeline, reached
from the signed replay_url of GET /v1/recordings/{stream_id}; and what a bad link shows.
"""

from __future__ import annotations

import json

import aiohttp
import pytest
from playwright.async_api import expect

from relay.client import RelayClient
from tests.browser.conftest import CHROMIUM, DESKTOP, HAVE_CHROMIUM
from tests.browser.helpers import shoot
from tests.conftest import eventually, frames_pass
from tests.conftest import API_KEY

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not HAVE_CHROMIUM, reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"),
]

UI_MS = 10_000
expect.set_options(timeout=UI_MS)

PROMPTS = ["a calm ocean at sunset", "a storm rolls in", "neon night over a lava desert <b>bold</b>"]


async def record_a_stream(relay, client: RelayClient, conn) -> dict:
    """A ~2.5 s stream with two prompts after the first; returns its complete recording."""
    await conn.start_stream(PROMPTS[0])
    await frames_pass(relay, conn.broadcast["broadcast_id"], 20)
    await conn.interact(PROMPTS[1])
    await frames_pass(relay, conn.broadcast["broadcast_id"], 20)
    await conn.interact(PROMPTS[2])
    # stream_max_seconds ends it (duration_limit); then the recorder finishes off the loop.
    await eventually(lambda: _ended(client, conn.stream_id), timeout=10, what="the stream ended")
    recording: dict = {}

    async def complete() -> bool:
        recording.update(await client.request("GET", f"/v1/recordings/{conn.stream_id}"))
        return recording.get("status") == "complete"

    await eventually(complete, timeout=10, what="the recording complete")
    return recording


async def _ended(client: RelayClient, stream_id: str) -> bool:
    return (await client.get_stream(stream_id))["status"] == "ended"


async def events_of(recording: dict) -> list[dict]:
    async with aiohttp.ClientSession() as http, http.get(recording["events_url"]) as response:
        assert response.status == 200
        return [json.loads(line) for line in (await response.text()).splitlines() if line.strip()]


async def test_replay_page_plays_and_seeks_to_prompts(relay_factory, open_page):
    relay = await relay_factory(limits={"stream_max_seconds": 2.5, "idle_timeout_seconds": 60})
    async with RelayClient(relay.url, API_KEY) as client, client.connect() as conn:
        recording = await record_a_stream(relay, client, conn)
    assert recording["replay_url"].startswith(f"{relay.url}/recordings/{recording['stream_id']}?")
    events = await events_of(recording)
    offsets = [e["offset_ms"] for e in events if e["type"] in ("stream_started", "prompt_applied")]
    assert len(offsets) == 3 and offsets == sorted(offsets), events

    page = await open_page(recording["replay_url"])
    video = page.locator("#replay-video")
    await expect(video).to_be_visible()
    await page.wait_for_function(
        "() => { const v = document.getElementById('replay-video'); return v.readyState >= 1 && v.duration > 1; }",
        timeout=UI_MS,
    )
    duration = await page.evaluate("document.getElementById('replay-video').duration")
    assert 1 < duration < 4, duration
    await expect(page.locator("#rec-state")).to_have_text("Replay")
    await expect(page.locator("#message")).to_be_hidden()

    # The timeline lists the prompts in order, as text, each with its source.
    entries = page.locator("#timeline .tl-entry")
    await expect(entries).to_have_count(3)
    await expect(entries.locator(".tl-prompt")).to_have_text(PROMPTS)
    await expect(entries.locator(".tl-source")).to_have_text(["Host · start", "Host", "Host"])
    await expect(entries.locator(".tl-time")).to_have_text([f"0:0{o // 1000}.{o % 1000 // 100}" for o in offsets])
    assert [int(x) for x in await entries.evaluate_all("bs => bs.map(b => b.dataset.offsetMs)")] == offsets
    assert await page.evaluate("document.querySelectorAll('#timeline b').length") == 0

    # Clicking the second prompt seeks the video to its offset.
    target = offsets[1] / 1000
    await entries.nth(1).click()
    await page.wait_for_function(
        "t => { const v = document.getElementById('replay-video'); return !v.seeking && Math.abs(v.currentTime - t) < 0.5; }",
        arg=target, timeout=UI_MS,
    )
    now = await page.evaluate("document.getElementById('replay-video').currentTime")
    assert target - 0.05 <= now <= target + 0.5, (now, target)
    await expect(entries.nth(1)).to_have_attribute("aria-current", "true")
    await page.evaluate("document.getElementById('replay-video').pause()")
    await shoot("replay", page, restore=DESKTOP)

    # A tampered link (one signature character changed) shows an error, not the recording.
    url = recording["replay_url"]
    i = url.index("signature=") + len("signature=")
    tampered = url[:i] + ("A" if url[i] != "A" else "B") + url[i + 1:]
    bad = await open_page(tampered)
    await expect(bad.locator("body")).to_contain_text("invalid or has expired")
    assert await bad.locator("#replay-video:visible").count() == 0

    # The page's own error path: its info call refused (as for a link that expired while open).
    page2 = await open_page()

    async def refuse(route):
        await route.fulfill(status=403, content_type="application/json",
                            body=json.dumps({"error": {"code": "FORBIDDEN", "message": "This link is invalid or has expired."}}))

    await page2.route("**/recordings/*/info?*", refuse)
    await page2.goto(url)
    message = page2.locator("#message")
    await expect(message).to_be_visible()
    await expect(message).to_contain_text("invalid or has expired")
    await expect(message).to_have_attribute("data-kind", "error")
    await expect(page2.locator("#rec-state")).to_have_attribute("data-state", "error")
    await expect(page2.locator("#replay-video")).to_be_hidden()
    await shoot("replay-error", page2, restore=DESKTOP)


async def test_a_spectator_is_offered_the_replay_when_the_host_shares_it(relay_factory, open_page):
    relay = await relay_factory(limits={"idle_timeout_seconds": 60, "stream_max_seconds": 60})
    async with RelayClient(relay.url, API_KEY) as client, client.connect(share_replay=True) as conn:
        b = conn.broadcast
        await conn.start_stream(PROMPTS[0])
        watch = await open_page(b["watch_url"])
        await expect(watch.locator("#state")).to_have_text("Live")
        await frames_pass(relay, b["broadcast_id"], 25)
        stream_id = conn.stream_id
        await conn.end_stream()

        link = watch.locator("#replay-link")
        await expect(link).to_be_visible()
        await expect(link).to_have_text("Watch the replay")
        href = await link.get_attribute("href")
        assert href.startswith(f"{relay.url}/recordings/{stream_id}?expires="), href

        async def complete() -> bool:
            return (await client.request("GET", f"/v1/recordings/{stream_id}"))["status"] == "complete"
        await eventually(complete, timeout=10, what="the recording complete")
        await shoot("watch-ended-replay", watch, restore=DESKTOP)

        await link.click()
        await watch.wait_for_url(f"{relay.url}/recordings/{stream_id}?*")
        await expect(watch.locator("#rec-state")).to_have_text("Replay")
        await watch.evaluate("document.getElementById('replay-video').play()")
        await watch.wait_for_function(
            "() => { const v = document.getElementById('replay-video');"
            " return v.duration > 0.5 && v.currentTime > 0.3 && v.getVideoPlaybackQuality().totalVideoFrames > 5; }",
            timeout=UI_MS,
        )
        await expect(watch.locator("#timeline .tl-prompt")).to_have_text([PROMPTS[0]])


async def test_the_console_switch_shares_replays_and_says_so(relay_factory, open_page):
    relay = await relay_factory(limits={"idle_timeout_seconds": 60})
    host = await open_page(f"{relay.url}/host")
    switch = host.locator("#share-replay")
    await expect(switch).to_be_disabled()  # no broadcast yet
    await host.fill("#api-key", API_KEY)
    await host.click("#connect")
    await expect(host.locator("#connection-state")).to_have_text("Connected")
    await expect(switch).to_be_enabled()
    await expect(switch).not_to_be_checked()  # off by default: a recording belongs to the key
    broadcast = next(iter(relay.sessions.connections.values())).broadcast

    await switch.check()
    await eventually(lambda: broadcast.share_replay, timeout=5, what="sharing on at the relay")
    await expect(switch).to_be_checked()
    await expect(switch).to_be_enabled()
    await switch.uncheck()
    await eventually(lambda: not broadcast.share_replay, timeout=5, what="sharing off at the relay")

    # A refusal leaves the switch as the relay has it, and says why.
    async def refuse(route):
        await route.fulfill(status=403, content_type="application/json", body='{"error": {"code": "FORBIDDEN", '
                            '"message": "Only the host can change this.", "action": "Use the API key."}}')
    await host.route("**/v1/broadcasts/*", refuse)
    await switch.click()
    await expect(host.locator("#share-replay-note")).to_contain_text("Could not change it: This API key may not")
    await expect(switch).not_to_be_checked()
    assert broadcast.share_replay is False


async def test_the_console_switch_tells_the_truth_across_a_reload_and_a_new_connection(relay_factory, open_page):
    relay = await relay_factory(limits={"idle_timeout_seconds": 60, "channel_release_seconds": 600})
    async with RelayClient(relay.url, API_KEY) as client:
        channel = await client.create_channel("Weekly worlds")
    broadcast = relay.sessions.broadcast(channel["broadcast"]["broadcast_id"])
    host = await open_page(f"{relay.url}/host")
    switch = host.locator("#share-replay")
    await host.fill("#api-key", API_KEY)
    await host.locator("#api-key").dispatch_event("change")  # the picker lists this key's channels
    await expect(host.locator(f"#channel option[value='{channel['channel_id']}']")).to_have_count(1)
    await host.select_option("#channel", channel["channel_id"])
    await host.click("#connect")
    await expect(host.locator("#connection-state")).to_have_text("Connected")
    await switch.check()
    await eventually(lambda: broadcast.share_replay, timeout=5, what="sharing on at the relay")

    # A reload re-attaches to the same connection: the switch shows the relay's "on", not the
    # connect answer the tab kept ("off").
    await host.reload()
    await expect(host.locator("#connection-state")).to_have_text("Connected")
    await expect(switch).to_be_checked()
    await expect(switch).to_be_enabled()

    # Disconnected: no switch to trust. A new connection on the same channel starts off, as the relay has it.
    await host.click("#disconnect")
    await expect(host.locator("#connection-state")).to_have_text("Not connected")
    await expect(switch).to_be_disabled()
    await expect(switch).not_to_be_checked()
    await host.click("#connect")
    await expect(host.locator("#connection-state")).to_have_text("Connected")
    assert relay.sessions.broadcast(channel["broadcast"]["broadcast_id"]) is broadcast  # the channel's, kept
    await expect(switch).to_be_enabled()
    await expect(switch).not_to_be_checked()
    assert broadcast.share_replay is False
