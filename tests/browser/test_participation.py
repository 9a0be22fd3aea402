"""Audience participation in real Chromium: the watch page's participate section and the host
console's orchestration panel, against the real relay (events socket, control socket, REST).

Every wait is bounded (expect / wait_for_function with a timeout, or `eventually`).
"""

from __future__ import annotations

import json
import re

import pytest
from playwright.async_api import Page, expect

from relay.client import RelayClient
from tests.browser.conftest import CHROMIUM, HAVE_CHROMIUM, PHONE
from tests.browser.helpers import shoot
from tests.conftest import eventually
from tests.conftest import API_KEY

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not HAVE_CHROMIUM, reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"),
]

UI_MS = 10_000
expect.set_options(timeout=UI_MS)

LONG = {"stream_max_seconds": 30, "idle_timeout_seconds": 60}
MINE = re.compile(r"\bmine\b")
XSS = "<img src=x onerror=window.__xss=1>"


async def set_mode(client: RelayClient, broadcast_id: str, mode: str, **settings) -> dict:
    """The host's REST call (API key), as a host application would make it."""
    return await client.request("PUT", f"/v1/broadcasts/{broadcast_id}/orchestration", json={"mode": mode, **settings})


async def joined(page: Page) -> None:
    """The participate section is up and the events socket has given us a participant id."""
    await expect(page.locator("#participate")).to_be_visible()
    await expect(page.locator("#input-prompt")).to_be_enabled()


async def set_name(page: Page, name: str) -> None:
    await page.click("#name-box summary")
    await page.fill("#name", name)
    await page.click("#name-save")
    await expect(page.locator("#name-current")).to_have_text(name)


def candidate(page: Page, prompt: str):
    return page.locator("#candidates li.candidate", has_text=prompt)


async def test_participants_vote_and_see_the_tally_move(relay_factory, open_page):
    relay = await relay_factory(limits=LONG)
    async with RelayClient(relay.url, API_KEY) as client, client.connect() as conn:
        bid = conn.broadcast["broadcast_id"]
        await set_mode(client, bid, "vote", vote_window_seconds=20, cooldown_seconds=0)
        a = await open_page(conn.broadcast["watch_url"])
        b = await open_page(conn.broadcast["watch_url"], viewport=PHONE)
        await joined(a)
        await joined(b)
        await expect(a.locator("#mode-chip")).to_have_text("Vote")
        await set_name(a, "Alice")

        # A proposes: a candidate with A's own vote, a round with a countdown.
        await a.fill("#input-prompt", "a dragon over the sea")
        await a.click("#input-send")
        await expect(a.locator("#input-result")).to_contain_text("candidate")
        await expect(a.locator("#input-prompt")).to_have_value("")  # sent: the box is cleared
        mine_a = candidate(a, "a dragon over the sea")
        await expect(mine_a.locator(".votes")).to_have_attribute("data-votes", "1")
        await expect(mine_a).to_have_class(MINE)
        await expect(mine_a.locator(".vote-btn")).to_have_attribute("aria-pressed", "true")
        await expect(a.locator("#vote-countdown")).to_be_visible()
        await expect(a.locator("#vote-countdown")).to_have_text(re.compile(r"^0:(1\d|20) left$"))

        # B sees the candidate (pushed over the events socket) and votes for it.
        theirs = candidate(b, "a dragon over the sea")
        await expect(theirs.locator(".votes")).to_have_attribute("data-votes", "1")
        await expect(theirs.locator(".vote-btn")).to_have_attribute("aria-pressed", "false")
        await theirs.locator(".vote-btn").click()

        # Both see the tally move to 2; B's vote is highlighted as B's.
        for page in (a, b):
            await expect(candidate(page, "a dragon over the sea").locator(".votes")).to_have_text("2 votes")
        await expect(theirs).to_have_class(MINE)
        await expect(theirs.locator(".vote-btn")).to_have_text("Your vote")
        await expect(b.locator("#input-result")).to_contain_text("Vote counted")

        # B proposes another prompt: B's one vote moves to it (one vote each), and the tally follows.
        await b.fill("#input-prompt", "a storm rolls in")
        await b.click("#input-send")
        for page in (a, b):
            await expect(candidate(page, "a dragon over the sea").locator(".votes")).to_have_text("1 vote")
            await expect(candidate(page, "a storm rolls in").locator(".votes")).to_have_text("1 vote")
        await expect(candidate(b, "a storm rolls in")).to_have_class(MINE)
        await expect(theirs).not_to_have_class(MINE)
        # ...and B changes their mind back.
        await theirs.locator(".vote-btn").click()
        for page in (a, b):
            await expect(candidate(page, "a dragon over the sea").locator(".votes")).to_have_text("2 votes")
            await expect(candidate(page, "a storm rolls in").locator(".votes")).to_have_text("0 votes")

        # The server agrees with what the pages show.
        state = conn_state = await client.request("GET", f"/v1/broadcasts/{bid}/orchestration")
        assert {c["prompt"]: c["votes"] for c in conn_state["candidates"]} == {
            "a dragon over the sea": 2, "a storm rolls in": 0}, state
        await shoot("watch-vote", b, restore=PHONE)


async def test_queued_prompt_with_html_shows_as_text(relay_factory, open_page):
    relay = await relay_factory(limits=LONG)
    async with RelayClient(relay.url, API_KEY) as client, client.connect() as conn:
        bid = conn.broadcast["broadcast_id"]
        await set_mode(client, bid, "queue", queue_interval_seconds=1, cooldown_seconds=0)
        page = await open_page(conn.broadcast["watch_url"])
        await joined(page)
        await expect(page.locator("#mode-chip")).to_have_text("Queue")
        await set_name(page, "<b>Mallory</b>")

        # Nothing is live, so the queue holds the entry (nothing is forwarded until a stream runs).
        await page.fill("#input-prompt", XSS)
        await page.click("#input-send")
        await expect(page.locator("#input-result")).to_contain_text("Queued")
        entry = page.locator("#queue li")
        await expect(entry).to_have_count(1)
        await expect(entry.locator(".prompt")).to_have_text(XSS)
        await expect(entry.locator(".who")).to_have_text("You")
        # One waiting entry per participant: the box says so instead of letting a refusal happen.
        await expect(page.locator("#input-prompt")).to_be_disabled()
        await shoot("watch-queue", page, restore={"width": 1280, "height": 800})

        # A stream starts: the queue forwards it to the model, and it shows in the recent prompts.
        await conn.start_stream("a calm ocean at sunset")
        await expect(entry).to_have_count(0)
        recent = page.locator("#recent-prompts li", has_text="onerror")
        await expect(recent.locator(".prompt")).to_have_text(XSS)
        await expect(recent.locator(".who")).to_contain_text("You")
        await expect(page.locator("#current-prompt")).to_have_text(XSS)
        # "Queued" was true until now; the page follows the prompt to the world and says so.
        await expect(page.locator("#input-result")).to_have_text("Applied: your prompt is on screen now.")
        stream = await client.get_stream(conn.stream_id)
        assert stream["last_applied_prompt"] == XSS

        assert await page.evaluate("document.querySelectorAll('img:not(#share-qr), b').length") == 0
        assert await page.evaluate("typeof window.__xss") == "undefined"


async def test_host_console_switches_mode_and_moderates(relay_factory, open_page):
    relay = await relay_factory(limits=LONG)
    host = await open_page(f"{relay.url}/host")
    await host.fill("#api-key", API_KEY)
    await host.click("#connect")
    await expect(host.locator("#connection-state")).to_have_text("Connected")
    panel = host.locator("#orchestration")
    await expect(panel).to_be_visible()
    await expect(host.locator("#orch-live-mode")).to_have_text("Now: Host")
    await expect(host.locator("#mode-switch input[value=host]")).to_be_checked()

    watch_url = await host.locator("#watch-url").get_attribute("href")
    watch = await open_page(watch_url, viewport=PHONE)
    await expect(watch.locator("#state")).to_have_attribute("data-state", "waiting")
    await expect(watch.locator("#participate")).to_be_hidden()  # host mode: nothing to take part in
    await expect(host.locator("#participants li")).to_have_count(1)  # the watch page's events socket

    # Switch to vote through the panel, with its own window length.
    await host.click("#mode-switch label:has(input[value=vote])")
    await expect(host.locator("#orch-apply")).to_have_text("Switch to Vote")
    await expect(host.locator("#set-vote_window_seconds")).to_be_visible()
    await expect(host.locator("#set-turn_seconds")).to_be_hidden()
    await host.fill("#set-vote_window_seconds", "25")
    await host.fill("#set-blocked_words", "darn")
    await host.click("#orch-apply")
    await expect(host.locator("#orch-status")).to_contain_text("Applied")
    await expect(host.locator("#orch-live-mode")).to_have_text("Now: Vote")
    orchestrator = next(iter(relay.sessions.connections.values())).broadcast.orchestrator
    assert orchestrator.mode == "vote"
    assert orchestrator.settings.vote_window_seconds == 25
    assert orchestrator.settings.blocked_words == ("darn",)

    # The watch page's participate section appears, in vote mode.
    await joined(watch)
    await expect(watch.locator("#mode-chip")).to_have_text("Vote")
    await expect(watch.locator("#mode-help")).to_contain_text("25 s")
    await set_name(watch, "Alice")

    # Moderation: a blocked word is refused with a human reason.
    await watch.fill("#input-prompt", "darn this fog")
    await watch.click("#input-send")
    await expect(watch.locator("#input-result")).to_contain_text("not allowed")
    await expect(watch.locator("#input-result")).to_have_attribute("data-kind", "error")

    # A proposal shows live on the host's panel; the participant is listed by name.
    await watch.fill("#input-prompt", "a lighthouse in the fog")
    await watch.click("#input-send")
    await expect(host.locator("#orch-candidates li", has_text="a lighthouse in the fog")).to_contain_text("1 vote")
    row = host.locator("#participants li", has_text="Alice")
    await expect(row).to_have_count(1)

    # Block: the participant's candidate goes, and their next input is refused.
    await row.locator("[data-action=block]").click()
    await expect(row.locator(".tag[data-tag=blocked]")).to_be_visible()
    await expect(row.locator("[data-action=block]")).to_have_text("Unblock")
    await expect(host.locator("#orch-candidates li")).to_have_count(0)
    await watch.fill("#input-prompt", "let me in")
    await watch.click("#input-send")
    await expect(watch.locator("#input-result")).to_contain_text("muted")
    await row.locator("[data-action=block]").click()
    await expect(row.locator(".tag[data-tag=blocked]")).to_have_count(0)

    # Turns: the host gives Alice the turn; her page says so, with a countdown; then revokes it.
    await host.click("#mode-switch label:has(input[value=turns])")
    await host.fill("#set-turn_seconds", "40")
    await host.click("#orch-apply")
    await expect(host.locator("#orch-live-mode")).to_have_text("Now: Turns")
    await expect(watch.locator("#raise-hand")).to_be_visible()
    await expect(watch.locator("#input-prompt")).to_be_disabled()  # not her turn
    await row.locator("[data-action=grant]").click()
    await expect(row.locator(".tag[data-tag=turn]")).to_be_visible()
    await expect(host.locator("#orch-turn-holder")).to_have_text("Alice")
    await expect(watch.locator("#turn-holder")).to_have_text("You")
    await expect(watch.locator("#turn-countdown")).to_have_text(re.compile(r"^0:(3\d|40) left$"))
    await expect(watch.locator("#input-prompt")).to_be_enabled()
    await shoot("host-orchestration", host, restore={"width": 1280, "height": 800})
    await shoot("watch-turns", watch, restore=PHONE)
    await row.locator("[data-action=revoke]").click()
    await expect(watch.locator("#turn-holder")).to_have_text("Nobody")
    await expect(watch.locator("#input-prompt")).to_be_disabled()

    # A setting the relay refuses is said in the panel, and nothing changes.
    await host.fill("#set-blocked_words", "darn, !!!")  # a "word" with no letter: 422 from the relay
    await host.click("#orch-apply")
    await expect(host.locator("#orch-status")).to_contain_text("Not applied")
    await expect(host.locator("#orch-status")).to_have_attribute("data-kind", "error")
    await expect(host.locator("#host-message")).to_be_hidden()  # said once, where it belongs
    assert orchestrator.settings.blocked_words == ("darn",)

    # Back to host mode: the participate section goes away again.
    await host.click("#orch-reset")
    await host.click("#mode-switch label:has(input[value=host])")
    await host.click("#orch-apply")
    await expect(watch.locator("#participate")).to_be_hidden()
    await host.click("#disconnect")
    await eventually(lambda: not relay.sessions.connections, what="the connection closed")


async def test_a_reloaded_watch_page_is_the_same_participant(relay_factory, open_page):
    relay = await relay_factory(limits=LONG)
    async with RelayClient(relay.url, API_KEY) as client, client.connect() as conn:
        bid = conn.broadcast["broadcast_id"]
        await set_mode(client, bid, "queue", queue_interval_seconds=1, cooldown_seconds=120)
        page = await open_page(conn.broadcast["watch_url"])
        await joined(page)
        await set_name(page, "Rosa")
        await page.fill("#input-prompt", "a lighthouse in fog")
        await page.click("#input-send")
        await expect(page.locator("#input-result")).to_contain_text("Queued")
        state = await client.request("GET", f"/v1/broadcasts/{bid}/orchestration")
        (rosa,) = state["participants"]

        # A reload (or a dropped network) comes back as the same participant: the host sees one
        # Rosa, not two, and her cooldown was not reset by reconnecting.
        await page.reload()
        await joined(page)
        await eventually(lambda: rosa["participant_id"] in relay.sessions.broadcast(bid).orchestrator.participants,
                         timeout=5, what="Rosa back")
        state = await client.request("GET", f"/v1/broadcasts/{bid}/orchestration")
        assert [(p["participant_id"], p["name"]) for p in state["participants"]] == [(rosa["participant_id"], "Rosa")]
        await page.fill("#input-prompt", "a windmill at dawn")
        await page.click("#input-send")
        await expect(page.locator("#input-result")).to_contain_text("Not so fast")
        await expect(page.locator("#input-send")).to_be_disabled()


async def test_an_invite_link_makes_the_page_an_invited_participant(relay_factory, open_page):
    relay = await relay_factory(limits=LONG)
    async with RelayClient(relay.url, API_KEY) as client, client.connect() as conn:
        await conn.start_stream("a quiet lake")
        bid = conn.broadcast["broadcast_id"]
        await set_mode(client, bid, "queue", invite_only=True, cooldown_seconds=0)
        minted = (await client.request("POST", f"/v1/broadcasts/{bid}/invites", json={"count": 1}))["invites"][0]
        guest = await open_page(conn.broadcast["watch_url"])
        invited = await open_page(minted["watch_url"])
        for page, prompt in ((guest, "snow"), (invited, "rain")):
            await joined(page)
            await page.fill("#input-prompt", prompt)
            await page.click("#input-send")
        await expect(guest.locator("#input-result")).to_contain_text("invite")
        # Queued, then applied at the queue's next tick (a stream is live): the page says the latter.
        await expect(invited.locator("#input-result")).to_contain_text("Applied")
        present = relay.sessions.broadcast(bid).orchestrator.participants
        assert minted["participant_id"] in present


async def test_a_catch_up_hello_on_the_same_socket_does_not_send_the_name_again(relay_factory, open_page):
    """A cluster's edge catches its sockets up with a fresh hello (same participant) when pushes may have
    been lost: the page takes the state from it, and does not send every page's name back at once."""
    relay = await relay_factory(limits=LONG)
    sent: list[dict] = []
    to_page: list = []  # the route's page side, to speak as the relay
    hellos: list[dict] = []
    lost = {"orchestration": False}

    def route(ws) -> None:
        server = ws.connect_to_server()
        to_page.append(ws)

        def from_page(message) -> None:
            sent.append(json.loads(message))
            server.send(message)

        def from_relay(message) -> None:
            if json.loads(message).get("type") == "hello":
                hellos.append(json.loads(message))
            if not (lost["orchestration"] and json.loads(message).get("type") == "orchestration"):
                ws.send(message)
        ws.on_message(from_page)
        server.on_message(from_relay)

    async with RelayClient(relay.url, API_KEY) as client, client.connect() as conn:
        bid = conn.broadcast["broadcast_id"]
        await set_mode(client, bid, "queue", cooldown_seconds=0)
        page = await open_page()
        await page.route_web_socket(re.compile(r"/events"), route)
        await page.goto(conn.broadcast["watch_url"])
        await joined(page)
        await set_name(page, "Rosa")
        await eventually(lambda: {"type": "hello", "name": "Rosa"} in sent, timeout=5, what="the name sent")
        lost["orchestration"] = True  # the push of the host's change is lost (Redis away between nodes)
        await set_mode(client, bid, "vote", vote_window_seconds=30)
        state = await client.request("GET", f"/v1/broadcasts/{bid}/orchestration")
        public = {k: v for k, v in state.items() if k != "participants"}  # the host's view has more
        public["settings"] = {k: v for k, v in state["settings"].items() if k != "blocked_words"}
        to_page[-1].send(json.dumps({**hellos[-1], "resumed": True, "orchestration": public}))
        await expect(page.locator("#mode-chip")).to_have_text("Vote")  # the catch-up's state, applied
        await page.fill("#input-prompt", "a paper boat")
        await page.click("#input-send")
        await eventually(lambda: any(m.get("type") == "input" for m in sent), timeout=5, what="the input sent")
        assert [m for m in sent if m.get("type") == "hello"] == [{"type": "hello", "name": "Rosa"}]
