"""Keyframe requests sent upstream as RTCP PLIs, coalesced: one at most every KEYFRAME_MIN_INTERVAL.

Both receivers that never decode (a cluster edge's feed from its origin, a WHIP publisher passed
through) ask their sender for keyframes on behalf of many spectators; a burst of requests inside
the window is served by the one PLI already on its way.
"""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable

from .pipeline import KEYFRAME_MIN_INTERVAL


class PliCoalescer:
    """``request()`` as often as asked; ``send(media_ssrc)`` runs at most once per ``interval``.

    A PLI names the media SSRC, known only from the first RTP packet (``media(ssrc)``). A request
    before that is dropped, or, with ``owed_until_media``, sent with the first packet: a WHIP stream
    may start (and its spectators ask for a keyframe) before the publisher's media flows.
    """

    def __init__(
        self,
        send: Callable[[int], Awaitable[None]],
        *,
        name: str,
        owed_until_media: bool = False,
        interval: float = KEYFRAME_MIN_INTERVAL,
    ) -> None:
        self._send = send
        self._name = name  # the task's, for debugging
        self._owed_until_media = owed_until_media
        self._interval = interval
        self.media_ssrc: int | None = None
        self.sent = 0
        self._owed = False
        self._last = -1e9
        self._task: asyncio.Task | None = None
        self.closed = False

    def media(self, ssrc: int) -> None:
        """An RTP packet of the stream arrived: its SSRC is what a PLI names; an owed PLI goes now."""
        self.media_ssrc = ssrc
        if self._owed:
            self._owed = False
            self.request()

    def request(self) -> None:
        if self.closed or self._task is not None:
            return  # one is already on its way: it serves this request too
        self._task = asyncio.get_running_loop().create_task(self._run(), name=self._name)

    async def _run(self) -> None:
        try:
            wait = self._last + self._interval - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if self.media_ssrc is None:
                self._owed = self._owed_until_media
                return
            self._last = time.monotonic()
            self.sent += 1
            await self._send(self.media_ssrc)
        finally:
            self._task = None

    async def close(self) -> None:
        """Cancel the PLI on its way, if any; safe to call twice."""
        self.closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
