"""The host console's simulations tab in real Chromium, against the real relay and its worker process.

The tab needs only the API key (no connection): submit a script, follow the job to its result
(thumbnail, replay page, video), and read the relay's refusals (422 naming the entry, 429 with
its retry time). Jobs run in a spawned worker process: the first takes a few seconds to start.
"""

from __future__ import annotations

import json

import pytest
from playwright.async_api import expect

from relay.recordings import owner_id
from relay.web import SIMULATIONS
from tests.browser.conftest import CHROMIUM, DESKTOP, HAVE_CHROMIUM, PHONE
from tests.browser.helpers import shoot
from tests.conftest import eventually
from tests.conftest import API_KEY

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not HAVE_CHROMIUM, reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"),
]

UI_MS = 10_000
JOB_MS = 60_000  # bounded: a 3 s script at 320x176 takes a few seconds, a cold worker included
expect.set_options(timeout=UI_MS)

XSS = "<img src=x onerror=window.__xss=1>"


def jobs_of(relay) -> list:
    """The key's jobs, newest first, straight from the relay's store."""
    jobs, _ = relay.app[SIMULATIONS].store.list(owner_id(API_KEY), None, 100, 0)
    return jobs


async def test_simulation_runs_from_the_host_console(relay_factory, open_page):
    relay = await relay_factory(simulations={"workers": 1})
    page = await open_page(f"{relay.url}/host")
    await expect(page.locator("#simulations")).to_be_visible()
    await expect(page.locator("#connection-state")).to_have_text("Not connected")

    # The editor starts with a valid example: a start at 0 ms, an interact, an end at 3000 ms.
    script = json.loads(await page.input_value("#sim-script"))
    assert [sorted(set(e) - {"timestamp_ms"}) for e in script] == [["start"], ["interact"], ["end"]]
    assert script[0]["timestamp_ms"] == 0 and script[-1]["timestamp_ms"] == 3000

    # Only the API key: no connection is opened for a simulation.
    await page.fill("#api-key", API_KEY)
    await page.click("#sim-submit")
    job = page.locator("#sim-jobs .sim-job")
    await expect(job).to_have_count(1)
    await expect(page.locator("#sim-message")).to_contain_text("Submitted")
    await expect(job.locator(".sim-status")).to_have_text("Completed", timeout=JOB_MS)
    assert relay.sessions.connections == {}
    (done,) = jobs_of(relay)
    assert done.status == "completed"
    await expect(job).to_have_attribute("data-job-id", done.job_id)
    await expect(job.locator(".sim-meta")).to_contain_text("retries: 0")
    await expect(job.locator(".sim-cancel")).to_be_hidden()
    await expect(page.locator("#sim-active")).to_be_hidden()  # no active job: no chip, no polling

    # Its result: the thumbnail loads, "Video" is the signed mp4, "Replay" opens the replay page.
    result = job.locator(".sim-result")
    await expect(result).to_have_count(1)
    await page.wait_for_function(
        "() => { const i = document.querySelector('#sim-jobs .sim-thumb-img');"
        " return i && i.complete && i.naturalWidth > 0; }",
        timeout=UI_MS,
    )
    video_href = await result.locator(".sim-video").get_attribute("href")
    assert video_href and "/video.mp4?" in video_href and "signature=" in video_href
    async with page.context.expect_page(timeout=UI_MS) as popup:
        await result.locator(".sim-replay").click()
    replay = await popup.value
    assert "/recordings/" in replay.url and "signature=" in replay.url
    await replay.wait_for_function(
        "() => { const v = document.getElementById('replay-video'); return v && v.readyState >= 1 && v.duration > 0; }",
        timeout=UI_MS,
    )
    duration = await replay.evaluate("document.getElementById('replay-video').duration")
    assert 2.5 <= duration <= 3.5, duration
    await expect(replay.locator("#timeline .tl-prompt")).to_have_text(
        [script[0]["start"]["prompt"], script[1]["interact"]["prompt"]])
    await replay.close()

    # A bad script (the end before it started): the 422 names the entry and its reason.
    bad = [{"timestamp_ms": 0, "start": {"prompt": "a calm ocean"}},
           {"timestamp_ms": 1000, "interact": {"prompt": "a storm"}},
           {"timestamp_ms": 0, "end": {}}]
    await page.fill("#sim-script", json.dumps(bad, indent=2))
    await page.click("#sim-submit")
    message = page.locator("#sim-message")
    await expect(message).to_have_attribute("data-kind", "error")
    await expect(message).to_contain_text("Entry 2 (timestamp_ms): 'end' must come after the start")
    await expect(message).to_contain_text("end_not_after_start")
    await expect(message.locator(".sim-entry")).to_have_text(json.dumps(bad[2], separators=(",", ":")))
    await expect(page.locator("#sim-script")).to_have_attribute("aria-invalid", "true")
    await expect(job).to_have_count(1)  # nothing queued
    assert len(jobs_of(relay)) == 1
    await shoot("host-simulations", page, restore=DESKTOP)


async def test_cancel_and_queue_full_on_a_phone(relay_factory, open_page):
    relay = await relay_factory(simulations={"workers": 1}, limits={"pending_simulations": 2})
    page = await open_page(f"{relay.url}/host", viewport=PHONE)
    await page.fill("#api-key", API_KEY)

    # Text from the relay's refusal is text: an unknown field named like markup stays a name.
    await page.fill("#sim-script", json.dumps([{"timestamp_ms": 0, "start": {"prompt": "x", XSS: 1}},
                                               {"timestamp_ms": 500, "end": {}}]))
    await page.click("#sim-submit")
    message = page.locator("#sim-message")
    await expect(message).to_contain_text(f"Entry 0 (start.{XSS})")
    await expect(message).to_contain_text("unknown_field")
    assert await page.evaluate("document.querySelectorAll('#simulations img').length") == 0
    assert await page.evaluate("typeof window.__xss") == "undefined"

    # With one worker, the second job waits while the first runs: it can be cancelled. (A long
    # script, so the first is surely still running; the relay stops its worker at teardown.)
    long = [{"timestamp_ms": 0, "start": {"prompt": "a long walk"}}, {"timestamp_ms": 60_000, "end": {}}]
    await page.fill("#sim-script", json.dumps(long))
    await page.click("#sim-submit")
    await expect(page.locator("#sim-jobs .sim-job")).to_have_count(1)
    await page.click("#sim-submit")
    jobs = page.locator("#sim-jobs .sim-job")
    await expect(jobs).to_have_count(2)
    await expect(page.locator("#sim-active")).to_have_text("2 active")
    second = jobs.first  # newest first
    await expect(second.locator(".sim-status")).to_have_text("Pending")

    # A third is over the key's limit: 429 with its message and when to retry.
    await page.click("#sim-submit")
    await expect(message).to_have_attribute("data-kind", "warn")
    await expect(message).to_contain_text("2 simulations pending or running (limit 2)")
    await expect(message.locator(".sim-retry")).to_contain_text("Retry in")
    await expect(jobs).to_have_count(2)
    await shoot("host-simulations-queue", page, restore=PHONE)

    await second.locator(".sim-cancel").click()
    await expect(second.locator(".sim-status")).to_have_text("Cancelled")
    await expect(second.locator(".sim-cancel")).to_be_hidden()
    await eventually(lambda: [j.status for j in jobs_of(relay)][0] == "cancelled",
                     what="the job cancelled on the server")
    await expect(page.locator("#sim-active")).to_have_text("1 active")
