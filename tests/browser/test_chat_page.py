"""Chat in real Chromium: the watch page's chat panel between two browser contexts, the host's
off switch, and the message on the replay page's timeline, against the real relay.

Every wait is bounded (expect with a timeout, or `eventually`).
"""

from __future__ import annotations

import re

import pytest
from playwright.async_api import expect

from relay.client import RelayClient
from tests.browser.conftest import CHROMIUM, DESKTOP, HAVE_CHROMIUM
from tests.browser.helpers import shoot
from tests.conftest import API_KEY, eventually

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not HAVE_CHROMIUM, reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"),
]

UI_MS = 10_000
expect.set_options(timeout=UI_MS)
XSS = "<img src=x onerror=window.__xss=1>"


async def say(page, text: str) -> None:
    await page.fill("#chat-text", text)
    await page.press("#chat-text", "Enter")


async def test_chat_reaches_a_second_browser_is_moderated_and_lands_on_the_replay(relay_factory, open_page):
    relay = await relay_factory(limits={"stream_max_seconds": 30, "idle_timeout_seconds": 60},
                                orchestration={"blocked_words": ["darn"]})
    async with RelayClient(relay.url, API_KEY) as client, client.connect() as conn:
        await conn.start_stream("a calm ocean")
        bid, stream_id = conn.broadcast["broadcast_id"], conn.stream_id
        a = await open_page(conn.broadcast["watch_url"])
        b = await open_page(conn.broadcast["watch_url"])
        for page in (a, b):
            await expect(page.locator("#chat")).to_be_visible()
            await expect(page.locator("#chat-text")).to_be_enabled()
        # Labelled for assistive tech, and new lines are announced.
        await expect(a.get_by_role("textbox", name="Message")).to_be_visible()
        await expect(a.locator("#chat-log")).to_have_attribute("aria-live", "polite")

        await say(a, "oh darn")
        await expect(a.locator("#chat-result")).to_have_text("That message contains a word that is not allowed here.")
        await expect(a.locator("#chat-text")).to_have_value("oh darn")  # refused: the words come back to edit
        await say(a, f"hello everyone {XSS}")
        line = b.locator("#chat-log .chat-line")
        await expect(line).to_have_count(1)
        await expect(line).to_have_text(f"Anonymous: hello everyone {XSS}")
        await expect(a.locator("#chat-log .chat-line.mine")).to_have_text(f"You: hello everyone {XSS}")
        await expect(a.locator("#chat-text")).to_have_value("")  # sent: the field is cleared
        # The blocked message reached no one (the good one after it did, so it had every chance).
        assert "darn" not in await b.locator("#chat-log").inner_text()
        assert await b.evaluate("window.__xss") is None

        # A reaction from one page shows as a count on the other.
        await b.get_by_role("button", name="React 🔥").click()
        await expect(a.locator("#chat-burst")).to_have_text("🔥 1")
        await shoot("watch-chat", a, restore=DESKTOP)

        # The host clears the message: it goes from both pages.
        history = (await client.request("GET", f"/v1/broadcasts/{bid}/chat"))["history"]
        await client.request("DELETE", f"/v1/broadcasts/{bid}/chat/messages/{history[0]['message_id']}")
        await expect(b.locator("#chat-log .chat-line")).to_have_count(0)
        await say(a, "the waves are huge")
        await expect(b.locator("#chat-log .chat-line")).to_have_text(["Anonymous: the waves are huge"])

        # The host turns chat off: every page says so and stops offering the field.
        await client.request("PUT", f"/v1/broadcasts/{bid}/chat", json={"enabled": False})
        for page in (a, b):
            await expect(page.locator("#chat-off")).to_have_text("Chat is off: the host has turned it off.")
            await expect(page.locator("#chat-text")).to_be_disabled()
        await conn.end_stream()

        recording: dict = {}

        async def complete() -> bool:
            recording.update(await client.request("GET", f"/v1/recordings/{stream_id}"))
            return recording.get("status") == "complete"

        await eventually(complete, timeout=15, what="the recording complete")

    replay = await open_page(recording["replay_url"])
    chat = replay.locator('#timeline .tl-entry[data-kind="chat"]')
    # The cleared message is not replayed; the other one is, as text, between the prompts.
    await expect(chat).to_have_count(1)
    await expect(chat.locator(".tl-prompt")).to_have_text("the waves are huge")
    await expect(chat.locator(".tl-source")).to_have_text("Chat · Anonymous")
    await expect(replay.locator("#timeline .tl-entry").first.locator(".tl-prompt")).to_have_text("a calm ocean")


async def test_the_host_console_shows_chat_clears_a_message_and_turns_chat_off(relay_factory, open_page):
    relay = await relay_factory(limits={"stream_max_seconds": 30, "idle_timeout_seconds": 60})
    host = await open_page(f"{relay.url}/host")
    await host.fill("#api-key", API_KEY)
    await host.click("#connect")
    await expect(host.locator("#connection-state")).to_have_text("Connected")
    await expect(host.locator("#orch-chat-on")).to_be_checked()
    watch = await open_page(await host.locator("#watch-url").get_attribute("href"))
    await expect(watch.locator("#chat-text")).to_be_enabled()

    # Typed straight after each other: the first one's answer must not wipe the second from the field.
    await say(watch, "first message")
    await say(watch, "second message")
    console_lines = host.locator("#orch-chat-log .chat-line")
    await expect(console_lines).to_have_count(2)
    await console_lines.filter(has_text="first message").get_by_role("button", name="Clear the message from Anonymous").click()
    await expect(watch.locator("#chat-log .chat-line")).to_have_text(["You: second message"])
    await expect(console_lines).to_have_text([re.compile("second message")])
    await shoot("host-chat", host, restore=DESKTOP)

    await host.get_by_label("Chat on").uncheck()
    await expect(watch.locator("#chat-off")).to_be_visible()
    await expect(watch.locator("#chat-text")).to_be_disabled()
    await expect(host.locator("#orch-chat-on")).not_to_be_checked()
    await expect(host.locator("#orch-status")).to_have_text("Chat is off: participants are told so.")
    await host.get_by_label("Chat on").check()
    await expect(watch.locator("#chat-off")).to_be_hidden()
    await expect(watch.locator("#chat-text")).to_be_enabled()
    # A message typed before the last one's answer arrives stays in the field: the answer wipes nothing.
    await watch.evaluate("""() => {
        const text = document.getElementById('chat-text');
        text.value = 'third message';
        text.form.requestSubmit();
        text.value = 'still typing';
    }""")
    await expect(console_lines.filter(has_text="third message")).to_have_count(1)
    await expect(watch.locator("#chat-result")).to_have_text("")
    await expect(watch.locator("#chat-text")).to_have_value("still typing")
