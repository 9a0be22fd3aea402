"""The hosted world-model API as the relay's source: the relay is one more client of it.

``[world_model] kind = "hosted"`` makes every relay connection hold one session of the hosted API
(its official SDK, `@odysseyml/odyssey` 1.3.1, is the reference for every call; see
relay/odyssey/protocol.py). The owner side of that session receives the real model's video, which
the relay then encodes once, fans out to its spectators and records, like any source's.

    connect()      POST /auth/token (re-exchanged 60 s before it expires), POST /sessions/request
                   (503: polled every second for ``queue`` seconds; 429: the hosted usage error),
                   POST /sessions/token, GET {signalling_url}/config, the signalling socket (retried
                   like the SDK's before it opens), the streamer's offer answered by aiortc (the
                   answer without candidates, then each of ours trickled as ``ice_candidate``, as a
                   browser does), keepalives every 10 s; ready once the peer is connected, the video
                   track is there and ``clientToStreamer`` is open.
    start_stream   ``interactive_stream_start`` (broadcast false: the relay fans out itself; with an
                   image, or too large for the channel, over the socket) -> ``stream_started``.
    interact       ``update`` -> ``update_acknowledged`` (its prompt is what the model applied).
    end_stream     ``interactive_stream_end`` -> ``stream_ended``.
    disconnect     ``client_disconnecting``, the socket closed 1000, then the peer connection.

Every wait is bounded (:class:`HostedTimeouts`). Video keeps arriving on one peer connection across
streams, so one task drains it and hands frames to the current stream's :class:`HostedTrack` only
while that stream is live, re-timed on the relay's own clock. The track ends (MediaStreamError, so
the core ends the stream with ``upstream_error``) when the upstream ends the stream by itself or
reports ``interactive_stream_error``, when the signalling socket sends ``error`` or closes, when the
peer connection fails or the video stops for ``stall`` seconds. A session that failed is closed at
once; the next ``start_stream`` on that relay connection requests a new one (as the SDK does).

Failures are RelayErrors, so they reach the host as they are (REST body or control-socket ``error``):
the hosted 429 usage errors keep their code, message, action and details; a refused start or update
keeps its reason (``CONCURRENT_LIMIT_REACHED``, ...) or is ``UPSTREAM_ERROR`` 502 with the hosted
message; an unreachable or misconfigured upstream (a wrong API key) is ``UPSTREAM_ERROR`` 502; no free
hosted streamer within the queue time is ``STREAMER_NOT_AVAILABLE`` 503.
"""

from __future__ import annotations

import asyncio
import base64
import fractions
import json
import logging
import re
import time
from collections import deque
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtcconfiguration import RTCBundlePolicy, RTCIceTransportPolicy
from aiortc.sdp import candidate_from_sdp

from ..errors import RelayError
from ..odyssey import protocol

log = logging.getLogger(__name__)

__all__ = ["HostedTimeouts", "HostedTrack", "HostedStreamer", "HostedWorldModel"]

VIDEO_CLOCK_RATE = 90000
VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK_RATE)

DEFAULT_API_URL = "https://api.odyssey.ml"  # the SDK's default (dist/index.js L2)
TOKEN_REFRESH_MARGIN = 60.0  # the SDK re-exchanges its key this long before the token expires (L655-660)
SOCKET_RETRY_DELAYS = (1.0, 2.0, 2.0, 2.0, 2.0)  # the SDK's signalling retries before the socket opens
CHANNEL_MAX_MESSAGE = 16 * 1024  # the SDK's fallback data-channel limit; larger starts go over the socket
FALLBACK_ICE_SERVERS = [{"urls": "stun:stun.l.google.com:19302"}]  # the SDK's, when /config fails (L817)
TRACK_QUEUE_FRAMES = 4  # frames a slow consumer may fall behind before the oldest are dropped
DOWNLOAD_MAX_BYTES = 2 * 2**30  # a simulation video: 150 s even at 100 Mbit/s is under 2 GiB

# The SDK's wording for the signalling socket's `error` reasons (getErrorMessage, L1793-1801).
SOCKET_ERRORS = {
    "streamer_not_available": "Streamer not available.",
    "streamer_disconnected": "Streamer has disconnected.",
    "duration_limit_reached": "Connection exceeded maximum allowed duration.",
    "unknown": "An unknown error occurred.",
}

# interactive_stream_error reasons the relay has a code for: (code, status).
STREAM_ERROR_CODES = {
    "concurrent_limit_reached": ("CONCURRENT_LIMIT_REACHED", 429),
    "rate_limited": ("RATE_LIMITED", 429),
    "monthly_limit_reached": ("MONTHLY_LIMIT_REACHED", 429),
    "stream_already_active": ("STREAM_ALREADY_ACTIVE", 409),
    "no_active_stream": ("NO_ACTIVE_STREAM", 409),
    "invalid_request": ("INVALID_REQUEST", 422),
}


@dataclass(frozen=True)
class HostedTimeouts:
    """Every wait on the hosted API, in seconds (the SDK itself has no bound but the queue's)."""

    http: float = 15.0  # one HTTP call
    queue: float = 30.0  # /sessions/request answering 503 (no free streamer): polled every second
    connect: float = 30.0  # socket open -> offer -> peer connected, video track and channels there
    command: float = 15.0  # stream_started / update_acknowledged / stream_ended
    stall: float = 10.0  # a live stream without a frame for this long has failed
    close: float = 3.0  # sending client_disconnecting (the close handshake then has aiohttp's 10 s)
    simulation: float = 3600.0  # a submitted simulation job reaching completed, failed or cancelled
    simulation_poll: float = 1.0  # how often its status is read meanwhile
    download: float = 600.0  # fetching one of its videos


def upstream_error(message: str, *, status: int = 502, code: str = "UPSTREAM_ERROR",
                   action: str = "Retry; if it persists, check the hosted world model's status.",
                   details: dict[str, Any] | None = None, retry_after: float | None = None) -> RelayError:
    return RelayError(code, status, message, action=action, details=details, retry_after=retry_after)


def usage_error(data: Any, headers: Any) -> RelayError:
    """A hosted 429 (``detail {error|code, message, action, details}``) as the relay's 429, verbatim."""
    detail = data.get("detail", data) if isinstance(data, dict) else data
    retry_after: float | None = None
    try:
        retry_after = float(headers.get("Retry-After")) if headers.get("Retry-After") else None
    except (TypeError, ValueError):
        retry_after = None
    if isinstance(detail, dict) and ("error" in detail or "code" in detail) and "message" in detail:
        code = str(detail.get("error") or detail.get("code") or "RATE_LIMITED")
        details = detail.get("details") if isinstance(detail.get("details"), dict) else {}
        hint = details.get("retry_after_seconds")
        if retry_after is None and isinstance(hint, (int, float)) and not isinstance(hint, bool):
            retry_after = float(hint)
        return RelayError(code, 429, f"Hosted world model: {detail['message']}",
                          action=str(detail.get("action") or "Retry later."), details=details,
                          retry_after=retry_after if retry_after is not None else 5)
    text = detail if isinstance(detail, str) and detail else "Request limit exceeded"
    return RelayError("RATE_LIMITED", 429, f"Hosted world model: {text}", action="Retry later.",
                      retry_after=retry_after if retry_after is not None else 5)


def stream_error(message: dict[str, Any]) -> RelayError:
    """An ``interactive_stream_error {reason, message}`` as a RelayError the host can act on."""
    reason = message.get("reason")
    reason = reason if isinstance(reason, str) and reason else "unknown"
    text = message.get("message")
    text = text if isinstance(text, str) and text else "Stream error occurred"
    code, status = STREAM_ERROR_CODES.get(reason, ("UPSTREAM_ERROR", 502))
    return RelayError(code, status, f"Hosted world model: {text}", action="See the message; retry if it allows.",
                      details={"upstream_reason": reason}, retry_after=5 if status == 429 else None)


def _detail_text(data: Any) -> str:
    if isinstance(data, dict):
        detail = data.get("detail", data)
        if isinstance(detail, dict):
            detail = detail.get("message") or json.dumps(detail)
        return str(detail)
    return str(data or "").strip()[:300]


def _data_url(image: bytes) -> str:
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


def socket_url(signalling_url: str, session_id: str, token: str) -> str:
    """The SDK's normalizeUrl (L70-81) plus ``/client/{session_id}?token=`` (L92)."""
    url = signalling_url.rstrip("/")
    if url.startswith("https://"):
        url = "wss://" + url[len("https://"):]
    elif url.startswith("http://"):
        url = "ws://" + url[len("http://"):]
    elif not url.startswith(("ws://", "wss://")):
        url = "ws://" + url
    return f"{url}/client/{session_id}?token={quote(token, safe='')}"


def _ice_configuration(servers: Any) -> RTCConfiguration:
    """``{signalling_url}/config``'s iceServers; relay-only ICE when a ``turn:`` URL is there, as the SDK."""
    ice: list[RTCIceServer] = []
    turn = False
    for server in servers if isinstance(servers, list) else []:
        if not isinstance(server, dict):
            continue
        urls = server.get("urls")
        urls = [urls] if isinstance(urls, str) else [u for u in urls or [] if isinstance(u, str)]
        if not urls:
            continue
        turn = turn or any(u.startswith("turn:") for u in urls)
        ice.append(RTCIceServer(urls=urls, username=server.get("username"), credential=server.get("credential")))
    return RTCConfiguration(
        iceServers=ice,
        iceTransportPolicy=RTCIceTransportPolicy.RELAY if turn else RTCIceTransportPolicy.ALL,
        bundlePolicy=RTCBundlePolicy.MAX_BUNDLE,
    )


def _split_candidates(sdp: str) -> tuple[str, list[str], str]:
    """The answer without its candidates (as a browser's), the candidates, and the first m-line's mid."""
    kept, candidates, mid = [], [], None
    for line in sdp.splitlines():
        if line.startswith("a=candidate:"):
            if line[2:] not in candidates:  # with BUNDLE every m-line may repeat the same ones
                candidates.append(line[2:])
        elif line == "a=end-of-candidates":
            continue
        else:
            if mid is None and line.startswith("a=mid:"):
                mid = line[len("a=mid:"):]
            kept.append(line)
    return "\r\n".join(kept) + "\r\n", candidates, mid or "0"


# -- the track -------------------------------------------------------------------------------------

class HostedTrack(MediaStreamTrack):
    """One stream's video: the upstream's decoded frames while the stream is live, pts on our clock."""

    kind = "video"

    def __init__(self, stall_timeout: float = 10.0) -> None:
        super().__init__()
        self._stall = stall_timeout
        self._frames: deque = deque()
        self._wake = asyncio.Event()
        self.error: str | None = None
        self._start: float | None = None
        self._last_pts = -1
        self.received = 0
        self.dropped = 0

    def push(self, frame) -> None:
        if self.readyState != "live" or self.error is not None:
            return
        if len(self._frames) >= TRACK_QUEUE_FRAMES:
            self._frames.popleft()  # a slow consumer loses the oldest frame, never the newest
            self.dropped += 1
        self._frames.append(frame)
        self.received += 1
        self._wake.set()

    def fail(self, reason: str) -> None:
        """End this track: the consumer's next recv raises MediaStreamError (the stream failed upstream)."""
        if self.error is None:
            self.error = reason
            self._frames.clear()
            self._wake.set()

    async def recv(self):
        while True:
            if self.readyState != "live":
                raise MediaStreamError
            if self.error is not None:
                raise MediaStreamError(self.error)
            if self._frames:
                break
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self._stall)
            except asyncio.TimeoutError:
                self.fail(f"no video from the hosted world model for {self._stall:g} s")
        frame = self._frames.popleft()
        now = asyncio.get_running_loop().time()
        if self._start is None:
            self._start = now
        pts = max(round((now - self._start) * VIDEO_CLOCK_RATE), self._last_pts + 1)
        self._last_pts = pts
        frame.pts = pts
        frame.time_base = VIDEO_TIME_BASE
        return frame

    def stop(self) -> None:
        super().stop()
        self._frames.clear()
        self._wake.set()


# -- one upstream session --------------------------------------------------------------------------

class _Session:
    """One hosted session: its signalling socket, its peer connection and the tasks that serve them.

    It reports to its streamer (video frames, data-channel messages, a failure) and never outlives
    :meth:`close`, which is idempotent and shielded (a cancelled caller does not cut it short).
    """

    def __init__(self, model: "HostedWorldModel", streamer: "HostedStreamer") -> None:
        self.model = model
        self.streamer = streamer
        self.session_id: str | None = None
        self.image_to_video = False
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.pc: RTCPeerConnection | None = None
        self.video: MediaStreamTrack | None = None
        self.to_streamer = None  # clientToStreamer: commands go out on it
        self.from_streamer = None  # streamerToClient: events come in on it
        self.error: RelayError | None = None
        self.closing = False
        self._config: RTCConfiguration | None = None
        self._tasks: set[asyncio.Task] = set()
        self._wake = asyncio.Event()
        self._close_task: asyncio.Task | None = None
        self._reader: asyncio.Task | None = None

    @property
    def ready(self) -> bool:
        return (self.pc is not None and self.pc.connectionState == "connected" and self.video is not None
                and self.to_streamer is not None and self.to_streamer.readyState == "open"
                and self.from_streamer is not None)

    @property
    def usable(self) -> bool:
        return self.error is None and not self.closing

    def _spawn(self, coro, name: str) -> asyncio.Task | None:
        if self.closing:  # close() has gathered the tasks already: nothing new may start
            coro.close()
            return None
        task = asyncio.create_task(coro, name=f"hosted-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def open(self) -> None:
        model, timeouts = self.model, self.model.timeouts
        self.session_id, signalling_url, capabilities = await model.request_session()
        self._check_open()
        self.image_to_video = bool(capabilities.get("image_to_video"))
        token = await model.session_token(self.session_id)
        self._check_open()
        self._config = _ice_configuration(await model.ice_servers(signalling_url))
        ws = await model.open_socket(signalling_url, self.session_id, token)
        if self.closing:  # closed while the socket opened: close() did not see it
            await ws.close()
            self._check_open()
        self.ws = ws
        self._reader = self._spawn(self._read_socket(), "socket")
        self._spawn(self._keepalive(), "keepalive")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeouts.connect
        while not self.ready:
            self._check_open()
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise upstream_error(
                    f"The hosted world model's streamer did not connect within {timeouts.connect:g} s "
                    f"(session {self.session_id}, peer {self.pc.connectionState if self.pc else 'not offered'}).")
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), min(remaining, 0.5))
            except asyncio.TimeoutError:
                pass
        log.info("hosted: session %s ready", self.session_id)

    def _check_open(self) -> None:
        if self.error is not None:
            raise self.error
        if self.closing:
            raise upstream_error("The hosted session was closed while it opened.")

    def fail(self, error: RelayError) -> None:
        if self.error is not None or self.closing:
            return
        self.error = error
        self._wake.set()
        log.warning("hosted: session %s failed: %s", self.session_id, error.message)
        self.streamer._session_failed(self, error)

    # -- signalling --------------------------------------------------------------------------------

    async def _read_socket(self) -> None:
        ws = self.ws
        assert ws is not None
        try:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                try:
                    message = json.loads(msg.data)
                except ValueError:
                    continue
                if isinstance(message, dict):
                    await self._signal(message)
            code = ws.close_code
            self.fail(upstream_error(f"The hosted world model closed the signalling socket (code {code}).",
                                     details={"close_code": code}))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.fail(upstream_error(f"The hosted world model's signalling failed: {exc or type(exc).__name__}."))

    async def _signal(self, message: dict[str, Any]) -> None:
        if self.closing:
            return
        kind = message.get("type")
        if kind == protocol.OFFER:
            if self.pc is not None:  # the SDK would build a new peer; the relay does not renegotiate
                self.fail(upstream_error("The hosted world model sent a second offer "
                                         "(renegotiation is not supported)."))
                return
            sdp = message.get("sdp")
            if not isinstance(sdp, str):
                self.fail(upstream_error("The hosted world model sent an offer without SDP."))
                return
            await self._answer(sdp)
        elif kind == protocol.ICE_CANDIDATE:
            if self.pc is None or self.pc.remoteDescription is None:
                return  # as the SDK: candidates before the offer are dropped
            try:
                await self.pc.addIceCandidate(protocol.parse_candidate(message))
            except Exception as exc:  # one bad candidate is not worth the session
                log.info("hosted: candidate ignored: %s", exc)
        elif kind == protocol.ERROR:
            reason = message.get("reason")
            reason = reason if isinstance(reason, str) and reason else "unknown"
            text = SOCKET_ERRORS.get(reason, f"Server error: {reason}")
            self.fail(upstream_error(f"Hosted world model: {text}", details={"upstream_reason": reason}))
        # anything else (the SDK ignores unknown types): nothing to do

    async def _answer(self, offer_sdp: str) -> None:
        pc = self.pc = RTCPeerConnection(self._config)

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "video" and self.video is None:
                self.video = track
                self._spawn(self._pump(track), "video")
                self._wake.set()
            else:  # audio (if the streamer sends any) is not relayed, but aiortc queues it without bound
                self._spawn(self._drain(track), "drain")

        @pc.on("datachannel")
        def on_channel(channel) -> None:
            if channel.label == protocol.CLIENT_TO_STREAMER:
                self.to_streamer = channel
            elif channel.label == protocol.STREAMER_TO_CLIENT:
                self.from_streamer = channel
                channel.on("message", self._received)
            else:
                return

            @channel.on("close")
            def on_close() -> None:
                self.fail(upstream_error(f"The hosted world model closed the {channel.label} channel."))

            self._wake.set()

        @pc.on("connectionstatechange")
        def on_state() -> None:
            state = pc.connectionState
            if state in ("failed", "closed"):
                self.fail(upstream_error(f"The peer connection to the hosted world model {state}."))
            self._wake.set()

        try:
            await pc.setRemoteDescription(RTCSessionDescription(offer_sdp, "offer"))
            if self.video is None:
                raise ValueError("the offer has no video track")
            await pc.setLocalDescription(await pc.createAnswer())  # aiortc gathers every candidate here
        except Exception as exc:
            # e.g. a codec aiortc cannot decode (it has VP8 and H.264, no VP9 or AV1)
            self.fail(upstream_error(f"Cannot answer the hosted world model's offer: {exc or type(exc).__name__}."))
            return
        # As a browser: the answer without candidates, then each one trickled (the hosted streamer is
        # used to that), all on the first m-line (BUNDLE).
        answer, candidates, mid = _split_candidates(pc.localDescription.sdp)
        assert self.ws is not None
        await self.ws.send_json({"type": protocol.ANSWER, "sdp": answer})
        for line in candidates:
            candidate = candidate_from_sdp(line[len("candidate:"):])
            await self.ws.send_json(protocol.candidate_message(candidate, mid, 0))

    async def _keepalive(self) -> None:
        while True:
            await asyncio.sleep(protocol.KEEPALIVE_SECONDS)
            if self.ws is None or self.ws.closed:
                return
            try:
                await self.ws.send_json({"type": protocol.KEEPALIVE})
            except (ConnectionError, RuntimeError):
                return  # the reader sees the close

    async def send(self, message: dict[str, Any], *, via_socket: bool = False) -> None:
        """On clientToStreamer when open and small enough, else on the socket (as the SDK's start)."""
        if not self.usable:
            raise self.error or upstream_error("The hosted session is closed.")
        data = json.dumps(message)
        channel = self.to_streamer
        if not via_socket and channel is not None and channel.readyState == "open" \
                and len(data.encode()) <= CHANNEL_MAX_MESSAGE:
            channel.send(data)
            return
        if message.get("type") != protocol.STREAM_START:
            raise upstream_error("The hosted world model's command channel is not open.")
        assert self.ws is not None
        try:
            await self.ws.send_str(data)
        except (ConnectionError, RuntimeError) as exc:
            raise upstream_error(f"Cannot reach the hosted world model: {exc}.") from exc

    def _received(self, data: Any) -> None:
        if not isinstance(data, str) or not self.usable:
            return
        try:
            message = json.loads(data)
        except ValueError:
            return
        if isinstance(message, dict):
            self.streamer._event(self, message)

    async def _pump(self, track: MediaStreamTrack) -> None:
        """Drain the upstream video all along (aiortc queues without bound), handing it on while live."""
        try:
            while True:
                frame = await track.recv()
                self.streamer._frame(self, frame)
        except MediaStreamError:
            self.fail(upstream_error("The hosted world model's video track ended."))

    @staticmethod
    async def _drain(track: MediaStreamTrack) -> None:
        try:
            while True:
                await track.recv()
        except MediaStreamError:
            pass

    # -- teardown ----------------------------------------------------------------------------------

    async def close(self) -> None:
        if self._close_task is None:
            self.closing = True
            self._close_task = asyncio.create_task(self._close(), name="hosted-session-close")
            self.model._track_background(self._close_task)
        await asyncio.shield(self._close_task)

    async def _close(self) -> None:
        # Everything but the socket's reader: a receive() cancelled mid-wait makes aiohttp drop the
        # connection without a close handshake, and the upstream may then be cut off halfway through
        # releasing the session (aiohttp cancels a handler whose client went, when configured to).
        reader = self._reader
        tasks = [t for t in self._tasks if t is not reader]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        ws = self.ws
        if ws is not None and not ws.closed:
            try:  # what the SDK's cleanup() sends before it closes the socket (L1633-1642)
                await asyncio.wait_for(ws.send_json({"type": protocol.CLIENT_DISCONNECTING}),
                                       self.model.timeouts.close)
            except (asyncio.TimeoutError, ConnectionError, RuntimeError, aiohttp.ClientError):
                pass
        if self.pc is not None:
            await self.pc.close()
        if self.video is not None:
            self.video.stop()
        if ws is not None and not ws.closed:
            # The close handshake (1000 "Client disconnect", L191-197) finishes in the background: the
            # upstream answers it once it has released the session. Bounded by aiohttp's ws_close (10 s).
            self.model._track_background(asyncio.create_task(self._goodbye(ws, reader), name="hosted-socket-close"))
        elif reader is not None:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        log.info("hosted: session %s closed", self.session_id)

    @staticmethod
    async def _goodbye(ws: aiohttp.ClientWebSocketResponse, reader: asyncio.Task | None) -> None:
        try:
            await ws.close(code=1000, message=b"Client disconnect")  # ends the reader's receive() cleanly
        except (ConnectionError, RuntimeError, aiohttp.ClientError):
            pass
        finally:
            if reader is not None:
                if not reader.done():
                    reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)


# -- the streamer ----------------------------------------------------------------------------------

class HostedStreamer:
    """One relay connection's hold on the hosted API: one session at a time, one stream at a time."""

    def __init__(self, model: "HostedWorldModel") -> None:
        self._model = model
        self._session: _Session | None = None
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

    async def _ensure_session(self) -> _Session:
        """The live session, or a new one if there is none or it failed (the SDK's rule after an error)."""
        if self._disconnected:
            raise upstream_error("This hosted streamer is disconnected.")
        session = self._session
        if session is not None and session.usable:
            return session
        self._session = None
        if session is not None:
            await session.close()
        session = self._session = _Session(self._model, self)
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
                message["input_image_base64"] = _data_url(image)
            track = self._track = HostedTrack(self._model.timeouts.stall)
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
        self._model._streamers.discard(self)
        track, self._track = self._track, None
        if track is not None:
            track.stop()
        self._streaming = False
        self._reject_all(upstream_error("The hosted streamer was disconnected."))
        session, self._session = self._session, None  # a closed connection (kept for its streams' sake)
        if session is not None:                          # must not keep a peer connection alive
            await session.close()

    # -- plumbing ----------------------------------------------------------------------------------

    async def _command(self, session: _Session, message: dict[str, Any], kind: str, *,
                       via_socket: bool = False) -> dict[str, Any]:
        future = asyncio.get_running_loop().create_future()
        self._waiting[kind] = future
        timeout = self._model.timeouts.command
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

    def _event(self, session: _Session, message: dict[str, Any]) -> None:
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

    def _frame(self, session: _Session, frame) -> None:
        track = self._track
        if session is self._session and self._streaming and track is not None:
            track.push(frame)

    def _fail_track(self, reason: str) -> None:
        track = self._track
        if track is not None:
            track.fail(reason)

    def _session_failed(self, session: _Session, error: RelayError) -> None:
        if session is not self._session:
            return
        self._streaming = False
        self._reject_all(error)
        self._fail_track(error.message)
        # Closed at once (its socket, peer and tasks); the next start_stream requests a new session.
        self._model._track_background(asyncio.ensure_future(session.close()))


# -- the world model -------------------------------------------------------------------------------

class HostedWorldModel:
    """The hosted world-model API as a source: every ``connect()`` is one hosted session."""

    def __init__(self, url: str = DEFAULT_API_URL, api_key: str = "", width: int = 1280, height: int = 704,
                 fps: int = 25, *, api_key_env: str = "ODYSSEY_API_KEY",
                 timeouts: HostedTimeouts = HostedTimeouts()) -> None:
        if not api_key:
            raise ValueError(f"the hosted world model needs an API key (environment variable {api_key_env})")
        self.url = url.rstrip("/")  # the SDK concatenates paths: no trailing slash
        self.api_key = api_key
        self.api_key_env = api_key_env
        self.width, self.height, self.fps = width, height, fps
        self.timeouts = timeouts
        self._http: aiohttp.ClientSession | None = None
        self._token: str | None = None
        self._token_expiry = 0.0
        self._token_lock = asyncio.Lock()
        self._streamers: set[HostedStreamer] = set()
        self._background: set[asyncio.Task] = set()
        self.closed = False

    @property
    def streamers(self) -> set[HostedStreamer]:
        return set(self._streamers)

    async def connect(self) -> HostedStreamer:
        if self.closed:
            raise RelayError("STREAMER_NOT_AVAILABLE", 503, "The relay is shutting down.", action="Retry shortly.",
                             retry_after=5)
        streamer = HostedStreamer(self)
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
        if self._http is not None:
            http, self._http = self._http, None
            await http.close()

    def _track_background(self, task: asyncio.Future) -> None:
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- HTTP ----------------------------------------------------------------------------------------

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            # No session-wide total: the signalling socket lives as long as the connection. Each HTTP
            # call and the socket's handshake carry their own bound.
            self._http = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeouts.http))
        return self._http

    async def _call(self, method: str, url: str, body: Any = None, *, auth: bool = True) -> tuple[int, Any, Any]:
        headers = {}
        if auth:
            headers["Authorization"] = f"Bearer {await self.access_token()}"
        try:
            async with self._session().request(method, url, json=body, headers=headers,
                                               timeout=aiohttp.ClientTimeout(total=self.timeouts.http)) as response:
                text = await response.text()
                try:
                    data = json.loads(text) if text else None
                except ValueError:
                    data = text
                return response.status, data, response.headers
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise upstream_error(f"The hosted world model at {self.url} cannot be reached: "
                                 f"{exc or type(exc).__name__}.") from exc

    async def access_token(self) -> str:
        """``POST /auth/token {api_key}``, kept until 60 s before it expires."""
        async with self._token_lock:
            if self._token is not None and time.monotonic() < self._token_expiry - TOKEN_REFRESH_MARGIN:
                return self._token
            status, data, _ = await self._call("POST", self.url + "/auth/token", {"api_key": self.api_key},
                                               auth=False)
            if status in (401, 403, 422):
                # The SDK's words: 401 "Invalid API key", 403 the detail, 422 the key's format.
                text = {401: "Invalid API key", 422: "Invalid API key format"}.get(status) or \
                    (_detail_text(data) or "API key access denied")
                raise upstream_error(
                    f"The hosted world model refused the relay's API key (environment variable "
                    f"{self.api_key_env}): {text}.",
                    action=f"The relay's operator must set {self.api_key_env} to a valid key of the hosted "
                           "API and restart the relay.",
                    details={"upstream_status": status})
            token = data.get("access_token") if isinstance(data, dict) else None
            if status != 200 or not isinstance(token, str) or not token:
                raise upstream_error(f"The hosted world model's authentication failed: {status} "
                                     f"{_detail_text(data)}".rstrip() + ".", details={"upstream_status": status})
            expires_in = data.get("expires_in")
            lifetime = float(expires_in) if isinstance(expires_in, (int, float)) and not isinstance(expires_in, bool) \
                else 0.0  # unknown: exchanged again before every call, as the SDK ends up doing
            self._token, self._token_expiry = token, time.monotonic() + lifetime
            return token

    async def request_session(self) -> tuple[str, str, dict[str, Any]]:
        """``POST /sessions/request``: (session_id, signalling_url, capabilities); 503 is polled."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeouts.queue
        while True:
            status, data, headers = await self._authorized("POST", self.url + "/sessions/request", {})
            if status == 200 and isinstance(data, dict):
                session_id, signalling = data.get("session_id"), data.get("signalling_url")
                if not (isinstance(session_id, str) and session_id and isinstance(signalling, str) and signalling):
                    raise upstream_error("The hosted world model's session has no session_id or signalling_url.")
                capabilities = data.get("capabilities")
                return session_id, signalling, capabilities if isinstance(capabilities, dict) else {}
            if status == 503:
                if loop.time() + 1.0 > deadline:
                    raise RelayError(
                        "STREAMER_NOT_AVAILABLE", 503,
                        f"The hosted world model has no free streamer (waited {self.timeouts.queue:g} s).",
                        action="Retry shortly.", details={"upstream_status": 503}, retry_after=5)
                await asyncio.sleep(1.0)  # the SDK's queue: one attempt a second
                continue
            if status == 429:
                raise usage_error(data, headers)
            raise upstream_error(f"The hosted world model refused a session: {status} {_detail_text(data)}".rstrip()
                                 + ".", details={"upstream_status": status})

    # -- simulations (relay/simjob.py runs them in a worker process) -------------------------------

    async def simulate(self, scripts: list[list[dict[str, Any]]], portrait: bool) -> str:
        """``POST /simulation-jobs``: the hosted job's id. One script goes as ``script``, more as
        ``scripts`` (the SDK's two shapes); its usage 429 stays the hosted usage error."""
        body: dict[str, Any] = {"portrait": portrait, "output_video": True}
        if len(scripts) == 1:
            body["script"] = scripts[0]
        else:
            body["scripts"] = scripts
        status, data, headers = await self._authorized("POST", self.url + "/simulation-jobs", body)
        if status == 429:
            raise usage_error(data, headers)
        job_id = data.get("job_id") if isinstance(data, dict) else None
        if status not in (200, 201, 202) or not isinstance(job_id, str) or not job_id:
            raise upstream_error(f"The hosted world model refused the simulation: {status} {_detail_text(data)}"
                                 .rstrip() + ".", details={"upstream_status": status})
        return job_id

    async def finished_simulation(self, job_id: str) -> dict[str, Any]:
        """Polls ``GET /simulation-jobs/{id}`` until it is completed, failed or cancelled (bounded by
        ``timeouts.simulation``); returns that job. A network error or a 5xx on the way is waited
        out (backing off to 30 s) rather than failing an hour-long job; a 4xx is final."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeouts.simulation
        url = self._job_url(job_id)
        delay = self.timeouts.simulation_poll
        while True:
            try:
                status, data, _ = await self._authorized("GET", url)
            except RelayError as exc:  # unreachable for a moment
                status, data = 0, str(exc)
            if status == 200 and isinstance(data, dict):
                if data.get("status") in ("completed", "failed", "cancelled"):
                    return data
                delay = self.timeouts.simulation_poll
            elif 400 <= status < 500:
                raise upstream_error(f"The hosted world model lost simulation {job_id}: {status} "
                                     f"{_detail_text(data)}".rstrip() + ".", details={"upstream_status": status})
            else:
                delay = min(30.0, delay * 2)
                log.warning("hosted simulation %s: status read failed (%s), retrying in %g s", job_id,
                            status or data, delay)
            if loop.time() + delay > deadline:
                raise upstream_error(f"The hosted simulation {job_id} did not finish within "
                                     f"{self.timeouts.simulation:g} s.")
            await asyncio.sleep(delay)

    async def cancel_simulation(self, job_id: str) -> None:
        """Best effort: a job this relay gave up on should not go on costing (only pending or
        dispatched ones can be cancelled upstream; anything else is ignored)."""
        try:
            await self._authorized("DELETE", self._job_url(job_id))
        except RelayError:
            pass

    def _job_url(self, job_id: str) -> str:
        return f"{self.url}/simulation-jobs/{quote(job_id, safe='')}"

    async def download(self, url: str, path: str, max_bytes: int = DOWNLOAD_MAX_BYTES) -> None:
        """One of a finished job's files, by its presigned URL (no Authorization: the URL is the
        capability), streamed to ``path``, at most ``max_bytes``."""
        try:
            async with self._session().get(url, timeout=aiohttp.ClientTimeout(total=self.timeouts.download)) as r:
                if r.status != 200:
                    raise upstream_error(f"The hosted world model's video could not be fetched: {r.status}.",
                                         details={"upstream_status": r.status})
                size = 0
                with open(path, "wb") as out:
                    async for chunk in r.content.iter_chunked(256 * 1024):
                        size += len(chunk)
                        if size > max_bytes:
                            raise upstream_error(f"The hosted world model's video is larger than "
                                                 f"{max_bytes // 2**20} MiB.")
                        out.write(chunk)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise upstream_error(f"The hosted world model's video could not be fetched: "
                                 f"{exc or type(exc).__name__}.") from exc

    async def _authorized(self, method: str, url: str, body: Any = None) -> tuple[int, Any, Any]:
        """An authorized call; a 401 (a token revoked early) exchanges the key once more and retries."""
        status, data, headers = await self._call(method, url, body)
        if status == 401:
            self._token = None
            status, data, headers = await self._call(method, url, body)
        return status, data, headers

    async def session_token(self, session_id: str) -> str:
        status, data, _ = await self._call("POST", self.url + "/sessions/token", {"session_id": session_id})
        token = data.get("session_token") if isinstance(data, dict) else None
        if status != 200 or not isinstance(token, str) or not token:
            raise upstream_error(f"The hosted world model gave no session token: {status} {_detail_text(data)}"
                                 .rstrip() + ".", details={"upstream_status": status})
        return token

    async def ice_servers(self, signalling_url: str) -> Any:
        """``GET {signalling_url}/config`` (no auth); the SDK's STUN fallback when it fails (L808-820)."""
        url = re.sub(r"^wss:", "https:", re.sub(r"^ws:", "http:", signalling_url.rstrip("/"))) + "/config"
        try:
            status, data, _ = await self._call("GET", url, auth=False)
        except RelayError:
            return FALLBACK_ICE_SERVERS
        servers = data.get("iceServers") if isinstance(data, dict) else None
        return servers if isinstance(servers, list) else FALLBACK_ICE_SERVERS

    async def open_socket(self, signalling_url: str, session_id: str, token: str) -> aiohttp.ClientWebSocketResponse:
        """The signalling socket, retried as the SDK does while it has not opened (a 4xx is final here)."""
        url = socket_url(signalling_url, session_id, token)
        attempt = 0
        while True:
            try:
                return await asyncio.wait_for(
                    self._session().ws_connect(url, autoping=True, max_msg_size=16 * 1024 * 1024), self.timeouts.http)
            except aiohttp.WSServerHandshakeError as exc:
                if 400 <= exc.status < 500:
                    raise upstream_error(f"The hosted world model refused the signalling socket: {exc.status} "
                                         f"{exc.message}.", details={"upstream_status": exc.status}) from exc
                error: Exception = exc
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                error = exc
            if attempt >= len(SOCKET_RETRY_DELAYS):
                raise upstream_error(f"The hosted world model's signalling socket did not open: "
                                     f"{error or type(error).__name__}.") from error
            await asyncio.sleep(SOCKET_RETRY_DELAYS[attempt])
            attempt += 1
