"""The hosted world-model API as the relay's source: the relay is one more client of it.

``[world_model] kind = "hosted"`` makes every relay connection hold one session of the hosted API
(its official SDK, `@odysseyml/odyssey` 1.3.1, is the reference for every call; see
relay/worldmodel/hosted_protocol.py). The owner side of that session receives the real model's video,
which the relay then encodes once, fans out to its spectators and records, like any source's.

    connect()      POST /auth/token (re-exchanged 60 s before it expires), POST /sessions/request
                   (503: polled every second for ``queue`` seconds; 429: the hosted usage error),
                   POST /sessions/token, GET {signalling_url}/config, the signalling socket (retried
                   like the SDK's before it opens), the streamer's offer answered by aiortc (the
                   answer without candidates, then each of ours trickled as ``ice_candidate``, as a
                   browser does), keepalives every 10 s; ready once the peer is connected, the video
                   track is there and ``clientToStreamer`` is open.
    start_stream   ``interactive_stream_start`` (broadcast false: the relay fans out itself; with an
                   image, or too large for the channel, over the socket) -> ``stream_started``.
    interact       ``update`` -> ``update_acknowledged`` (its prompt is what the model applied).
    end_stream     ``interactive_stream_end`` -> ``stream_ended``.
    disconnect     ``client_disconnecting``, the socket closed 1000, then the peer connection.

Every wait is bounded (:class:`HostedTimeouts`). Video keeps arriving on one peer connection across
streams, so one task drains it and hands frames to the current stream's :class:`HostedTrack` only
while that stream is live, re-timed on the relay's own clock. The track ends (MediaStreamError, so
the core ends the stream with ``upstream_error``) when the upstream ends the stream by itself or
reports ``interactive_stream_error``, when the signalling socket sends ``error`` or closes, when the
peer connection fails or the video stops for ``stall`` seconds. A session that failed is closed at
once; the next ``start_stream`` on that relay connection requests a new one (as the SDK does).

Failures are RelayErrors, so they reach the host as they are (REST body or control-socket ``error``):
the hosted 429 usage errors keep their code, message, action and details; a refused start or update
keeps its reason (``CONCURRENT_LIMIT_REACHED``, ...) or is ``UPSTREAM_ERROR`` 502 with the hosted
message; an unreachable or misconfigured upstream (a wrong API key) is ``UPSTREAM_ERROR`` 502; no free
hosted streamer within the queue time is ``STREAMER_NOT_AVAILABLE`` 503.

The package, one job a module: ``client`` (the REST calls, simulation jobs and downloads included),
``session`` (one hosted session: signalling and the peer connection), ``streamer`` (commands matched to
replies, one stream at a time), ``track`` (the video, re-timed), ``errors`` (the hosted failures as
RelayErrors), ``model`` (the source the relay's sessions connect to).
"""

from .client import HostedClient, HostedTimeouts, socket_url
from .errors import stream_error, upstream_error, usage_error
from .model import HostedWorldModel
from .streamer import HostedStreamer
from .track import HostedTrack

__all__ = ["HostedClient", "HostedStreamer", "HostedTimeouts", "HostedTrack", "HostedWorldModel", "socket_url",
           "stream_error", "upstream_error", "usage_error"]
