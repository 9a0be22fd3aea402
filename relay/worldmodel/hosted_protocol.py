"""Shapes of the hosted world-model API, shared by the relay's twin of it (server side) and a client of it.

Here, beside the hosted client (relay/worldmodel/hosted/) rather than in either side's folder: the protocol
is the hosted API's, not the twin's, and the core (the client) must not import from an adapter (relay/odyssey).

Everything here follows `@odysseyml/odyssey` 1.3.1 (npm, MIT; `dist/index.js`, the version pinned and read):
the REST bodies, the signalling socket's messages, the data channels' messages and the error shapes.
Line references (``L…``) are to that file. No HTTP and no WebRTC in here: plain functions and constants.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from typing import Any

from aiortc import RTCIceCandidate
from aiortc.sdp import candidate_from_sdp, candidate_to_sdp

from ..errors import RelayError, invalid_request

SDK_PACKAGE = "@odysseyml/odyssey"
SDK_VERSION = "1.3.1"  # the version whose dist/index.js this module follows

# The two data channels the streamer creates before its offer (the SDK routes by label, L1749-1762).
CLIENT_TO_STREAMER = "clientToStreamer"
STREAMER_TO_CLIENT = "streamerToClient"

ACCESS_TOKEN_SECONDS = 3600  # the SDK re-exchanges its API key 60 s before this runs out (L655-660)
KEEPALIVE_SECONDS = 10  # the SDK's signalling keepalive interval (L48)

# Signalling socket, streamer -> SDK (only these three types are read, L1486-1515).
OFFER = "offer"
ICE_CANDIDATE = "ice_candidate"
ERROR = "error"
INVALID_MESSAGE = "invalid_message"  # the relay's own: the SDK ignores it (an unreadable message was dropped)
# Signalling socket, SDK -> streamer.
ANSWER = "answer"
KEEPALIVE = "keepalive"
CLIENT_DISCONNECTING = "client_disconnecting"
# Data channel clientToStreamer (interactive_stream_start may also come over the socket, L1347-1372).
STREAM_START = "interactive_stream_start"
UPDATE = "update"
STREAM_END = "interactive_stream_end"
# Data channel streamerToClient (L1827-1902).
STREAM_STARTED = "stream_started"
BROADCAST_READY = "broadcast_ready"
UPDATE_ACKNOWLEDGED = "update_acknowledged"
STREAM_ENDED = "stream_ended"
STREAM_ERROR = "interactive_stream_error"

# How the relay's stream end reasons reach the SDK: those that are failures come as an
# interactive_stream_error first (reason, message), then stream_ended like every end.
STREAM_END_ERRORS = {
    "duration_limit": ("stream_duration_exceeded", "The stream reached its maximum duration."),
    "upstream_error": ("upstream_error", "The world model failed; the stream has ended."),
}

# How the relay's connection close reasons reach the SDK: a signalling `error` (the only way the
# SDK reports a server-side end, L1496-1515). The first two have the SDK's own wording.
CONNECTION_CLOSE_REASONS = {
    "expired": "duration_limit_reached",  # "Connection exceeded maximum allowed duration."
    "shutdown": "streamer_disconnected",  # "Streamer has disconnected."
    "disconnected": "streamer_disconnected",
    "idle_timeout": "idle_timeout",
}


# -- tokens ---------------------------------------------------------------------------------------

def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


_JWT_HEADER = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())


def jwt_encode(claims: dict[str, Any], secret: bytes) -> str:
    """An HS256 JWT. The SDK decodes the session token's payload for its `session_id` claim (L395-416)."""
    payload = _b64url(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
    signing_input = f"{_JWT_HEADER}.{payload}".encode()
    signature = _b64url(hmac.new(secret, signing_input, hashlib.sha256).digest())
    return f"{_JWT_HEADER}.{payload}.{signature}"


def jwt_decode(token: str | None, secret: bytes, *, now: float, typ: str) -> dict[str, Any] | None:
    """The claims of an untampered, unexpired HS256 token of kind ``typ``; None otherwise."""
    if not token or token.count(".") != 2:
        return None
    header, payload, signature = token.split(".")
    expected = _b64url(hmac.new(secret, f"{header}.{payload}".encode(), hashlib.sha256).digest())
    if header != _JWT_HEADER or not hmac.compare_digest(expected.encode(), signature.encode()):
        return None
    try:
        claims = json.loads(_unb64url(payload))
    except (ValueError, binascii.Error):
        return None
    if not isinstance(claims, dict) or claims.get("typ") != typ:
        return None
    exp = claims.get("exp")
    if not isinstance(exp, (int, float)) or now >= exp:
        return None
    return claims


def session_id_of(token: str) -> str | None:
    """What the SDK's `extractSessionId` reads from a session token (no signature check)."""
    try:
        claims = json.loads(_unb64url(token.split(".")[1]))
    except (IndexError, ValueError, binascii.Error):
        return None
    value = claims.get("session_id") if isinstance(claims, dict) else None
    return value if isinstance(value, str) else None


# -- errors ---------------------------------------------------------------------------------------

def error_body(err: RelayError) -> dict[str, Any]:
    """The hosted API's error shape (FastAPI style: everything under ``detail``).

    A 429 is a *usage error*: the SDK unwraps ``detail`` and, when it has ``error``/``code``, ``message``
    and ``action``, throws its class for the code (ConcurrentLimitReachedError, ...; L380-392, L849-854).
    It reads ``error`` (the hosted broker's key) or ``code``: both are sent. Every other status carries a
    string ``detail`` (the SDK shows it as is for 403 on /auth/token and 400 on a cancel), plus the code.
    """
    if err.status == 429:
        return {"detail": {"error": err.code, "code": err.code, "message": err.message, "action": err.action,
                           "details": err.details}}
    return {"detail": err.message, "code": err.code, "action": err.action, "details": err.details}


def invalid_message(err: RelayError) -> dict[str, Any]:
    """The signalling socket's answer to a message it cannot read (not JSON, too deep): a type the SDK
    ignores, unlike `error`, which would end its session."""
    return {"type": INVALID_MESSAGE, "code": err.code, "message": err.message, "details": err.details}


def stream_error(reason: str, message: str) -> dict[str, Any]:
    return {"type": STREAM_ERROR, "reason": reason, "message": message}


def stream_error_from(err: RelayError) -> dict[str, Any]:
    """A refused start/update as the SDK meets it: `interactive_stream_error {reason, message}`."""
    error = stream_error(err.code.lower(), err.message)
    if err.retry_after is not None:  # RATE_LIMITED: when the SDK may send again
        error["retry_after"] = round(err.retry_after, 2)
    return error


# -- messages -------------------------------------------------------------------------------------

def parse_stream_start(message: dict[str, Any]) -> tuple[Any, bytes | None, bool, bool]:
    """`interactive_stream_start {prompt, portrait, broadcast, input_image_base64?}`.

    Returns (prompt, image bytes or None, portrait, broadcast).

    The SDK's defaults are portrait true and broadcast false (L1317); the image is a data: URL.
    The prompt is checked by the core (relay.sessions.check_prompt).
    """
    portrait = message.get("portrait", True)
    broadcast = message.get("broadcast", False)
    for name, value in (("portrait", portrait), ("broadcast", broadcast)):
        if not isinstance(value, bool):
            raise invalid_request(f"'{name}' must be true or false.", field=name)
    image = message.get("input_image_base64")
    if image is not None:
        if not isinstance(image, str):
            raise invalid_request("'input_image_base64' must be a base64 string or data: URL.",
                                  field="input_image_base64")
        try:
            image = base64.b64decode(image.split(",", 1)[-1], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise invalid_request("'input_image_base64' is not valid base64.", field="input_image_base64") from exc
    return message.get("prompt"), image, portrait, broadcast


def candidate_message(candidate: RTCIceCandidate, sdp_mid: str | None, sdp_mline_index: int | None) -> dict[str, Any]:
    """An `ice_candidate` as the SDK sends and takes it: the browser's `candidate:…` string."""
    return {"type": ICE_CANDIDATE, "candidate": "candidate:" + candidate_to_sdp(candidate),
            "sdpMid": sdp_mid, "sdpMLineIndex": sdp_mline_index}


def parse_candidate(message: dict[str, Any]) -> RTCIceCandidate | None:
    """The aiortc candidate of an `ice_candidate` message; None for an empty one (end of candidates).

    ValueError for one that cannot be parsed.
    """
    text = message.get("candidate")
    if text is None or text == "":
        return None
    if not isinstance(text, str):
        raise ValueError("'candidate' must be a string")
    text = text.strip()
    if text.startswith("a="):
        text = text[2:]
    if text.startswith("candidate:"):
        text = text[len("candidate:"):]
    try:
        candidate = candidate_from_sdp(text)
    except (IndexError, ValueError) as exc:
        raise ValueError(f"malformed candidate {text!r}") from exc
    mid = message.get("sdpMid")
    index = message.get("sdpMLineIndex")
    candidate.sdpMid = mid if isinstance(mid, str) else None
    candidate.sdpMLineIndex = index if isinstance(index, int) and not isinstance(index, bool) else None
    if candidate.sdpMid is None and candidate.sdpMLineIndex is None:
        candidate.sdpMLineIndex = 0  # BUNDLE: everything rides on the first m-line
    return candidate
