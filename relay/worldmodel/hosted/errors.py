"""The hosted API's failures as the relay's one error type, in the SDK's own words."""

from __future__ import annotations

import json
from typing import Any

from ...errors import RelayError

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


def detail_text(data: Any) -> str:
    if isinstance(data, dict):
        detail = data.get("detail", data)
        if isinstance(detail, dict):
            detail = detail.get("message") or json.dumps(detail)
        return str(detail)
    return str(data or "").strip()[:300]

