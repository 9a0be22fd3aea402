"""The hosted world-model API as a source: every ``connect()`` is one hosted session (a streamer).

It owns the REST client the streamers share and the background tasks their sessions leave (a
socket's close handshake finishing), so ``close()`` leaves nothing behind.
"""

from __future__ import annotations

import asyncio

from ...errors import RelayError
from .client import DEFAULT_API_URL, HostedClient, HostedTimeouts
from .streamer import HostedStreamer


class HostedWorldModel:
    """The hosted world-model API as a source: every ``connect()`` is one hosted session."""

    def __init__(self, url: str = DEFAULT_API_URL, api_key: str = "", width: int = 1280, height: int = 704,
                 fps: int = 25, *, api_key_env: str = "ODYSSEY_API_KEY",
                 timeouts: HostedTimeouts = HostedTimeouts()) -> None:
        self.client = HostedClient(url, api_key, api_key_env=api_key_env, timeouts=timeouts)
        self.width, self.height, self.fps = width, height, fps
        self._streamers: set[HostedStreamer] = set()
        self._background: set[asyncio.Task] = set()
        self.closed = False

    @property
    def url(self) -> str:
        return self.client.url

    @property
    def timeouts(self) -> HostedTimeouts:
        """Every bound on the hosted API, the client's and the sessions' alike (one object to tune)."""
        return self.client.timeouts

    @timeouts.setter
    def timeouts(self, value: HostedTimeouts) -> None:
        self.client.timeouts = value

    @property
    def streamers(self) -> set[HostedStreamer]:
        return set(self._streamers)

    async def connect(self) -> HostedStreamer:
        if self.closed:
            raise RelayError("STREAMER_NOT_AVAILABLE", 503, "The relay is shutting down.", action="Retry shortly.",
                             retry_after=5)
        streamer = HostedStreamer(self.client, self.track_background, self.forget)
        self._streamers.add(streamer)
        try:
            await streamer.open()
        except BaseException:
            self._streamers.discard(streamer)
            await asyncio.shield(streamer.disconnect())
            raise
        return streamer

    async def close(self) -> None:
        self.closed = True
        streamers, self._streamers = list(self._streamers), set()
        await asyncio.gather(*(s.disconnect() for s in streamers), return_exceptions=True)
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)
        await self.client.close()

    def forget(self, streamer: HostedStreamer) -> None:
        """A streamer disconnected: it is no longer the model's to close."""
        self._streamers.discard(streamer)

    def track_background(self, task: asyncio.Future) -> None:
        """A task that must finish before ``close()`` returns (a session's close, a socket's goodbye)."""
        self._background.add(task)
        task.add_done_callback(self._background.discard)
