"""Helpers shared by the browser tests (bounded waits, screenshots at both sizes)."""

from __future__ import annotations

import asyncio
import os

from playwright.async_api import Page

from tests.browser.conftest import DESKTOP, PHONE, SHOTS_DIR

# Generous for a loaded 2-core CI machine; the common case takes about a second.
FIRST_FRAME_MS = 15_000
ADVANCE_MS = 10_000


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


class CuttableLink:
    """A loopback TCP proxy in front of the relay: `cut()` drops every connection through it
    at once (as a lost Wi-Fi would), while new ones still get through. Real sockets, real close.
    Chromium's offline emulation does not close open WebSockets, so it cannot stand in."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._carry, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    def cut(self) -> None:
        for writer in list(self._open):
            writer.transport.abort()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _carry(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self._port)
        except OSError:
            client_writer.transport.abort()
            return
        pair = {client_writer, server_writer}
        self._open |= pair

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.transport.abort()

        await asyncio.gather(pipe(client_reader, server_writer), pipe(server_reader, client_writer))
        self._open -= pair


async def video_reading(page: Page, selector: str) -> dict:
    return await page.evaluate(
        """sel => {
            const v = document.querySelector(sel);
            return {t: v.currentTime, frames: v.getVideoPlaybackQuality().totalVideoFrames,
                    width: v.videoWidth, height: v.videoHeight};
        }""",
        selector,
    )


async def assert_playing(page: Page, selector: str = "#video", *, first_frame_ms: int = FIRST_FRAME_MS,
                         size: tuple[int, int] | None = (320, 176)) -> dict:
    """The <video> has a picture and keeps playing: currentTime *and* decoded frames advance.

    currentTime alone is not proof: for a MediaStream it keeps counting while no frame arrives.
    """
    await page.wait_for_function(
        "sel => document.querySelector(sel).videoWidth > 0", arg=selector, timeout=first_frame_ms
    )
    first = await video_reading(page, selector)
    await page.wait_for_function(
        """([sel, t, frames]) => {
            const v = document.querySelector(sel);
            return v.currentTime > t + 0.3 && v.getVideoPlaybackQuality().totalVideoFrames >= frames + 5;
        }""",
        arg=[selector, first["t"], first["frames"]],
        timeout=ADVANCE_MS,
    )
    second = await video_reading(page, selector)
    assert second["t"] > first["t"] and second["frames"] > first["frames"]
    if size is not None:
        assert (second["width"], second["height"]) == size
    return second
