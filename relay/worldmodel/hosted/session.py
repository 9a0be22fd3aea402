"""One hosted session: its signalling socket, its peer connection and the tasks that serve them.

The relay is the client here, as a browser running the SDK would be: it answers the streamer's
offer, trickles its candidates, keeps the socket alive and sends commands on ``clientToStreamer``.
Everything the session hears goes to its streamer (frames, data-channel events, a failure).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Callable, Protocol

import aiohttp
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtcconfiguration import RTCBundlePolicy, RTCIceTransportPolicy
from aiortc.sdp import candidate_from_sdp

from ...errors import RelayError
from .. import hosted_protocol as protocol
from .client import HostedClient
from .errors import SOCKET_ERRORS, upstream_error


log = logging.getLogger(__name__)

CHANNEL_MAX_MESSAGE = 16 * 1024  # the SDK's fallback data-channel limit; larger starts go over the socket


def ice_configuration(servers: Any) -> RTCConfiguration:
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


def split_candidates(sdp: str) -> tuple[str, list[str], str]:
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




class SessionListener(Protocol):
    """Who hears a session (its streamer): the streamerToClient events, the video, a failure."""

    def on_event(self, session: HostedSession, message: dict[str, Any]) -> None: ...

    def on_frame(self, session: HostedSession, frame: Any) -> None: ...

    def session_failed(self, session: HostedSession, error: RelayError) -> None: ...


class HostedSession:
    """One hosted session: its signalling socket, its peer connection and the tasks that serve them.

    It reports to its streamer (video frames, data-channel messages, a failure) and never outlives
    :meth:`close`, which is idempotent and shielded (a cancelled caller does not cut it short).
    """

    def __init__(self, client: HostedClient, listener: SessionListener,
                 track_background: Callable[[asyncio.Future], None]) -> None:
        self.client = client
        self.listener = listener
        self._track_background = track_background  # the model's: its close() waits for these
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
        client, timeouts = self.client, self.client.timeouts
        self.session_id, signalling_url, capabilities = await client.request_session()
        self._check_open()
        self.image_to_video = bool(capabilities.get("image_to_video"))
        token = await client.session_token(self.session_id)
        self._check_open()
        self._config = ice_configuration(await client.ice_servers(signalling_url))
        ws = await client.open_socket(signalling_url, self.session_id, token)
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
        self.listener.session_failed(self, error)

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
        answer, candidates, mid = split_candidates(pc.localDescription.sdp)
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
            self.listener.on_event(self, message)

    async def _pump(self, track: MediaStreamTrack) -> None:
        """Drain the upstream video all along (aiortc queues without bound), handing it on while live."""
        try:
            while True:
                frame = await track.recv()
                self.listener.on_frame(self, frame)
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
            self._track_background(self._close_task)
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
                                       self.client.timeouts.close)
            except (asyncio.TimeoutError, ConnectionError, RuntimeError, aiohttp.ClientError):
                pass
        if self.pc is not None:
            await self.pc.close()
        if self.video is not None:
            self.video.stop()
        if ws is not None and not ws.closed:
            # The close handshake (1000 "Client disconnect", L191-197) finishes in the background: the
            # upstream answers it once it has released the session. Bounded by aiohttp's ws_close (10 s).
            self._track_background(asyncio.create_task(self._goodbye(ws, reader), name="hosted-socket-close"))
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
