"""Real-browser fixtures: Debian's Chromium, driven by Playwright's async API.

The browser runs on the test's own event loop (pytest-asyncio's function loop), next to the
in-process relay from tests/conftest.py, so one launch per test: it takes well under a second
and keeps every test independent of the others' pages, sockets and peer connections.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from tests.cluster import conftest as cluster_kit

# A real Redis and `relay serve` nodes of one cluster, for the pages that outlive a node (test_failover.py).
redis_server = cluster_kit.redis_server
cluster = cluster_kit.cluster

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--autoplay-policy=no-user-gesture-required",
    "--allow-loopback-in-peer-connection",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
]
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 360, "height": 740}

# Where test_pages.py leaves its screenshots (never committed).
SHOTS_DIR = os.environ.get("RELAY_SHOTS_DIR", "/tmp/relay-shots")

HAVE_CHROMIUM = os.access(CHROMIUM, os.X_OK)


@pytest.fixture
async def browser(relay_factory) -> AsyncIterator:
    """A headless Chromium for one test.

    Depends on relay_factory so that the relay (its aiohttp_server) is torn down after the
    browser: pages leave cleanly (WHEP DELETE, sockets closed) while the server still answers.
    """
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        instance = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield instance
        finally:
            await instance.close()


@pytest.fixture
async def open_page(browser) -> AsyncIterator[Callable[..., Awaitable]]:
    """`await open_page(url, viewport=DESKTOP)` -> a Page in its own context (own storage).

    Every page is watched for uncaught script errors; any makes the test fail at teardown, so
    "shows an error state, not a crash" is checked everywhere, not only where a test looks.
    """
    errors: list[str] = []  # uncaught exceptions and unhandled rejections, from every page
    contexts = []

    async def open_(url: str | None = None, *, viewport: dict[str, int] = DESKTOP):
        context = await browser.new_context(viewport=viewport)
        contexts.append(context)
        # Every page of the context, including ones a link opens in a new tab.
        context.on("page", lambda page: page.on("pageerror", lambda exc: errors.append(f"{page.url}: {exc}")))
        page = await context.new_page()
        if url is not None:
            await page.goto(url)
        return page

    yield open_
    for context in contexts:
        await context.close()
    assert not errors, f"script errors in the pages: {list(errors)}"
