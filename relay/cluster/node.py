"""The Cluster: this node's part in a cluster of relays sharing one Redis.

It owns the Redis client and the heartbeat task. Each beat (every heartbeat_seconds) writes this node's
membership record, rewrites what it owns into the directory, refreshes the quota slots and spectators'
seats it holds and rewrites its viewer counts (and, as an origin, sums the other nodes'), so a Redis that
restarted empty is whole again one beat later (simulation jobs, which outlive heartbeats by far, are
re-registered hourly, and at the first beat that finds them lost). The rest of the relay reaches it
through seams: SessionManager's `observer`, `stream_quota` and `spectator_seats` (each broadcast's
spectators' Seats, the edges' too), Simulations' `cluster_quota` and `cluster_directory` (set by create_app).

Redis going away never stops what runs: live streams go on; what needs Redis fails fast with 503
CLUSTER_UNAVAILABLE (see `guarded`), and the next beat that succeeds heals it. A burst of calls beyond this
node's Redis connections waits for one (pool.py), then is 503 CLUSTER_BUSY: busy is not away.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

from redis.exceptions import MaxConnectionsError, RedisError

from .. import metrics
from ..channels import SLUG, slug_taken
from ..config import Settings
from ..errors import RelayError, cluster_busy, cluster_unavailable
from .directory import LASTING, Directory, Entry, Origin, slug_ident
from .membership import Membership, NodeInfo, derive_node_id
from .pool import connect
from .quota import ClusterQuota
from .seats import SpectatorCounts

log = logging.getLogger(__name__)


class JoinError(Exception):
    """This node cannot join its cluster at start (Redis does not answer)."""


def channel_node_unavailable(ref: str, node_id: str) -> RelayError:
    return RelayError(
        "CHANNEL_NODE_UNAVAILABLE", 503, "The node that keeps this channel is not running.",
        action="Retry when that node is back: the channel, its watch link and ids return with it. To go live "
               "now, create another channel.", details={"channel": ref[:128], "node_id": node_id}, retry_after=5)


class Cluster:
    def __init__(self, settings: Settings, sessions: Any, *,
                 active_jobs: Callable[[], Awaitable[Iterable[str]]] | None = None,
                 all_jobs: Callable[[], Awaitable[Iterable[str] | None]] | None = None) -> None:
        """`sessions`: the SessionManager whose connections and streams this node owns; `active_jobs()`:
        the ids of the simulation jobs still pending or running here (whose quota slots stay held);
        `all_jobs()`: every job id in this node's store (registered in the directory), None until it opens."""
        cluster = settings.cluster
        self.settings = cluster
        self.public_url = settings.server.public_url
        self.node_id = cluster.node_id or derive_node_id(self.public_url)
        # Every Redis call is short: a Redis that does not answer within a beat is away (fail fast); within
        # a second at least, since a busy machine's Redis may well take longer than a very short beat's.
        seconds = min(max(cluster.heartbeat_seconds, 1.0), 2.0)
        self.redis = connect(cluster.redis_url, cluster.redis_max_connections, seconds)
        self.membership = Membership(self.redis, self.node_id, cluster.node_timeout_seconds)
        self.directory = Directory(self.redis, self.membership, cluster.node_timeout_seconds)
        self.streams = ClusterQuota(self.redis, "streams", cluster.node_timeout_seconds)
        self.simulations = ClusterQuota(self.redis, "simulations", cluster.node_timeout_seconds)
        self.spectators = SpectatorCounts(self.redis, self.node_id, cluster.node_timeout_seconds,
                                          reachable=lambda: self.reachable)
        # Called when the cluster secret this node holds changes (a Redis that came back empty and took
        # another node's first): what is derived from it (the /odyssey and recording-link keys) is derived again.
        self.on_secret: Callable[[], None] | None = None
        self._sessions, self._active_jobs, self._all_jobs = sessions, active_jobs, all_jobs
        self._jobs_stale = True  # every job id is to be (re-)registered at the next beat
        self.reachable = False
        # Lasting entries (a deleted channel's, a renamed slug's) whose removal failed while Redis was away or
        # busy: the next heartbeat that reaches Redis removes them (compare-and-delete: never another node's).
        self._owed_removals: set[Entry] = set()
        self.nodes_seen: list[NodeInfo] = []
        self._task: asyncio.Task | None = None
        self._writes: set[asyncio.Task] = set()

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Join: the cluster secret, then the first beat. Redis must answer now (a node cannot join blind)."""
        try:
            if not await self.membership.has_secret():
                # A first node, or a Redis that came back empty while live nodes hold the secret: give them
                # a beat and a half to offer it back, lest a new one win and every token minted so far fail.
                await asyncio.sleep(self.settings.heartbeat_seconds * 1.5)
            await self.membership.join_secret()
        except (RedisError, OSError) as exc:
            raise JoinError(f"cluster.redis_url: Redis does not answer at {self.settings.redis_url}: {exc}") from exc
        await self.beat()
        self._task = asyncio.create_task(self._run(), name="relay-cluster-heartbeat")
        log.info("joined the cluster as %s", self.node_id)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.gather(*self._writes, return_exceptions=True)
        await self.spectators.close()
        with contextlib.suppress(RedisError, OSError):  # leave at once rather than at node_timeout
            # But for our channels: they are on our disk, back when we are (till then: 503, not 404).
            await self.directory.remove([e for e in self._owned() if e.kind not in LASTING])
            await self.membership.leave()
        await self.redis.aclose()
        metrics.CLUSTER_NODES.set(0)
        metrics.CLUSTER_SPECTATORS.set(0)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_seconds)
            await self.beat()

    def _owned(self) -> list[Entry]:
        store = self._sessions.channels
        # Channels first: a connection's record of the same broadcast (which names it) is written after.
        entries = [e for channel in (store.every() if store is not None else []) for e in self.channel_entries(channel)]
        entries += [e for conn in self._sessions.connections.values() for e in self._entries_of(conn)]
        return entries + [Entry("stream", stream_id) for stream_id in self._sessions.stream_ids()]

    def _entries_of(self, conn: Any) -> list[Entry]:
        broadcast = conn.broadcast
        return [Entry("connection", conn.connection_id),
                self._broadcast_entry(broadcast.broadcast_id, broadcast.spectator_token, conn.connection_id)]

    def channel_entries(self, channel: Any) -> list[Entry]:
        """A channel and its broadcast, owned here even between hosts (its watch link works at any node)."""
        entries = [Entry("channel", channel.channel_id),
                   self._broadcast_entry(channel.broadcast_id, channel.spectator_token, None)]
        if channel.slug:  # the slug found at every node, as the id is
            entries.append(Entry("slug", slug_ident(channel.owner, channel.slug)))
        return entries

    def _broadcast_entry(self, broadcast_id: str, spectator_token: str, connection_id: str | None) -> Entry:
        return Entry("broadcast", broadcast_id, {"node_id": self.node_id, "origin_url": self.public_url,
                                                 "spectator_token": spectator_token, "connection_id": connection_id})

    async def beat(self) -> None:
        sessions = self._sessions
        # A node's load: its connections, and the spectators it serves, its own broadcasts' and as an edge's
        # (the seats count both), which orders where-to-watch lists least-loaded first.
        load = {"connections": len(sessions.connections), "spectators": self.spectators.viewers_here}
        try:
            secret = self.membership.secret
            if await self.membership.join_secret() != secret and secret is not None and self.on_secret:
                self.on_secret()  # offers ours again (the same after a Redis restart), unless another won
            await self.membership.beat(NodeInfo(self.node_id, self.public_url, sessions.streamers_free, load))
            owned = self._owned()
            await self.directory.publish(owned)
            if self._owed_removals:  # not one a channel made since owns again
                owed = set(self._owed_removals)
                await self.directory.remove(owed - {e for e in owned if e.kind in LASTING})
                self._owed_removals -= owed
            await self.streams.refresh()
            await self._reconcile_jobs()
            await self._register_jobs()
            await self.simulations.refresh()
            self.nodes_seen = await self.membership.nodes()
            elsewhere = await self.spectators.beat(list(sessions.broadcasts), {n.node_id for n in self.nodes_seen})
            for broadcast_id, broadcast in list(sessions.broadcasts.items()):
                broadcast.viewers_elsewhere = elsewhere.get(broadcast_id, 0)
            if not self.reachable:
                log.info("cluster: Redis reachable, %d nodes", len(self.nodes_seen))
            self.reachable = True
        except MaxConnectionsError as exc:  # Redis answers, this node's burst of calls held every connection
            log.warning("cluster: heartbeat found Redis busy (%s); the next one retries", exc)
        except (RedisError, OSError) as exc:
            if self.reachable:
                log.warning("cluster: Redis unreachable (%s); live streams go on", exc)
            self.reachable = False
        except Exception:
            log.exception("cluster heartbeat failed")
        metrics.CLUSTER_REDIS_UP.set(1 if self.reachable else 0)
        metrics.CLUSTER_NODES.set(len(self.nodes_seen) if self.reachable else 0)
        metrics.CLUSTER_SPECTATORS.set(sum(int(n.load.get("spectators", 0)) for n in self.nodes_seen))

    async def _reconcile_jobs(self) -> None:
        """Give back the slots of jobs that finished here (completed, failed or cancelled)."""
        if self._active_jobs is None or not self.simulations.held:
            return
        active = set(await self._active_jobs()) | self.simulations.submitting
        for job_id in [m for m in self.simulations.held if m not in active]:
            await self.simulations.give_back(job_id)

    async def _register_jobs(self) -> None:
        """Every job of this node into the directory: at the first beat, hourly, and when Redis lost them."""
        if self._all_jobs is None:
            return
        due = await self.directory.jobs_due()  # first: the refresh period starts with this registration
        if self._jobs_stale or due:
            self._jobs_stale = True  # until the whole set is written: a failure half way retries next beat
            ids = await self._all_jobs()
            if ids is None:  # the job store is not open yet (the node is starting, or its disk is full)
                return
            await self.directory.register_jobs(ids)
            self._jobs_stale = False

    async def job_submitted(self, job_id: str) -> None:
        """Simulations' seam: a new job is in the directory before its 202 (its next call may reach any node)."""
        try:
            await self.directory.register_jobs([job_id])
        except (RedisError, OSError) as exc:
            self._jobs_stale = True
            log.warning("cluster: job registration failed (%s); the next heartbeat retries", exc)

    # -- what the relay calls -------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def guarded(self) -> AsyncIterator[None]:
        """Around a call that needs Redis: unreachable is 503 CLUSTER_UNAVAILABLE, at once; every connection
        busy past the pool's wait, 503 CLUSTER_BUSY."""
        try:
            yield
        except MaxConnectionsError:
            raise cluster_busy() from None
        except (RedisError, OSError) as exc:
            self.reachable = False
            log.warning("cluster: Redis call failed: %s", exc)
            raise cluster_unavailable(self.settings.heartbeat_seconds) from None

    async def owner(self, kind: str, ident: str) -> NodeInfo | None:
        async with self.guarded():
            return await self.directory.owner(kind, ident)

    async def nodes(self) -> list[NodeInfo]:
        async with self.guarded():
            return await self.membership.nodes()

    async def origin_of(self, broadcast_id: str) -> Origin | None:
        async with self.guarded():
            return await self.directory.origin_of(broadcast_id)

    def node_authorization(self) -> str:
        return self.membership.authorization()

    def verify_node(self, header: str | None) -> str | None:
        return self.membership.verify(header)

    def token_secret(self, purpose: bytes) -> bytes:
        """A key for `purpose` derived from the cluster secret: tokens minted on one node hold on every node."""
        assert self.membership.secret is not None, "not joined"
        return hashlib.sha256(self.membership.secret + b"/" + purpose).digest()

    # -- SessionManager's observer: the directory written as things are created and closed -------

    async def connection_opened(self, conn: Any) -> None:
        await self._publish(self._entries_of(conn))

    async def stream_started(self, stream: Any) -> None:
        await self._publish([Entry("stream", stream.stream_id)])

    def connection_closed(self, conn: Any) -> None:
        # Not awaited: until it lands, a forwarded call finds the connection gone at its owner (404 there).
        channel = conn.broadcast.channel
        if channel is not None and self._sessions.channels is not None and self._sessions.channels.has(channel.channel_id):
            # A channel's broadcast stays, hostless: its record no longer names the connection.
            self._write(self.directory.remove([Entry("connection", conn.connection_id)]))
            self._write(self.directory.publish(self.channel_entries(channel)))
        else:
            self._write(self.directory.remove(self._entries_of(conn)))  # its streams stay answerable here

    async def channel_created(self, channel: Any) -> None:
        await self._publish(self.channel_entries(channel))

    async def channel_deleted(self, channel: Any) -> None:
        """Awaited before the 204: the key's next call, at any node, finds the slug free."""
        await self._remove_lasting(self.channel_entries(channel))

    async def channel_updated(self, old_slug: str | None, channel: Any) -> None:
        """A renamed slug is found at once under its new name, and no longer under the old one."""
        if old_slug and old_slug != channel.slug:  # awaited: the old slug is free for the key's next call
            await self._remove_lasting([Entry("slug", slug_ident(channel.owner, old_slug))])
        await self._publish(self.channel_entries(channel))

    async def _remove_lasting(self, entries: list[Entry]) -> None:
        """Removed now when Redis answers; else owed to the next heartbeat that reaches it (a lasting entry would
        otherwise name this node for CHANNEL_HOME_SECONDS: the key's slug taken at every other node)."""
        if self.reachable:
            try:
                await self.directory.remove(entries)
                return
            except (RedisError, OSError) as exc:
                log.warning("cluster: directory write failed (%s); the next heartbeat retries", exc)
        self._owed_removals.update(e for e in entries if e.kind in LASTING)

    @contextlib.asynccontextmanager
    async def slug_claim(self, owner: str, slug: Any) -> AsyncIterator[None]:
        """Around a channel's create or rename: the slug is claimed for this node in the directory first, atomically,
        so it is unique per key across the cluster (409 SLUG_TAKEN when another node holds it, even when two nodes
        race for it); a claim this call made is given back if the store then refuses the channel."""
        if not isinstance(slug, str) or not SLUG.fullmatch(slug):  # none or a bad one: the store answers, Redis untouched
            yield
            return
        ident = slug_ident(owner, slug)
        async with self.guarded():  # claimed: taken by this call (this node's own slug is only refreshed)
            holder, claimed = await self.directory.claim("slug", ident)
        if holder != self.node_id:
            raise slug_taken(slug)
        try:
            yield
        except BaseException:
            if claimed and not self._keeps_slug(owner, slug):  # (a free key this node's own channel had lost: kept)
                self._write(self.directory.remove([Entry("slug", ident)]))
            raise

    def _keeps_slug(self, owner: str, slug: str) -> bool:
        store = self._sessions.channels
        return store is not None and any(c.slug == slug for c in store.list(owner))

    async def channel_node(self, owner: str, ref: str) -> NodeInfo | None:
        """The live node that keeps channel `ref` (its id, or `owner`'s slug); None when no node has it;
        503 CHANNEL_NODE_UNAVAILABLE when the node that keeps it is down (its channels are on its disk)."""
        async with self.guarded():
            for kind, ident in (("channel", ref), ("slug", slug_ident(owner, ref))):
                node_id = await self.directory.home(kind, ident)
                if node_id is None:
                    continue
                node = await self.membership.node(node_id)
                if node is None:
                    raise channel_node_unavailable(ref, node_id)
                return node
        return None

    async def _publish(self, entries: list[Entry]) -> None:
        """In the directory before the host hears of it (its next call may reach any node). With Redis
        away, not awaited: the call goes on, the next beat that reaches Redis writes it."""
        if not self.reachable:
            self._write(self.directory.publish(entries))
            return
        try:
            await self.directory.publish(entries)
        except (RedisError, OSError) as exc:
            self.reachable = isinstance(exc, MaxConnectionsError)  # busy is not away
            log.warning("cluster: directory write failed (%s); the next heartbeat retries", exc)

    def _write(self, coro) -> None:
        """A write nobody waits for, owned here (awaited at close); a failure is the next beat's to mend."""
        async def write() -> None:
            try:
                await coro
            except (RedisError, OSError) as exc:
                log.warning("cluster: directory write failed (%s); the next heartbeat retries", exc)
        task = asyncio.get_running_loop().create_task(write(), name="relay-cluster-write")
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    # -- SessionManager's stream_quota ------------------------------------------------------------

    async def acquire_stream(self, owner: str, slot: str, limit: int) -> tuple[bool, int]:
        return await self.streams.take(owner, slot, limit)

    async def release_stream(self, slot: str) -> None:
        await self.streams.give_back(slot)  # Redis away: it lapses, no longer refreshed

    def watch_nodes(self, limit: int) -> list[dict[str, str]]:
        """Where a spectator may watch: the live nodes as the last beat saw them, least-loaded first (at
        most `limit`), this node among them even with Redis away. No Redis call: a page may ask often."""
        seen = {n.node_id: n for n in self.nodes_seen}
        if self.node_id not in seen:
            seen[self.node_id] = NodeInfo(self.node_id, self.public_url, 0, {"spectators": 0})
        ordered = sorted(seen.values(), key=lambda n: (int(n.load.get("spectators", 0)), n.node_id))
        return [{"node_id": n.node_id, "url": n.public_url} for n in ordered[:limit]]

    def describe(self) -> dict[str, Any]:
        """For /readyz: who we are and whom we see."""
        return {"node_id": self.node_id, "redis": self.reachable,
                "nodes": [{"node_id": n.node_id, "public_url": n.public_url, "streamers_free": n.streamers_free}
                          for n in self.nodes_seen] if self.reachable else []}

