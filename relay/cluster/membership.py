"""Membership: each node heart-beats its record into Redis with a TTL of node_timeout_seconds; the live
nodes are the records still there. One cluster secret, created once with SET NX, signs node-to-node calls.

Keys: ``relay:nodes`` (a set of node ids, pruned as their records expire), ``relay:node:<id>`` (the record,
JSON, PX node_timeout), ``relay:secret``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from redis.asyncio import Redis

NODES = "relay:nodes"
SECRET = "relay:secret"
NODE_AUTH_SCHEME = "Node"
NODE_AUTH_SKEW_SECONDS = 60  # a node's signed header is good this long either side of its timestamp


def node_key(node_id: str) -> str:
    return f"relay:node:{node_id}"


def derive_node_id(public_url: str) -> str:
    """"http://10.0.0.5:8080" -> "10.0.0.5-8080": unique per node, since public_url must reach it."""
    netloc = urlsplit(public_url).netloc
    return re.sub(r"[^A-Za-z0-9._-]", "-", netloc)[:64] or "node"


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    public_url: str
    streamers_free: int
    load: dict[str, Any]

    @classmethod
    def from_json(cls, raw: bytes | str) -> NodeInfo:
        data = json.loads(raw)
        return cls(data["node_id"], data["public_url"], int(data["streamers_free"]), dict(data.get("load", {})))

    def to_json(self) -> str:
        return json.dumps({"node_id": self.node_id, "public_url": self.public_url,
                           "streamers_free": self.streamers_free, "load": self.load})


class Membership:
    def __init__(self, redis: Redis, node_id: str, timeout_seconds: float) -> None:
        self._redis = redis
        self.node_id = node_id
        self._ttl_ms = int(timeout_seconds * 1000)
        self.secret: bytes | None = None  # the cluster's, once joined

    async def join_secret(self) -> bytes:
        """The cluster secret: ours if we are first, else the one already there. A node that has one
        offers it again at every beat, so a Redis that lost its data gets the same secret back."""
        candidate = self.secret.hex() if self.secret else secrets.token_hex(32)
        await self._redis.set(SECRET, candidate, nx=True)
        value = await self._redis.get(SECRET)
        self.secret = bytes.fromhex(value.decode() if isinstance(value, bytes) else value)
        return self.secret

    async def has_secret(self) -> bool:
        return bool(await self._redis.exists(SECRET))

    async def beat(self, record: NodeInfo) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.set(node_key(self.node_id), record.to_json(), px=self._ttl_ms)
            pipe.sadd(NODES, self.node_id)
            await pipe.execute()

    async def leave(self) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.delete(node_key(self.node_id))
            pipe.srem(NODES, self.node_id)
            await pipe.execute()

    async def node(self, node_id: str) -> NodeInfo | None:
        """The live node's record; None once it stopped heart-beating for node_timeout_seconds."""
        raw = await self._redis.get(node_key(node_id))
        return NodeInfo.from_json(raw) if raw else None

    async def nodes(self) -> list[NodeInfo]:
        ids = sorted(m.decode() if isinstance(m, bytes) else m for m in await self._redis.smembers(NODES))
        if not ids:
            return []
        raws = await self._redis.mget([node_key(i) for i in ids])
        gone = [i for i, raw in zip(ids, raws) if not raw]
        if gone:  # expired records: forget their ids too (the set would grow with every restart otherwise)
            await self._redis.srem(NODES, *gone)
        return [NodeInfo.from_json(raw) for raw in raws if raw]

    # -- node-to-node authentication ---------------------------------------------------------

    def authorization(self, now: float | None = None) -> str:
        """`Node <node_id>:<unix seconds>:<hex HMAC-SHA256(secret, "node_id:seconds")>`."""
        assert self.secret is not None, "not joined"
        stamp = str(int(time.time() if now is None else now))
        return f"{NODE_AUTH_SCHEME} {self.node_id}:{stamp}:{_mac(self.secret, self.node_id, stamp)}"

    def verify(self, header: str | None, now: float | None = None) -> str | None:
        """The calling node's id, if `header` is a fresh value of authorization() signed with our secret."""
        if not header or self.secret is None:
            return None
        scheme, _, value = header.partition(" ")
        parts = value.split(":")
        if scheme != NODE_AUTH_SCHEME or len(parts) != 3 or not parts[1].isdigit() or len(value) > 256:
            return None
        node_id, stamp, mac = parts
        if abs((time.time() if now is None else now) - int(stamp)) > NODE_AUTH_SKEW_SECONDS:
            return None
        return node_id if hmac.compare_digest(mac, _mac(self.secret, node_id, stamp)) else None


def _mac(secret: bytes, node_id: str, stamp: str) -> str:
    return hmac.new(secret, f"relay/node:{node_id}:{stamp}".encode(), hashlib.sha256).hexdigest()
