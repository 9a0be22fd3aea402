"""Prometheus metrics: what an operator graphs to see the relay's health and load."""

from __future__ import annotations

import asyncio
import threading
import weakref

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

REGISTRY = CollectorRegistry()

CONNECTIONS = Gauge("relay_connections", "Open host connections", registry=REGISTRY)
STREAMS = Gauge("relay_streams", "Live streams", registry=REGISTRY)
SPECTATORS = Gauge("relay_spectators", "Connected WHEP spectators", registry=REGISTRY)
WHIP_LATENCY = Histogram(
    "relay_whip_frame_latency_seconds",
    "A WHIP publisher's passed-through frame: from its first RTP packet arriving to its last packet sent to the "
    "last spectator (what the relay adds beyond the network)",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.06, 0.1),
    registry=REGISTRY,
)
WHIP_PUBLISHERS = Gauge("relay_whip_publishers", "Connected WHIP publishers, by how their video reaches spectators "
                        "(passthrough: their H.264 packets as they are; transcode: decoded and encoded once)",
                        ["path"], registry=REGISTRY)
STREAMS_STARTED = Counter("relay_streams_started", "Streams started", registry=REGISTRY)
FRAMES_GENERATED = Counter("relay_frames_generated", "Frames received from world models", registry=REGISTRY)
KEYFRAMES_FORCED = Counter(
    "relay_keyframes_forced", "Keyframes forced by joins and PLI/FIR (after coalescing)", registry=REGISTRY
)
RELAY_LATENCY = Histogram(
    "relay_frame_latency_seconds",
    "From a frame leaving the world model to its last RTP packet sent to the last spectator",
    buckets=(0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.06, 0.08, 0.1, 0.2, 0.5),
    registry=REGISTRY,
)
EDGE_LATENCY = Histogram(
    "relay_edge_frame_latency_seconds",
    "At a cluster edge: from a frame's first RTP packet arriving from its origin to its last packet sent to "
    "the last local spectator (what the edge adds beyond the network)",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.06, 0.1),
    registry=REGISTRY,
)
PACKETS_SENT = Counter("relay_rtp_packets_sent", "RTP packets sent to spectators (encode-once mode)", registry=REGISTRY)
BYTES_SENT = Counter("relay_rtp_bytes_sent", "RTP payload bytes sent to spectators (encode-once mode)", registry=REGISTRY)
HLS_SEGMENTS = Counter("relay_hls_segments", "HLS segments cut from broadcasts' packets", registry=REGISTRY)
HLS_BYTES_SERVED = Counter("relay_hls_bytes_served", "HLS segment bytes served (what a CDN in front would take over)",
                           registry=REGISTRY)
CLUSTER_NODES = Gauge("relay_cluster_nodes", "Live nodes this node sees in the cluster (0: not clustered)",
                      registry=REGISTRY)
CLUSTER_REDIS_UP = Gauge("relay_cluster_redis_up", "1 while the cluster's Redis answered the last heartbeat",
                         registry=REGISTRY)
CLUSTER_SPECTATORS = Gauge("relay_cluster_spectators", "Connected spectators at every live node of the cluster, "
                           "edges included (as of the last heartbeat)", registry=REGISTRY)
CLUSTER_EDGE_FEEDS = Gauge("relay_cluster_edge_feeds", "Broadcasts of other nodes this node serves as an edge "
                           "(one feed from the origin each)", registry=REGISTRY)
CLUSTER_FORWARDED = Counter("relay_cluster_forwarded", "Calls carried to the node that owns their resource",
                            registry=REGISTRY)
# Taken at scrape time, so a leak (a peer, task or thread left behind by a closed session) shows as a level
# that never comes back down.
PEER_CONNECTIONS = Gauge("relay_peer_connections", "Open WebRTC peer connections (spectators' and edge feeds')",
                         registry=REGISTRY)
TASKS = Gauge("relay_tasks", "asyncio tasks alive on the relay's event loop", registry=REGISTRY)
THREADS = Gauge("relay_threads", "Threads alive in the relay's process, not counting thread pools' workers (a pool "
                "keeps up to its bound of idle ones)", registry=REGISTRY)
# The loop's default executor (asyncio's or uvloop's), other pools.
POOL_THREAD_PREFIXES = ("asyncio_", "uvloop_", "ThreadPoolExecutor-")

_peers: weakref.WeakSet = weakref.WeakSet()  # every peer connection made for a spectator or an edge feed


def track_peer(pc) -> None:
    """Counted in relay_peer_connections until closed (or collected)."""
    _peers.add(pc)


def open_peers() -> int:
    return sum(1 for pc in list(_peers) if pc.connectionState != "closed")


def count_sent(packets: int, size: int) -> None:
    PACKETS_SENT.inc(packets)
    BYTES_SENT.inc(size)


def render() -> bytes:
    """The exposition; called on the event loop (the task count is that loop's)."""
    PEER_CONNECTIONS.set(open_peers())
    TASKS.set(len(asyncio.all_tasks()))
    THREADS.set(sum(1 for t in threading.enumerate() if not t.name.startswith(POOL_THREAD_PREFIXES)))
    return generate_latest(REGISTRY)
