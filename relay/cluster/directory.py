"""The directory: which node owns each connection, stream, broadcast and channel, and a broadcast's record
for edges (a channel's broadcast is its channel's node's, with or without a host).

Keys: ``relay:owner:<kind>:<id>`` -> node id and ``relay:broadcast:<id>`` -> JSON record, each with a TTL of
node_timeout_seconds that the owner's heartbeat refreshes (and rewrites, so a Redis that lost its data is
whole again one beat later). Written when created, deleted when closed; an entry whose node stopped
heart-beating reads as gone, so a dead node's ids answer 404 everywhere. Channels (``channel``, and
``slug`` as ``<owner hash>:<slug>``, a slug being unique per key) are written with a TTL of
CHANNEL_HOME_SECONDS instead: a channel outlives its node's death on disk, so another node can say
"its node is down" (503) rather than "no such channel" (404). A lasting entry is refreshed only by the
node it names, or taken when it is free (never over another node's: after Redis lost its data another
node may have claimed the slug first), and deleted only by the node it names (a Lua compare-and-delete). Simulation jobs too
(``relay:owner:job:<id>``), with a TTL of hours instead (see JOB_TTL_SECONDS): a job outlives its node's
restarts, and its node's liveness is read at each lookup all the same.

The edge slice codes against `origin_of` and `node_authorization` (and `Origin`): keep their shape.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable

from redis.asyncio import Redis

from .membership import Membership, NodeInfo

log = logging.getLogger(__name__)

KINDS = ("connection", "stream", "broadcast", "job", "channel", "slug")
LASTING = frozenset({"channel", "slug"})
CHANNEL_HOME_SECONDS = 7200  # a dead node's channels read as "down" this long, then as unknown

# A simulation job lives on (durably, in its node's data_dir) long past any heartbeat: its entry is written
# at submit with this TTL and re-registered wholesale every JOB_REFRESH_SECONDS (and at once when the
# node's marker is missing: a Redis that lost its data), so a job the retention sweep deleted fades here.
JOB_TTL_SECONDS = 7200
JOB_REFRESH_SECONDS = 3600
_REGISTER_CHUNK = 1000

# A lasting entry (a slug is unique per owner across the cluster) is refreshed only by the node that holds
# it, or taken when nobody does: after Redis lost its data, another node may have claimed the slug first,
# and a plain SET from our heartbeat would take it from under that node's channel. Nil when it is ours
# now, else the holder's id.
_HOLD = """local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return holder end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false"""
# A claim (a channel's create or rename): take the entry if free (answers ""), else name its holder (refreshing
# it when that is us), in one step: no gap between the read and the write for another node to take it in.
_CLAIM = """local holder = redis.call('GET', KEYS[1])
if holder then
  if holder == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
  return holder
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return ''"""
# An entry is deleted only by its holder: deleting our channel must not delete another node's claim.
_RELEASE = """if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0"""


def owner_key(kind: str, ident: str) -> str:
    return f"relay:owner:{kind}:{ident}"


def slug_ident(owner: str, slug: str) -> str:
    return f"{owner}:{slug}"


def jobs_marker_key(node_id: str) -> str:
    return f"relay:jobs-registered:{node_id}"


def broadcast_key(broadcast_id: str) -> str:
    return f"relay:broadcast:{broadcast_id}"


@dataclass(frozen=True)
class Origin:
    """Where an edge pulls a broadcast from: the origin node, its base URL, the broadcast's spectator token."""

    node_id: str
    url: str
    spectator_token: str


# What an edge is handed (relay/cluster/edge.py): where a broadcast lives, and the node's credential.
OriginOf = Callable[[str], Awaitable["Origin | None"]]  # async origin_of(broadcast_id) -> Origin | None
NodeAuthorization = Callable[[], str]  # the Authorization header value one node presents to another


@dataclass(frozen=True)
class Entry:
    """One thing this node owns, as the heartbeat rewrites it."""

    kind: str
    ident: str
    record: dict[str, Any] | None = None  # a broadcast's record


class Directory:
    def __init__(self, redis: Redis, membership: Membership, timeout_seconds: float) -> None:
        self._redis = redis
        self._membership = membership
        self._ttl_ms = int(timeout_seconds * 1000)
        self._lasting_ms = max(self._ttl_ms, CHANNEL_HOME_SECONDS * 1000)
        self._hold = redis.register_script(_HOLD)
        self._release = redis.register_script(_RELEASE)
        self._claim = redis.register_script(_CLAIM)

    @property
    def node_id(self) -> str:
        return self._membership.node_id

    async def publish(self, entries: Iterable[Entry]) -> list[tuple[Entry, str]]:
        """Write (or refresh) what this node owns, in one round trip. A lasting entry another node holds is
        left to it: returned with that node's id (and logged), else []."""
        held: list[tuple[int, Entry]] = []  # the pipeline's replies that say who holds a lasting entry
        async with self._redis.pipeline(transaction=False) as pipe:
            for entry in entries:
                key = owner_key(entry.kind, entry.ident)
                if entry.kind in LASTING:
                    held.append((len(pipe), entry))
                    await self._hold(keys=[key], args=[self.node_id, self._lasting_ms], client=pipe)
                else:
                    pipe.set(key, self.node_id, px=self._ttl_ms)
                if entry.record is not None:
                    pipe.set(broadcast_key(entry.ident), json.dumps(entry.record), px=self._ttl_ms)
            replies = await pipe.execute()
        conflicts = []
        for index, entry in held:
            if replies[index] is not None:
                holder = replies[index].decode() if isinstance(replies[index], bytes) else replies[index]
                log.warning("directory: %s %s is held by node %s; not taken", entry.kind, entry.ident, holder)
                conflicts.append((entry, holder))
        return conflicts

    async def claim(self, kind: str, ident: str) -> tuple[str, bool]:
        """Take a lasting entry for this node unless another holds it, atomically: two nodes claiming one slug
        at the same instant cannot both win. Returns (the node id that holds it now, whether this call took it)."""
        holder = await self._claim(keys=[owner_key(kind, ident)], args=[self.node_id, self._lasting_ms])
        holder = holder.decode() if isinstance(holder, bytes) else holder
        return (self.node_id, True) if not holder else (holder, False)

    async def register_jobs(self, job_ids: Iterable[str]) -> None:
        """Jobs of this node (their GET/DELETE at any node are carried here), JOB_TTL_SECONDS each."""
        ids = list(job_ids)
        for start in range(0, len(ids), _REGISTER_CHUNK):
            async with self._redis.pipeline(transaction=False) as pipe:
                for job_id in ids[start:start + _REGISTER_CHUNK]:
                    pipe.set(owner_key("job", job_id), self.node_id, ex=JOB_TTL_SECONDS)
                await pipe.execute()

    async def jobs_due(self) -> bool:
        """True (once per JOB_REFRESH_SECONDS, or when Redis lost the marker) when every job is to be re-registered."""
        return bool(await self._redis.set(jobs_marker_key(self.node_id), "1", nx=True, ex=JOB_REFRESH_SECONDS))

    async def remove(self, entries: Iterable[Entry]) -> None:
        """Delete what this node owns, in one round trip: a lasting entry another node holds now stays its
        (the others' ids are minted here, random: no other node writes them)."""
        entries = list(entries)
        if not entries:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for entry in entries:
                key = owner_key(entry.kind, entry.ident)
                if entry.kind in LASTING:
                    await self._release(keys=[key], args=[self.node_id], client=pipe)
                else:
                    pipe.delete(key)
                if entry.kind == "broadcast":
                    pipe.delete(broadcast_key(entry.ident))
            await pipe.execute()

    async def owner(self, kind: str, ident: str) -> NodeInfo | None:
        """The live node that owns it, or None (unknown, or its node is gone)."""
        node_id = await self.home(kind, ident)
        return None if node_id is None else await self._membership.node(node_id)

    async def home(self, kind: str, ident: str) -> str | None:
        """The id of the node that owns it, live or not (a channel's is kept CHANNEL_HOME_SECONDS)."""
        if kind not in KINDS or not ident or len(ident) > 128:
            return None
        node_id = await self._redis.get(owner_key(kind, ident))
        if not node_id:
            return None
        return node_id.decode() if isinstance(node_id, bytes) else node_id

    async def broadcast_record(self, broadcast_id: str) -> dict[str, Any] | None:
        """{node_id, origin_url, spectator_token, connection_id} while its origin lives, else None."""
        if not broadcast_id or len(broadcast_id) > 128:
            return None
        raw = await self._redis.get(broadcast_key(broadcast_id))
        if not raw:
            return None
        record = json.loads(raw)
        if await self._membership.node(record["node_id"]) is None:
            return None
        return record

    async def origin_of(self, broadcast_id: str) -> Origin | None:
        record = await self.broadcast_record(broadcast_id)
        if record is None:
            return None
        return Origin(record["node_id"], record["origin_url"], record["spectator_token"])

    def node_authorization(self) -> str:
        """The Authorization header value this node sends to another node (see Membership.verify)."""
        return self._membership.authorization()
