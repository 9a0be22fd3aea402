"""The one error type, rendered one way everywhere (REST bodies, control and events sockets)."""

from __future__ import annotations

import math
from typing import Any


class RelayError(Exception):
    """A failure a client can act on: code, HTTP status, message, action, details."""

    def __init__(
        self,
        code: str,
        status: int,
        message: str,
        *,
        action: str = "",
        details: dict[str, Any] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.message = message
        self.action = action
        self.details = details or {}
        self.retry_after = retry_after

    def __reduce__(self):
        # Picklable, so a simulation worker's error crosses the process pool intact (the default
        # reduce passes only the message and would break the pool on the way back).
        return _rebuild, (self.code, self.status, self.message, self.action, self.details, self.retry_after)

    def to_dict(self) -> dict[str, Any]:
        return {
            "error": {
                "code": self.code,
                "message": self.message,
                "action": self.action,
                "details": self.details,
            }
        }

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}

    def __repr__(self) -> str:
        return f"RelayError({self.code}, {self.status}, {self.message!r})"


# Constructors for the codes docs/api.md names, so the wording stays consistent.


def unauthorized(message: str = "Missing or invalid credentials.") -> RelayError:
    return RelayError(
        "UNAUTHORIZED", 401, message, action="Send 'Authorization: Bearer <token>' with a valid token."
    )


def forbidden(message: str) -> RelayError:
    return RelayError("FORBIDDEN", 403, message, action="Use the credentials that own this resource.")


def not_found(what: str, ident: str) -> RelayError:
    return RelayError(
        "NOT_FOUND", 404, f"No {what} with id {ident!r}.", action="Check the id.", details={what + "_id": ident}
    )


def invalid_request(message: str, **details: Any) -> RelayError:
    return RelayError("INVALID_REQUEST", 400, message, action="Fix the request and retry.", details=details)


def unprocessable(message: str, **details: Any) -> RelayError:
    return RelayError("INVALID_REQUEST", 422, message, action="Fix the request and retry.", details=details)


def too_large(limit: int) -> RelayError:
    return RelayError(
        "INVALID_REQUEST",
        413,
        f"Request body exceeds {limit} bytes.",
        action="Send a smaller body.",
        details={"limit_bytes": limit},
    )


def unsupported_media_type(expected: str) -> RelayError:
    return RelayError(
        "INVALID_REQUEST",
        415,
        f"Expected Content-Type {expected}.",
        action=f"Send the body as {expected}.",
        details={"expected": expected},
    )


def insufficient_storage(what: str) -> RelayError:
    """The relay's disk (or its database) is full: 507, nothing was stored."""
    return RelayError(
        "INSUFFICIENT_STORAGE",
        507,
        f"The relay's storage is full: {what}.",
        action="Nothing was stored. Retry later; the operator needs to free disk space.",
    )


def cluster_unavailable(retry_after: float = 2.0) -> RelayError:
    """503 when a call needs the cluster's shared state (Redis) and it cannot be reached: fail fast, retry."""
    return RelayError("CLUSTER_UNAVAILABLE", 503, "The cluster's shared state (Redis) cannot be reached.",
                      action="Retry shortly; streams already running go on.", retry_after=retry_after)


def cluster_busy(retry_after: float = 1.0) -> RelayError:
    """503 when every connection this node has to Redis stayed busy for a beat: Redis is there, the burst too big."""
    return RelayError("CLUSTER_BUSY", 503, "This node's connections to the cluster's shared state are all busy.",
                      action="Retry in a moment.", retry_after=retry_after)


def _rebuild(code: str, status: int, message: str, action: str, details: dict[str, Any],
             retry_after: float | None) -> RelayError:
    return RelayError(code, status, message, action=action, details=details, retry_after=retry_after)
