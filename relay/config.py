"""Typed settings, read from TOML and validated once at start.

Each `[section]` is a frozen dataclass and `Settings` holds one of each. One generic walker checks every
value against its field's annotation (and the constraint in its `metadata`), so adding a section is
just a dataclass with defaults plus a field on `Settings`. After loading, nothing re-validates:
`dataclasses.replace` is free to set values the file could not (tests use that for short timeouts).
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass, replace
from difflib import get_close_matches
from typing import Any, Literal, get_args, get_origin, get_type_hints
from urllib.parse import urlsplit

__all__ = ["ConfigError", "Settings", "load_config", "hosted_api_key", "ServerSettings", "AuthSettings",
           "LimitsSettings", "WorldModelSettings", "WebRTCSettings", "MediaSettings", "OrchestrationSettings",
           "RecordingsSettings", "SimulationsSettings", "ClusterSettings"]


class ConfigError(Exception):
    """A bad configuration; the message names the dotted key and what is wrong with it."""


def option(default: Any, **rules: Any) -> Any:
    """A setting with its default and its constraints: min, max, even, nonempty, or parse(key, raw)."""
    return field(default=default, metadata=rules)


# ---------------------------------------------------------------------------------------- validation

_NAMES = {int: ("an integer", "integers"), float: ("a number", "numbers"),
          str: ("a string", "strings"), bool: ("true or false", "booleans")}


def _show(value: Any) -> str:
    # TOML spelling (true, "text", [1, 2]) so the reader recognises what they wrote.
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # inf, nan: as TOML spells them, where JSON would say Infinity
    return "nothing" if value is None else json.dumps(value, ensure_ascii=False, default=str)


def _fail(key: str, expected: str, got: Any) -> None:
    raise ConfigError(f"{key}: expected {expected}, got {_show(got)}")


def _describe(tp: type, rules: Mapping[str, Any]) -> str:
    text = ("an even integer" if rules.get("even") else
            "a non-empty string" if rules.get("nonempty") else _NAMES[tp][0])
    low, high = rules.get("min"), rules.get("max")
    if low is not None and high is not None:
        return f"{text} from {low} to {high}"
    return text + (f" ≥ {low}" if low is not None else f" ≤ {high}" if high is not None else "")


def _scalar(key: str, tp: type, value: Any, rules: Mapping[str, Any]) -> Any:
    # bool is a subclass of int, but `port = true` is a mistake, not 1.
    ok = isinstance(value, tp) and (tp is bool or not isinstance(value, bool))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if ok and tp is float:
        ok = math.isfinite(value)  # TOML allows inf and nan; neither is a sensible limit
    if ok and tp in (int, float):
        low, high = rules.get("min"), rules.get("max")
        ok = (low is None or low <= value) and (high is None or value <= high)
        ok = ok and not (rules.get("even") and value % 2)
    if ok and rules.get("nonempty"):
        ok = value != ""
    if not ok:
        _fail(key, _describe(tp, rules), value)
    return value


def _join(prefix: str, name: Any) -> str:
    return f"{prefix}.{name}" if prefix else str(name)


def _reject_unknown(prefix: str, data: Mapping[str, Any], known: Any) -> None:
    for name in data:
        if name not in known:
            what = "key" if prefix else "section"
            close = get_close_matches(str(name), list(known), n=1)
            hint = f' (did you mean "{close[0]}"?)' if close else ""
            raise ConfigError(f"{_join(prefix, name)}: unknown {what}{hint}")


def _check(key: str, tp: Any, value: Any, rules: Mapping[str, Any]) -> Any:
    if "parse" in rules:  # a structured value validates (and normalizes) itself
        return rules["parse"](key, value)
    if is_dataclass(tp):
        return _build(tp, value, key)
    if get_origin(tp) is Literal:
        if value not in get_args(tp):
            _fail(key, "one of " + ", ".join(map(_show, get_args(tp))), value)
        return value
    if get_origin(tp) is tuple:  # a TOML array; tuples keep the frozen sections truly immutable
        item = get_args(tp)[0]
        if not isinstance(value, (list, tuple)):
            _fail(key, f"an array of {_NAMES[item][1]}", value)
        return tuple(_check(f"{key}[{i}]", item, v, rules) for i, v in enumerate(value))
    return _scalar(key, tp, value, rules)


def _build(cls: type, data: Any, prefix: str = "") -> Any:
    if not isinstance(data, Mapping):
        _fail(prefix or "config", "a table", data)
    hints, known = get_type_hints(cls), {f.name: f for f in fields(cls)}
    _reject_unknown(prefix, data, known)
    return cls(**{name: _check(_join(prefix, name), hints[name], value, known[name].metadata)
                  for name, value in data.items()})


# --------------------------------------------------------------------------------- structured values

def _public_url(key: str, value: Any) -> str:
    url = _scalar(key, str, value, {}).rstrip("/")  # we append paths to it, so no trailing slash
    parts = urlsplit(url)
    ok = parts.scheme in ("http", "https") and parts.netloc and not (parts.query or parts.fragment)
    if url and not ok:
        _fail(key, 'an http:// or https:// URL (or "" to derive it from host and port)', value)
    return url


def _api_url(key: str, value: Any) -> str:
    url = _scalar(key, str, value, {}).rstrip("/")  # the SDK appends paths to it, so no trailing slash
    parts = urlsplit(url)
    if not (parts.scheme in ("http", "https") and parts.netloc and not (parts.query or parts.fragment)):
        _fail(key, 'an http:// or https:// URL, e.g. "https://api.odyssey.ml"', value)
    return url


def _env_name(key: str, value: Any) -> str:
    name = _scalar(key, str, value, {})
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        _fail(key, 'the name of an environment variable, e.g. "ODYSSEY_API_KEY"', value)
    return name


# RFC 7064/7065: "stun:host[:port]", "turns:host[:port][?transport=tcp]"; browsers reject "stun://host".
_ICE_URL = re.compile(r"(stuns?|turns?):[^\s/?#]+(\?transport=(udp|tcp))?")


def _ice_server(key: str, entry: Any) -> dict[str, Any]:
    # A bare URL is shorthand for {urls = URL}; its errors then name the entry itself.
    table, urls_key = ({"urls": entry}, key) if isinstance(entry, str) else (entry, f"{key}.urls")
    if not isinstance(table, Mapping):
        _fail(key, 'a URL like "stun:host:port" or a table {urls, username, credential}', entry)
    _reject_unknown(key, table, ("urls", "username", "credential"))
    urls = [table.get("urls")] if isinstance(table.get("urls"), str) else table.get("urls")
    if not isinstance(urls, (list, tuple)) or not urls:
        _fail(urls_key, "a URL or a non-empty array of URLs", table.get("urls"))
    for url in urls:
        if not (isinstance(url, str) and _ICE_URL.fullmatch(url)):
            _fail(urls_key, 'a URL like "stun:host:port", "turn:host:port" or "turns:host:port"', url)
    server = {"urls": list(urls)}
    for name in ("username", "credential"):
        if name in table:
            server[name] = _scalar(f"{key}.{name}", str, table[name], {})
    # Browsers throw when building the peer connection if a TURN server lacks credentials.
    if any(u.startswith("turn") for u in urls) and not {"username", "credential"} <= server.keys():
        _fail(key, "a username and credential for a TURN server", entry)
    return server


def _ice_servers(key: str, value: Any) -> tuple[dict[str, Any], ...]:
    if not isinstance(value, (list, tuple)):
        _fail(key, "an array of ICE servers", value)
    return tuple(_ice_server(f"{key}[{i}]", entry) for i, entry in enumerate(value))


# ------------------------------------------------------------------------------------------ sections

def _trusted_proxies(key: str, value: Any) -> tuple[str, ...]:
    # Addresses or networks (CIDR) whose X-Forwarded-For the per-address caps believe.
    if not isinstance(value, (list, tuple)):
        _fail(key, "an array of addresses or networks", value)
    networks = []
    for i, item in enumerate(value):
        try:
            networks.append(str(ipaddress.ip_network(item, strict=False)))
        except (TypeError, ValueError):
            _fail(f"{key}[{i}]", 'an IP address or network, e.g. "10.0.0.0/8"', item)
    return tuple(networks)


@dataclass(frozen=True)
class ServerSettings:
    host: str = option("127.0.0.1", nonempty=True)
    port: int = option(8080, min=0, max=65535)  # 0: the OS picks a free port (tests)
    public_url: str = option("", parse=_public_url)  # "" = derived from host and port
    data_dir: str = option("./data", nonempty=True)
    max_body_bytes: int = option(1048576, min=1024)
    max_json_depth: int = option(32, min=2, max=512)  # below the parser's recursion limit, whatever the body
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Deadlines for peers that stall (a stranger's connection must not hold an fd or a task for long).
    shutdown_seconds: float = option(5.0, min=0.5, max=120)  # SIGTERM to exit, sockets told and recordings final
    send_timeout_seconds: float = option(5.0, min=0.1, max=300)  # a socket's reader must take each message by then
    header_timeout_seconds: float = option(10.0, min=0.1, max=300)  # a request's headers, from connect or last reply
    body_timeout_seconds: float = option(30.0, min=0.1, max=600)  # a request's whole body, from its headers
    # Reverse proxies in front of the relay: their X-Forwarded-For names the client the per-address caps count.
    trusted_proxies: tuple[str, ...] = option((), parse=_trusted_proxies)


@dataclass(frozen=True)
class AuthSettings:
    api_keys: tuple[str, ...] = option((), nonempty=True)


@dataclass(frozen=True)
class LimitsSettings:
    streamers: int = option(4, min=1)
    concurrent_streams: int = option(5, min=1)
    stream_max_seconds: float = option(150.0, min=0.5)
    connection_max_seconds: float = option(3600.0, min=1)
    idle_timeout_seconds: float = option(40.0, min=0.5)
    spectators_per_broadcast: int = option(1000, min=0)
    pending_simulations: int = option(10, min=1)
    client_token_seconds: float = option(600.0, min=1)
    spectator_timeout_seconds: float = option(15.0, min=1)
    # A host's prompts (REST, control socket, /odyssey alike): a token bucket per connection.
    host_interacts_per_second: float = option(10.0, min=0.01)
    host_interacts_burst: int = option(20, min=1)
    # Events sockets: identities with an open socket per broadcast, and sockets per client address
    # per broadcast (generous: a classroom shares one address behind its NAT).
    participants_per_broadcast: int = option(1000, min=0)
    events_sockets_per_address: int = option(100, min=1)
    # Messages refused in a row for rate after which a participant's socket is closed (code 4029).
    events_flood_messages: int = option(200, min=1)
    whep_offer_max_bytes: int = option(32768, min=1024)
    whep_offer_max_candidates: int = option(64, min=1)
    pending_whep_per_address: int = option(20, min=1)
    # WHEP sessions (pending or connected) one client address may hold per broadcast, at every node of a
    # cluster together: seats are first come first served, so without it one address could take them all.
    # A classroom fits; a watch party behind one carrier NAT needs more (or trusted_proxies, when a proxy
    # names its clients).
    spectators_per_address: int = option(100, min=1)
    whep_connect_seconds: float = option(10.0, min=1)
    channels_per_key: int = option(20, min=0, max=10000)  # lasting watch links an API key may keep
    # A channel's broadcast with no host and nobody watching is released (its memory freed) after this long.
    channel_release_seconds: float = option(60.0, min=0.1)


@dataclass(frozen=True)
class WorldModelSettings:
    kind: Literal["synthetic", "hosted", "whip"] = "synthetic"
    width: int = option(1280, even=True, min=16, max=3840)  # even: H.264 4:2:0 halves both axes
    height: int = option(704, even=True, min=16, max=3840)
    fps: int = option(25, min=1, max=60)
    # kind = "hosted" (relay/worldmodel/hosted.py): the hosted API's base URL (the SDK's default), and the
    # environment variable that holds its API key; the key itself never sits in a config file.
    url: str = option("https://api.odyssey.ml", parse=_api_url)
    api_key_env: str = option("ODYSSEY_API_KEY", parse=_env_name)
    # kind = "whip" (relay/worldmodel/whip.py): a live stream whose publisher sends nothing for this long
    # ends with reason upstream_error (spectators stay for the next stream).
    publisher_silence_seconds: float = option(3.0, min=0.5, max=60)


@dataclass(frozen=True)
class WebRTCSettings:
    # Normalized to the W3C RTCIceServer shape: {"urls": [...], "username"?: ..., "credential"?: ...}.
    ice_servers: tuple[dict[str, Any], ...] = option((), parse=_ice_servers)
    # Local addresses the relay offers as ICE host candidates; empty = every interface but
    # loopback (aioice's default). ["127.0.0.1"] keeps a laptop demo or a test run on loopback.
    ice_host_addresses: tuple[str, ...] = ()


@dataclass(frozen=True)
class MediaSettings:
    # encode-once: one encode per stream, packetized once, per spectator only header+SRTP+send.
    # encode-once-sender / per-spectator: aiortc's RTCRtpSender per spectator (packetizing the
    # shared packets, or encoding for itself) - kept so the benchmark compares designs in one run.
    mode: Literal["encode-once", "encode-once-sender", "per-spectator"] = "encode-once"
    bitrate_kbps: int = option(2000, min=100, max=50000)
    keyframe_interval_seconds: float = option(2.0, min=0.1, max=60)
    spectator_queue_packets: int = option(32, min=2)
    # x264 speed/quality trade-off for live streams (one encode per stream, so a slower preset is affordable).
    preset: Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium"] = "veryfast"
    # encode-once only: a second layer at half width and height, encoded once per stream too; each
    # spectator gets the layer its receiver's bandwidth estimate (REMB) can take, so a weak phone
    # does not force a low bitrate on everyone.
    low_layer: bool = False
    low_layer_bitrate_kbps: int = option(500, min=50, max=50000)
    # A live HLS rendition of each broadcast (hls_url): the same packets cut into MPEG-TS segments
    # at keyframes, for players and CDNs; no encode, nothing per viewer. Not in per-spectator mode.
    hls: bool = True
    hls_window_segments: int = option(6, min=3, max=60)
    # encode-once: "auto" sends each spectator's share of a frame through the compiled loop
    # (relay/media/_fastsend.c: one sendmmsg per frame) when it was built, else the Python loop;
    # "python" always uses the Python loop (a check on the compiled one, or to rule it out).
    send_loop: Literal["auto", "python"] = "auto"


def _blocked_words(key: str, value: Any) -> tuple[str, ...]:
    # Matched as whole words (or phrases) against the prompt, so each needs a letter or digit to anchor on.
    if not isinstance(value, (list, tuple)):
        _fail(key, "an array of words", value)
    words = []
    for i, word in enumerate(value):
        if not (isinstance(word, str) and any(c.isalnum() for c in word)):
            _fail(f"{key}[{i}]", "a word with at least one letter or digit", word)
        words.append(" ".join(word.split()))
    return tuple(words)


@dataclass(frozen=True)
class OrchestrationSettings:
    """Audience participation: the default mode and its knobs; the host changes them live per broadcast."""

    mode: Literal["host", "queue", "vote", "turns"] = "host"
    queue_interval_seconds: float = option(5.0, min=0.5, max=3600)
    queue_max: int = option(50, min=1, max=1000)
    vote_window_seconds: float = option(15.0, min=1, max=3600)
    max_candidates: int = option(10, min=1, max=100)
    turn_seconds: float = option(30.0, min=1, max=3600)
    max_prompt_chars: int = option(200, min=1, max=2000)  # 2000: what the host's own interact accepts
    blocked_words: tuple[str, ...] = option((), parse=_blocked_words)
    cooldown_seconds: float = option(3.0, min=0, max=3600)  # 0: no cooldown
    duplicate_window_seconds: float = option(30.0, min=0, max=86400)  # 0: duplicates allowed
    # Every message on a participant's socket takes a token; beyond the rate it is answered RATE_LIMITED.
    participant_messages_per_second: float = option(5.0, min=0.1, max=1000)
    participant_messages_burst: int = option(20, min=1, max=10000)
    votes_per_address: int = option(100, min=1, max=100000)  # votes counted per client address per window
    invite_only: bool = False  # only identities from the host's invites may input, vote or raise a hand


def _reactions(key: str, value: Any) -> tuple[str, ...]:
    # A small fixed set shown as buttons: each a short emoji sequence, no letters (no words smuggled in).
    if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= 12:
        _fail(key, "an array of 1 to 12 emoji", value)
    for i, emoji in enumerate(value):
        if not (isinstance(emoji, str) and 1 <= len(emoji) <= 8 and not any(c.isalnum() or c.isspace() for c in emoji)):
            _fail(f"{key}[{i}]", "one emoji (up to 8 code points, no letters or spaces)", emoji)
    if len(set(value)) != len(value):
        _fail(key, "distinct emoji", value)
    return tuple(value)


@dataclass(frozen=True)
class ChatSettings:
    """Chat and reactions on the events socket: moderated like inputs, with their own rate."""

    enabled: bool = True  # the host turns it off and on live per broadcast
    max_chars: int = option(200, min=1, max=1000)
    history: int = option(50, min=0, max=500)  # the last messages a joining participant is sent
    # Chat and reactions take these tokens, not the inputs' ([orchestration] participant_messages_*).
    messages_per_second: float = option(1.0, min=0.05, max=100)
    burst: int = option(5, min=1, max=1000)
    cooldown_seconds: float = option(0.0, min=0, max=3600)  # slow mode: a wait between one's messages (0 = off)
    # Messages the whole broadcast relays per second (a second's worth may come at once): each one goes to
    # every socket, so this, not the crowd's size, bounds what chat costs a socket (and its queue).
    broadcast_messages_per_second: float = option(20.0, min=1, max=1000)
    reactions: tuple[str, ...] = option(("\U0001F44D", "\u2764\ufe0f", "\U0001F602", "\U0001F62E",
                                         "\U0001F44F", "\U0001F525"), parse=_reactions)
    # Reactions reach everyone as counts, once per interval: a crowd's reactions cost O(1) per socket.
    reaction_interval_seconds: float = option(1.0, min=0.1, max=60)


@dataclass(frozen=True)
class RecordingsSettings:
    """Every stream leaves one recording in data_dir/recordings/<stream_id>/ (see relay/recordings.py)."""

    enabled: bool = True
    retention_days: float = option(30.0, min=0)  # 0 = keep forever
    preview_seconds: float = option(5.0, min=1, max=60)
    preview_width: int = option(320, even=True, min=16, max=1920)
    # Items waiting for a recorder's writer thread: past this the recording stops (failed), never the stream.
    writer_queue_packets: int = option(512, min=16)
    # How long a shared replay link (stream_ended's replay_url, when the host shares replays) stays valid.
    replay_link_seconds: float = option(86400.0, min=60, max=30 * 86400)
    # A live broadcast's thumbnail (og:image) is made again at most this often, however many ask.
    thumbnail_seconds: float = option(10.0, min=1, max=3600)


@dataclass(frozen=True)
class SimulationsSettings:
    """Offline script jobs: durable in data_dir/simulations.db, rendered by worker processes."""

    workers: int = option(1, min=1, max=64)  # worker processes, each renders and encodes one job at a time
    max_seconds: float = option(150.0, min=1, max=3600)  # longest script (its end entry's timestamp)
    max_retries: int = option(2, min=0, max=100)  # an interrupted job is retried this often, then failed
    poll_interval_seconds: float = option(0.5, min=0.01, max=60)
    # Offline renders favour speed: superfast is ~1.4x faster than veryfast at a small quality cost.
    encoder_preset: Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium"] = "superfast"
    # Retention: finished jobs (completed, failed, cancelled) are deleted this long after they finished
    # (0 = kept until max_finished_jobs pushes them out); active jobs never are.
    keep_days: float = option(7.0, min=0, max=3650)
    max_finished_jobs: int = option(1000, min=1, max=1_000_000)  # per API key: the oldest finished go first
    sweep_interval_seconds: float = option(3600.0, min=0.05, max=86400)  # how often retention runs (and at start)


def _redis_url(key: str, value: Any) -> str:
    url = _scalar(key, str, value, {})
    if url and not (urlsplit(url).scheme in ("redis", "rediss", "unix") and (urlsplit(url).netloc or urlsplit(url).path)):
        _fail(key, 'a Redis URL, e.g. "redis://127.0.0.1:6379/0" (or "" for a single node)', value)
    return url


def _node_id(key: str, value: Any) -> str:
    name = _scalar(key, str, value, {})
    if name and not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", name):
        _fail(key, 'up to 64 letters, digits, ".", "_" or "-" (or "" to derive it from public_url)', value)
    return name


@dataclass(frozen=True)
class ClusterSettings:
    """Several relay nodes sharing one Redis (relay/cluster/); an empty redis_url is a single node."""

    redis_url: str = option("", parse=_redis_url)
    node_id: str = option("", parse=_node_id)  # "" = derived from [server] public_url
    heartbeat_seconds: float = option(2.0, min=0.05, max=60)
    node_timeout_seconds: float = option(6.0, min=0.2, max=600)
    # A cluster edge (a node serving a broadcast whose origin is another node) drops its feed from
    # the origin this long after its last local spectator left (a quick rejoin finds it warm).
    edge_linger_seconds: float = option(5.0, min=0, max=3600)
    # A node asked for its part of a listing (or whether it holds a recording) answers within this, or
    # the listing is marked partial without it (the lookup: 503 NODE_UNAVAILABLE).
    fanout_timeout_seconds: float = option(2.0, min=0.05, max=60)
    # Connections this node opens to Redis at most; a call finding all busy waits (up to a beat, at most 2 s)
    # for one to free, then answers 503 CLUSTER_BUSY: a burst of joins queues instead of reading as Redis away.
    redis_max_connections: int = option(50, min=2, max=10000)

    @property
    def enabled(self) -> bool:
        return bool(self.redis_url)


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    world_model: WorldModelSettings = field(default_factory=WorldModelSettings)
    webrtc: WebRTCSettings = field(default_factory=WebRTCSettings)
    media: MediaSettings = field(default_factory=MediaSettings)
    recordings: RecordingsSettings = field(default_factory=RecordingsSettings)
    orchestration: OrchestrationSettings = field(default_factory=OrchestrationSettings)
    chat: ChatSettings = field(default_factory=ChatSettings)
    simulations: SimulationsSettings = field(default_factory=SimulationsSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Settings:
        """Settings from section -> key -> value, validated exactly as a file is."""
        settings = _build(cls, data)
        cluster = settings.cluster
        if cluster.enabled and not settings.server.public_url:
            raise ConfigError("server.public_url: required with cluster.redis_url (how the other nodes reach "
                              "this one)")
        if cluster.enabled and cluster.node_timeout_seconds <= cluster.heartbeat_seconds:
            _fail("cluster.node_timeout_seconds", f"more than cluster.heartbeat_seconds "
                  f"({cluster.heartbeat_seconds:g})", cluster.node_timeout_seconds)
        return settings


# ------------------------------------------------------------------------------------------- loading

def _read(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError(f"{os.fspath(path)}: config file not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{os.fspath(path)}: invalid TOML: {error}") from None
    except OSError as error:
        raise ConfigError(f"{os.fspath(path)}: cannot read config file: {error.strerror}") from None


def load_config(path: str | os.PathLike[str] | None = None, *,
                overrides: Mapping[str, Mapping[str, Any]] | None = None,
                environ: Mapping[str, str] | None = None) -> Settings:
    """The file's settings (defaults without one), then `overrides`, then RELAY_API_KEY; all validated.

    An override whose value is None is skipped, so the CLI can pass its unset flags through as they are.
    """
    data = _read(path) if path is not None else {}
    for section, values in (overrides or {}).items():
        base = data.get(section, {})
        if isinstance(base, Mapping):  # otherwise leave it for the validator to name
            data[section] = {**base, **{k: v for k, v in values.items() if v is not None}}
    settings = Settings.from_dict(data)
    if settings.world_model.kind == "hosted":
        hosted_api_key(settings, environ)  # missing: stop at start, naming the variable
    api_key = (os.environ if environ is None else environ).get("RELAY_API_KEY", "").strip()
    if api_key and api_key not in settings.auth.api_keys:
        settings = replace(settings, auth=replace(settings.auth, api_keys=(*settings.auth.api_keys, api_key)))
    return settings


def hosted_api_key(settings: Settings, environ: Mapping[str, str] | None = None) -> str:
    """The hosted API's key for `[world_model] kind = "hosted"`, from the variable `api_key_env` names."""
    name = settings.world_model.api_key_env
    key = (os.environ if environ is None else environ).get(name, "").strip()
    if not key:
        raise ConfigError(f'world_model.api_key_env: the environment variable {name} is not set; '
                          f'world_model.kind = "hosted" needs the hosted API key in it')
    return key
