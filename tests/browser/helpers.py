"""Helpers shared by the browser tests (bounded waits, screenshots at both sizes)."""

from __future__ import annotations

import os

from playwright.async_api import Page

from tests.browser.conftest import DESKTOP, PHONE, SHOTS_DIR


async def assert_no_horizontal_overflow(page: Page) -> None:
    overflow = await page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"{page.url} is {overflow}px wider than the viewport"


async def shoot(label: str, page: Page, *, restore: dict[str, int] | None = None) -> None:
    """Full-page screenshots at 1280x800 and 360x740 into SHOTS_DIR; no sideways scrolling at either."""
    os.makedirs(SHOTS_DIR, exist_ok=True)
    for name, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
        await page.set_viewport_size(viewport)
        await page.wait_for_timeout(50)  # one layout pass
        await assert_no_horizontal_overflow(page)
        size = f"{viewport['width']}x{viewport['height']}"
        await page.screenshot(path=os.path.join(SHOTS_DIR, f"{label}-{name}-{size}.png"), full_page=True)
    if restore is not None:
        await page.set_viewport_size(restore)
