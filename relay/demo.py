"""Demo mode: the relay hosts itself, so a watch URL is live the moment the server starts.

It opens a connection like any host (through the same SessionManager, so every limit holds),
starts a stream, steers it through a few prompts, and starts the next stream whenever the
last one ends, for as long as the server runs. It streams on one fixed channel (when the relay keeps
channels), so its printed watch URL stays the same across connections and restarts, whatever API key
the server generated this time. Its prompts pause while the audience has control (the queue, vote or
turns mode), so they never overwrite the audience's.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import Counter

from .channels import Channel
from .errors import RelayError
from .host import broadcast_links
from .sessions import Connection, SessionManager

log = logging.getLogger(__name__)

SCENES = [
    ["a calm ocean at sunset", "storm clouds roll in", "night falls over the sea"],
    ["snowy mountains at dawn", "a blizzard sweeps the peaks", "clear sky, fly fast"],
    ["a desert of red dunes", "a sandstorm rises", "neon night over the dunes"],
    ["a green forest in spring", "rain falls on the forest", "golden autumn evening"],
]
PROMPT_EVERY_SECONDS = 12.0
# The demo's channel belongs to no API key (a key's owner id is a sha256 hex digest): no host can list,
# delete or connect to it, and a server restarted with a new generated key finds it again.
DEMO_OWNER = "relay-demo"
DEMO_SLUG = "demo"
DEMO_TITLE = "Relay demo: a world that keeps moving"


class DemoHost:
    def __init__(self, sessions: SessionManager, api_key: str,
                 prompt_every_seconds: float = PROMPT_EVERY_SECONDS) -> None:
        self._sessions = sessions
        self._api_key = api_key
        self._prompt_every = prompt_every_seconds
        self._conn: Connection | None = None
        # Its prompt intervals so far: "prompted", or "paused" (the audience had control): what a test
        # counts, instead of hoping a sleep spans enough of them.
        self.beats: Counter[str] = Counter()

    async def open(self) -> str:
        """Open the demo connection; returns the watch page's path (with its token)."""
        conn = await self._sessions.open_connection(self._api_key, await self._channel())
        self._sessions.control_opened(conn)  # the demo is always "there": never idle-reaped
        self._conn = conn
        return broadcast_links(conn.broadcast, "")["watch_url"]  # under no base: the path

    async def _channel(self) -> Channel | None:
        store = self._sessions.channels
        if store is None:
            return None
        try:
            return store.get(DEMO_OWNER, DEMO_SLUG)
        except RelayError:
            pass  # the first run on this data_dir
        try:
            return await asyncio.to_thread(store.create, DEMO_OWNER, {"title": DEMO_TITLE, "slug": DEMO_SLUG},
                                           self._sessions.clock.time())
        except (RelayError, OSError) as exc:  # channels_per_key = 0, or a disk that refuses: a link of its own
            log.warning("demo runs without a lasting watch URL: %s", exc)
            return None

    @property
    def hls_path(self) -> str | None:
        """The demo broadcast's live HLS playlist path (with its token), if HLS is on."""
        return None if self._conn is None else broadcast_links(self._conn.broadcast, "")["hls_url"]

    async def run(self) -> None:
        """Stream for as long as the server runs; a connection that reaches connection_max_seconds
        is replaced by a new one (on the same channel: the same watch URL)."""
        assert self._conn is not None
        try:
            while True:
                if self._conn.closed:
                    # Its close finished first: until then the channel still counts it as its host.
                    await self._sessions.close_connection(self._conn)
                    log.info("demo connection ended; reopened, watch URL: %s", await self.open())
                await self._stream_scenes(self._conn)
        finally:
            await self._sessions.close_connection(self._conn, "disconnected")

    async def _stream_scenes(self, conn: Connection) -> None:
        events = conn.listen()
        try:
            for scene in itertools.cycle(SCENES):
                if conn.closed:
                    return
                stream = await self._sessions.start_stream(conn, scene[0])
                prompts = itertools.cycle(scene[1:] + scene[:1])
                while True:
                    ended = await _wait_for_end(events, stream.stream_id, self._prompt_every)
                    if ended or not stream.live:
                        break
                    if conn.broadcast.orchestrator.mode == "host":  # else the audience is steering
                        await self._sessions.interact(stream, next(prompts))
                        self.beats["prompted"] += 1
                    else:
                        self.beats["paused"] += 1
        finally:
            conn.unlisten(events)


async def _wait_for_end(events: asyncio.Queue, stream_id: str, timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (remaining := deadline - loop.time()) > 0:
        try:
            async with asyncio.timeout(remaining):  # not wait_for: it can swallow a cancellation (see web.next_for)
                event = await events.get()
        except TimeoutError:
            return False
        if event.get("type") == "stream_ended" and event.get("stream_id") == stream_id:
            return True
        if event.get("type") == "disconnected":
            return True
    return False
