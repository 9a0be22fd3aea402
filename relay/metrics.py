"""Prometheus metrics: what an operator graphs to see the relay's health and load."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

REGISTRY = CollectorRegistry()

CONNECTIONS = Gauge("relay_connections", "Open host connections", registry=REGISTRY)
STREAMS = Gauge("relay_streams", "Live streams", registry=REGISTRY)
SPECTATORS = Gauge("relay_spectators", "Connected WHEP spectators", registry=REGISTRY)
STREAMS_STARTED = Counter("relay_streams_started", "Streams started", registry=REGISTRY)
FRAMES_GENERATED = Counter("relay_frames_generated", "Frames received from world models", registry=REGISTRY)
KEYFRAMES_FORCED = Counter(
    "relay_keyframes_forced", "Keyframes forced by joins and PLI/FIR (after coalescing)", registry=REGISTRY
)
PACKETS_SENT = Counter("relay_media_packets_sent", "Encoded frames handed to spectators", registry=REGISTRY)
BYTES_SENT = Counter("relay_media_bytes_sent", "Encoded bytes handed to spectators", registry=REGISTRY)


def render() -> bytes:
    return generate_latest(REGISTRY)
