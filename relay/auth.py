"""Who may do what: API keys (host apps), client tokens (one connection, from a browser),
spectator tokens (one broadcast).  Plain functions over tokens; no HTTP in here."""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from .errors import forbidden, unauthorized


def is_api_key(token: str | None, api_keys: Iterable[str]) -> bool:
    if not token:
        return False
    # Compare against every key so the time taken does not tell which prefix matched.
    return any([hmac.compare_digest(token.encode(), key.encode()) for key in api_keys])


def require_api_key(token: str | None, api_keys: Iterable[str]) -> str:
    if not is_api_key(token, api_keys):
        raise unauthorized("A valid API key is required.")
    assert token is not None
    return token


def check_owner(token: str | None, owner_key: str, client_token: str | None, api_keys: Iterable[str]) -> None:
    """The owner's API key, or the connection's own client_token, may act on it."""
    if token and client_token and hmac.compare_digest(token.encode(), client_token.encode()):
        return
    if is_api_key(token, api_keys):
        if not hmac.compare_digest(token.encode(), owner_key.encode()):  # type: ignore[union-attr]
            raise forbidden("This connection belongs to another API key.")
        return
    raise unauthorized("A valid API key or this connection's client_token is required.")


def check_spectator(token: str | None, spectator_token: str) -> None:
    if not token or not hmac.compare_digest(token.encode(), spectator_token.encode()):
        raise unauthorized("A valid spectator token is required (Authorization: Bearer or ?token=).")
