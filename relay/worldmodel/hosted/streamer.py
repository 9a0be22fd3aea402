"""One relay connection's hold on the hosted API: one session at a time, one stream at a time.

Commands go out one at a time (a lock), so every reply on ``streamerToClient`` matches the command
waiting for it; an update given up on still has its reply due, and that late reply is skipped.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from typing import Any, Callable

from ...errors import RelayError
from .. import hosted_protocol as protocol
from .client import HostedClient
from .errors import stream_error, upstream_error
from .session import HostedSession
from .track import HostedTrack


log = logging.getLogger(__name__)


def data_url(image: bytes) -> str:
    """The SDK sends the image as a data: URL (L1390-1415)."""
    if image.startswith(b"\x89PNG"):
        mime = "image/png"
    elif image[:4] == b"RIFF" and image[8:12] == b"WEBP":
        mime = "image/webp"
    elif image[:4] == b"GIF8":
        mime = "image/gif"
    else:
        mime = "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(image).decode()}"


class HostedStreamer:
    """One relay connection's hold on the hosted API: one session at a time, one stream at a time."""

    def __init__(self, client: HostedClient, track_background: Callable[[asyncio.Future], None],
                 on_disconnect: Callable[[HostedStreamer], None]) -> None:
        self._client = client
        self._track_background = track_background  # the model's: its close() waits for these
        self._on_disconnect = on_disconnect
        self._session: HostedSession | None = None
        self._track: HostedTrack | None = None
        self._streaming = False  # stream_started seen, stream_ended not yet
        self._waiting: dict[str, asyncio.Future] = {}  # "start" | "update" | "end" -> its reply
        self._lock = asyncio.Lock()  # one command at a time: every reply matches its command
        self._late_updates = 0  # updates given up on: their replies, still due in order, are skipped
        self._disconnected = False

    @property
    def session_id(self) -> str | None:
        return self._session.session_id if self._session is not None else None

    @property
    def track(self) -> HostedTrack | None:
        return self._track

    async def open(self) -> None:
        async with self._lock:
            await self._ensure_session()

    async def _ensure_session(self) -> HostedSession:
        """The live session, or a new one if there is none or it failed (the SDK's rule after an error)."""
        if self._disconnected:
            raise upstream_error("This hosted streamer is disconnected.")
        session = self._session
        if session is not None and session.usable:
            return session
        self._session = None
        if session is not None:
            await session.close()
        session = self._session = HostedSession(self._client, self, self._track_background)
        self._late_updates = 0
        try:
            await session.open()
        except BaseException:
            if self._session is session:
                self._session = None
            await session.close()
            raise
        if self._disconnected:  # disconnected while opening: nothing may outlive it
            await session.close()
            raise upstream_error("This hosted streamer is disconnected.")
        return session

    # -- the protocol ------------------------------------------------------------------------------

    async def start_stream(self, prompt: str, image: bytes | None = None, portrait: bool = False) -> HostedTrack:
        async with self._lock:
            if self._track is not None and self._track.readyState == "live" and self._track.error is None:
                raise RuntimeError("a stream is already running on this streamer")
            session = await self._ensure_session()
            if image is not None and not session.image_to_video:
                raise RelayError("INVALID_REQUEST", 422,
                                 "The hosted world model does not take an image with the prompt "
                                 "(its session reports image_to_video false).",
                                 action="Start the stream without an image.")
            message: dict[str, Any] = {"type": protocol.STREAM_START, "prompt": prompt, "portrait": portrait,
                                       "broadcast": False}  # the relay broadcasts itself
            if image is not None:
                message["input_image_base64"] = data_url(image)
            track = self._track = HostedTrack(self._client.timeouts.stall)
            try:
                await self._command(session, message, "start", via_socket=image is not None)
            except BaseException:
                self._track = None
                self._streaming = False
                track.stop()
                raise
            return track

    async def interact(self, prompt: str) -> str:
        async with self._lock:
            session = self._session
            if session is None or not session.usable or not self._streaming:
                raise upstream_error("The hosted world model's stream is no longer running.",
                                     action="Start a new stream.")
            reply = await self._command(session, {"type": protocol.UPDATE, "prompt": prompt}, "update")
        acknowledged = reply.get("prompt")
        return acknowledged if isinstance(acknowledged, str) and acknowledged else prompt

    async def end_stream(self) -> None:
        track, self._track = self._track, None
        if track is not None:
            track.stop()
        async with self._lock:
            session = self._session
            if self._streaming and session is not None and session.usable:
                try:
                    await self._command(session, {"type": protocol.STREAM_END}, "end")
                except RelayError as err:
                    log.warning("hosted: end of stream not confirmed: %s", err.message)
            self._streaming = False

    async def disconnect(self) -> None:
        if self._disconnected:
            return
        self._disconnected = True
        self._on_disconnect(self)
        track, self._track = self._track, None
        if track is not None:
            track.stop()
        self._streaming = False
        self._reject_all(upstream_error("The hosted streamer was disconnected."))
        session, self._session = self._session, None  # a closed connection (kept for its streams' sake)
        if session is not None:                          # must not keep a peer connection alive
            await session.close()

    # -- plumbing ----------------------------------------------------------------------------------

    async def _command(self, session: HostedSession, message: dict[str, Any], kind: str, *,
                       via_socket: bool = False) -> dict[str, Any]:
        future = asyncio.get_running_loop().create_future()
        self._waiting[kind] = future
        timeout = self._client.timeouts.command
        try:
            await session.send(message, via_socket=via_socket)
            return await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            error = upstream_error(f"The hosted world model did not answer {message['type']} within {timeout:g} s.")
            if kind == "update":
                self._late_updates += 1  # its acknowledgement may still come: it must not answer the next one
            else:
                # A start or an end whose outcome is unknown may leave a stream running upstream that
                # nobody accounts for: give the whole session up (the next start requests a new one).
                session.fail(error)
            raise error from None
        finally:
            if self._waiting.get(kind) is future:
                del self._waiting[kind]
            if not future.done():
                future.cancel()

    def _resolve(self, kind: str, message: dict[str, Any]) -> bool:
        future = self._waiting.get(kind)
        if future is None or future.done():
            return False
        future.set_result(message)
        return True

    def _reject(self, kind: str, error: RelayError) -> bool:
        future = self._waiting.get(kind)
        if future is None or future.done():
            return False
        future.set_exception(error)
        future.exception()  # retrieved here: the waiter may have gone (timed out) meanwhile
        return True

    def _reject_all(self, error: RelayError) -> None:
        for kind in list(self._waiting):
            self._reject(kind, error)

    # -- what the session hears ---------------------------------------------------------------------

    def on_event(self, session: HostedSession, message: dict[str, Any]) -> None:
        """streamerToClient (protocol §6)."""
        if session is not self._session:
            return
        kind = message.get("type")
        if kind == protocol.STREAM_STARTED:
            if self._resolve("start", message):
                self._streaming = True
        elif kind == protocol.UPDATE_ACKNOWLEDGED:
            if self._late_updates:
                self._late_updates -= 1
            else:
                self._resolve("update", message)
        elif kind == protocol.STREAM_ENDED:
            was_streaming, self._streaming = self._streaming, False
            if not self._resolve("end", message) and was_streaming:
                self._fail_track("The hosted world model ended the stream.")
        elif kind == protocol.STREAM_ERROR:
            error = stream_error(message)
            if "update" not in self._waiting and "start" not in self._waiting and self._late_updates:
                self._late_updates -= 1  # the late answer to an update given up on
                return
            if not (self._reject("start", error) or self._reject("update", error)):
                self._fail_track(error.message)  # unsolicited: the stream failed (duration, moderation, ...)
        # broadcast_ready never comes (broadcast false); unknown types are ignored, as the SDK does

    def on_frame(self, session: HostedSession, frame) -> None:
        track = self._track
        if session is self._session and self._streaming and track is not None:
            track.push(frame)

    def _fail_track(self, reason: str) -> None:
        track = self._track
        if track is not None:
            track.fail(reason)

    def session_failed(self, session: HostedSession, error: RelayError) -> None:
        if session is not self._session:
            return
        self._streaming = False
        self._reject_all(error)
        self._fail_track(error.message)
        # Closed at once (its socket, peer and tasks); the next start_stream requests a new session.
        self._track_background(asyncio.ensure_future(session.close()))
