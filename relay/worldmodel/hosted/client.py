"""The hosted API's REST side: its key exchanged for tokens, sessions requested, simulation jobs
submitted, polled and downloaded, the signalling socket opened. One aiohttp session per client.

Used by the streamer's sessions (worldmodel/hosted/session.py) and, alone, by a simulation worker
(relay/simulations/worker.py), which needs no WebRTC at all.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp

from ...errors import RelayError
from .errors import detail_text, upstream_error, usage_error

log = logging.getLogger(__name__)

DEFAULT_API_URL = "https://api.odyssey.ml"  # the SDK's default (dist/index.js L2)
TOKEN_REFRESH_MARGIN = 60.0  # the SDK re-exchanges its key this long before the token expires (L655-660)
SOCKET_RETRY_DELAYS = (1.0, 2.0, 2.0, 2.0, 2.0)  # the SDK's signalling retries before the socket opens
FALLBACK_ICE_SERVERS = [{"urls": "stun:stun.l.google.com:19302"}]  # the SDK's, when /config fails (L817)
DOWNLOAD_MAX_BYTES = 2 * 2**30  # a simulation video: 150 s even at 100 Mbit/s is under 2 GiB


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


class HostedClient:
    """The hosted API's HTTP calls for one API key; ``close()`` releases its connection pool."""

    def __init__(self, url: str = DEFAULT_API_URL, api_key: str = "", *, api_key_env: str = "ODYSSEY_API_KEY",
                 timeouts: HostedTimeouts = HostedTimeouts()) -> None:
        if not api_key:
            raise ValueError(f"the hosted world model needs an API key (environment variable {api_key_env})")
        self.url = url.rstrip("/")  # the SDK concatenates paths: no trailing slash
        self.api_key = api_key
        self.api_key_env = api_key_env
        self.timeouts = timeouts
        self._http: aiohttp.ClientSession | None = None
        self._token: str | None = None
        self._token_expiry = 0.0
        self._token_lock = asyncio.Lock()

    async def close(self) -> None:
        if self._http is not None:
            http, self._http = self._http, None
            await http.close()

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
                    (detail_text(data) or "API key access denied")
                raise upstream_error(
                    f"The hosted world model refused the relay's API key (environment variable "
                    f"{self.api_key_env}): {text}.",
                    action=f"The relay's operator must set {self.api_key_env} to a valid key of the hosted "
                           "API and restart the relay.",
                    details={"upstream_status": status})
            token = data.get("access_token") if isinstance(data, dict) else None
            if status != 200 or not isinstance(token, str) or not token:
                raise upstream_error(f"The hosted world model's authentication failed: {status} "
                                     f"{detail_text(data)}".rstrip() + ".", details={"upstream_status": status})
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
            raise upstream_error(f"The hosted world model refused a session: {status} {detail_text(data)}".rstrip()
                                 + ".", details={"upstream_status": status})

    # -- simulations (relay/simulations/worker.py runs them in a worker process) --------------------

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
            raise upstream_error(f"The hosted world model refused the simulation: {status} {detail_text(data)}"
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
                                     f"{detail_text(data)}".rstrip() + ".", details={"upstream_status": status})
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
            raise upstream_error(f"The hosted world model gave no session token: {status} {detail_text(data)}"
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
