"""Channels: a watch link that lasts.

A channel is created once by a host (an API key) and names one broadcast for good: its broadcast_id and
spectator token are minted with the channel and kept in data_dir/channels.json, so the watch URL a host
shared before the event still plays after any number of connections, streams and relay restarts. The
connections opened on the channel come and go; the broadcast they stream into does not.

The store knows no HTTP: it validates, bounds and keeps the records (one JSON file, replaced atomically
under a lock, so a crash leaves the old list or the new one). Calls that write block on the disk: the
adapters run them in a thread.
"""

from __future__ import annotations

import errno
import json
import logging
import re
import secrets
import threading
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from .clock import iso
from .errors import RelayError, insufficient_storage, not_found, unprocessable
from .inputs import check_text
from .media.recorder import write_json_atomic

log = logging.getLogger(__name__)

CHANNELS_FILE = "channels.json"
MAX_TITLE_CHARS = 120
MAX_DESCRIPTION_CHARS = 1000
MAX_HOST_NAME_CHARS = 80
# A slug goes into links and logs: lowercase letters, digits and inner hyphens, 2 to 48 characters.
SLUG = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,46}[a-z0-9])")


@dataclass(frozen=True)
class Channel:
    channel_id: str
    owner: str  # a hash of the API key (recordings.owner_id), never the key itself
    title: str
    description: str | None
    slug: str | None
    host_name: str | None
    broadcast_id: str
    spectator_token: str
    created_at: float  # wall clock

    def to_dict(self) -> dict[str, Any]:
        """The public part (the broadcast's links are added by the adapter, which knows the base URL)."""
        return {"channel_id": self.channel_id, "title": self.title, "description": self.description,
                "slug": self.slug, "host_name": self.host_name, "created_at": iso(self.created_at)}


def channel_in_use(channel: Channel, connection_id: str) -> RelayError:
    return RelayError(
        "CHANNEL_IN_USE", 409, "This channel already has an open connection: one host at a time.",
        action="Close the other connection first (DELETE /v1/connections/{id}), or wait for it to expire.",
        details={"channel_id": channel.channel_id, "connection_id": connection_id})


def slug_taken(slug: str) -> RelayError:
    return RelayError("SLUG_TAKEN", 409, f"You already have a channel with slug {slug!r}.",
                      action="Choose another slug, or use that channel.", details={"slug": slug})


class ChannelStore:
    def __init__(self, data_dir: str | Path, per_owner: int) -> None:
        self._path = Path(data_dir) / CHANNELS_FILE
        self._per_owner = per_owner
        self._lock = threading.Lock()  # one writer at a time: the limit and the slug check hold across the write
        self._channels: dict[str, Channel] = {}
        self._by_broadcast: dict[str, Channel] = {}
        self._load()

    # -- queries (memory only: safe on the event loop) ------------------------------------

    def list(self, owner: str) -> list[Channel]:
        """``owner``'s channels, oldest first."""
        return sorted((c for c in self._channels.values() if c.owner == owner), key=lambda c: c.created_at)

    def get(self, owner: str, ref: str) -> Channel:
        """By channel_id or slug; another key's channel is as unknown as a missing one (404)."""
        channel = self._channels.get(ref)
        if channel is None or channel.owner != owner:
            channel = next((c for c in self._channels.values() if c.owner == owner and c.slug == ref), None)
        if channel is None:
            raise not_found("channel", ref)
        return channel

    def by_broadcast(self, broadcast_id: str) -> Channel | None:
        return self._by_broadcast.get(broadcast_id)

    def has(self, channel_id: str) -> bool:
        """Whether this node keeps the channel (whosever it is: the owner check is the handler's)."""
        return channel_id in self._channels

    def every(self) -> list[Channel]:
        """Every key's channels (what a cluster node writes into the directory)."""
        return list(self._channels.values())

    # -- changes (write the file: run them in a thread) -----------------------------------

    def create(self, owner: str, body: dict[str, Any], now: float) -> Channel:
        fields = _fields(body, create=True)
        slug = fields["slug"]
        with self._lock:
            mine = self.list(owner)
            if len(mine) >= self._per_owner:
                raise RelayError("CHANNEL_LIMIT_REACHED", 409,
                                 f"This API key already has {len(mine)} channels (limit {self._per_owner}).",
                                 action="Delete a channel you no longer use.",
                                 details={"count": len(mine), "limit": self._per_owner})
            if slug is not None and any(c.slug == slug for c in mine):
                raise slug_taken(slug)
            channel = Channel(channel_id=uuid.uuid4().hex, owner=owner, **fields,
                              broadcast_id=secrets.token_urlsafe(12), spectator_token=secrets.token_urlsafe(24),
                              created_at=now)
            self._channels[channel.channel_id] = channel
            try:
                self._save()
            except BaseException:
                del self._channels[channel.channel_id]
                raise
            self._by_broadcast[channel.broadcast_id] = channel
        return channel

    def update(self, channel: Channel, body: dict[str, Any]) -> Channel:
        """The fields ``body`` names (title, description, slug, host_name; null clears an optional one);
        the broadcast's id and token never change."""
        fields = _fields(body, create=False)
        with self._lock:
            slug = fields.get("slug")
            if slug is not None and any(c.slug == slug and c is not channel for c in self.list(channel.owner)):
                raise slug_taken(slug)
            if self._channels.get(channel.channel_id) is not channel:  # deleted (or changed) meanwhile
                raise not_found("channel", channel.channel_id)
            updated = replace(channel, **fields)
            self._channels[channel.channel_id] = updated
            try:
                self._save()
            except BaseException:
                self._channels[channel.channel_id] = channel
                raise
            self._by_broadcast[channel.broadcast_id] = updated
        return updated

    def delete(self, channel: Channel) -> None:
        with self._lock:
            if self._channels.pop(channel.channel_id, None) is None:
                return
            try:
                self._save()
            except BaseException:
                self._channels[channel.channel_id] = channel
                raise
            self._by_broadcast.pop(channel.broadcast_id, None)

    # -- the file ---------------------------------------------------------------------------

    def _save(self) -> None:
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self._path, {"channels": [asdict(c) for c in self._channels.values()]})
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # the old file stands: nothing changed
                raise insufficient_storage("the channels could not be saved") from exc
            raise

    def _load(self) -> None:
        try:
            records = json.loads(self._path.read_text(encoding="utf-8"))["channels"]
            channels = [Channel(**record) for record in records]
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Never overwrite what we could not read: set it aside for a human, start with none.
            aside = self._path.with_name(f"{self._path.name}.unreadable-{uuid.uuid4().hex[:8]}")
            self._path.replace(aside)
            log.error("channels file unreadable (%s): moved to %s", exc, aside)
            return
        for channel in channels:
            self._channels[channel.channel_id] = channel
            self._by_broadcast[channel.broadcast_id] = channel


def _fields(body: dict[str, Any], *, create: bool) -> dict[str, Any]:
    """The checked fields: all of them to create (absent optional ones None), only those present to update."""
    fields: dict[str, Any] = {}
    if create or "title" in body:
        fields["title"] = _text(body, "title", MAX_TITLE_CHARS, required=True)
    if create or "description" in body:
        fields["description"] = _text(body, "description", MAX_DESCRIPTION_CHARS)
    if create or "host_name" in body:
        fields["host_name"] = _text(body, "host_name", MAX_HOST_NAME_CHARS, multiline=False)
    if create or "slug" in body:
        slug = body.get("slug")
        if slug is not None and not (isinstance(slug, str) and SLUG.fullmatch(slug)):
            raise unprocessable("'slug' must be 2 to 48 lowercase letters, digits or inner hyphens.",
                                field="slug", pattern=SLUG.pattern)
        fields["slug"] = slug
    return fields


def _text(body: dict[str, Any], field: str, limit: int, *, required: bool = False,
          multiline: bool = True) -> str | None:
    value = body.get(field)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise unprocessable(f"'{field}' must be a non-empty string.", field=field)
    if len(value) > limit:
        raise unprocessable(f"'{field}' is longer than {limit} characters.", field=field, limit=limit)
    return check_text(value, field, multiline=multiline).strip()
