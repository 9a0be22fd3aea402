"""The host's commands, whatever carries them: REST, the control socket and /odyssey signalling each
parse their own message, call one of these, and render the answer (or the RelayError) their own way.

    start     a stream, then (when asked) ``broadcast_ready`` with the broadcast's links to every listener
    interact  a prompt for the live stream (or the one a REST call names), at the host's own rate
    end       the live stream (or the one named); 409 NO_ACTIVE_STREAM when it is not live

The rules (limits, states, the prompt's rate) are the session manager's; this module is what the three
transports would otherwise each write again.
"""

from __future__ import annotations

from typing import Any

from .broadcast import Broadcast
from .connection import Connection, Stream, no_active_stream
from .sessions import SessionManager


def broadcast_links(broadcast: Broadcast, base_url: str) -> dict[str, Any]:
    """The contract's ``broadcast`` object: where spectators watch, with the token they need."""
    webrtc_url = f"{base_url}/v1/broadcasts/{broadcast.broadcast_id}"
    return {
        "broadcast_id": broadcast.broadcast_id,
        "watch_url": f"{base_url}/watch/{broadcast.broadcast_id}?token={broadcast.spectator_token}",
        "webrtc_url": webrtc_url,
        "whep_url": f"{webrtc_url}/whep",
        # Like watch_url, ready to paste into any player: the token rides along (and on to the segments).
        "hls_url": (f"{webrtc_url}/hls/index.m3u8?token={broadcast.spectator_token}"
                    if broadcast.hls is not None else None),
        "spectator_token": broadcast.spectator_token,
        "share_replay": broadcast.share_replay,
    }


class HostCommands:
    """One host's commands on its connection; ``base_url`` is where the links it announces point."""

    def __init__(self, sessions: SessionManager, conn: Connection, base_url: str) -> None:
        self.sessions = sessions
        self.conn = conn
        self.base_url = base_url

    async def start(self, prompt: Any, image: bytes | None = None, portrait: bool = False,
                    announce: bool = True) -> Stream:
        """Start a stream; ``announce``: tell every listener of the connection where to watch it
        (the relay's own API always does; an /odyssey SDK only when it asked for a broadcast)."""
        stream = await self.sessions.start_stream(self.conn, prompt, image=image, portrait=portrait)
        if announce:
            self.conn.publish({"type": "broadcast_ready",
                               "broadcast": broadcast_links(self.conn.broadcast, self.base_url)})
        return stream

    async def interact(self, prompt: Any, stream: Stream | None = None) -> str:
        """The acknowledged prompt, applied to ``stream`` (a REST call names one) or the live one."""
        return await self.sessions.interact(self.conn.live_stream if stream is None else stream, prompt)

    async def end(self, stream: Stream | None = None) -> Stream:
        """End ``stream`` (a REST call names one) or the live one; NO_ACTIVE_STREAM if it is not live."""
        stream = self.conn.live_stream if stream is None else stream
        if not stream.live:
            raise no_active_stream(stream)
        await self.sessions.end_stream(stream, "ended")
        return stream
