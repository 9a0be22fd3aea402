"""relay.config: defaults, the example file, every kind of error, overrides and the environment."""

import dataclasses
import tomllib
from pathlib import Path

import pytest

from relay.config import ConfigError, Settings, load_config

EXAMPLE = Path(__file__).resolve().parents[2] / "config.example.toml"


def error_for(data: dict) -> str:
    with pytest.raises(ConfigError) as caught:
        Settings.from_dict(data)
    return str(caught.value)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------ defaults

def test_defaults_match_the_contract():
    s = load_config(environ={})
    assert (s.server.host, s.server.port, s.server.public_url, s.server.data_dir) == ("127.0.0.1", 8080, "", "./data")
    assert (s.server.max_body_bytes, s.server.log_level) == (1048576, "info")
    assert s.auth.api_keys == ()
    assert dataclasses.astuple(s.limits)[:9] == (4, 5, 150, 3600, 40, 1000, 10, 600, 15)
    assert (s.limits.host_interacts_per_second, s.limits.host_interacts_burst, s.limits.participants_per_broadcast,
            s.limits.events_sockets_per_address, s.limits.events_flood_messages) == (10, 20, 1000, 100, 200)
    assert (s.limits.whep_offer_max_bytes, s.limits.whep_offer_max_candidates, s.limits.pending_whep_per_address,
            s.limits.whep_connect_seconds) == (32768, 64, 20, 10)
    assert (s.world_model.kind, s.world_model.width, s.world_model.height, s.world_model.fps) == \
        ("synthetic", 1280, 704, 25)
    assert s.webrtc.ice_servers == ()
    assert (s.media.mode, s.media.bitrate_kbps, s.media.keyframe_interval_seconds, s.media.spectator_queue_packets) == \
        ("encode-once", 2000, 2.0, 32)
    assert s == Settings() == Settings.from_dict({})


def test_example_file_loads_to_exactly_the_defaults():
    assert load_config(EXAMPLE, environ={}) == Settings()


def test_example_file_documents_every_key():
    documented = tomllib.loads(EXAMPLE.read_text())
    defaults = Settings()
    expected = {f.name: {g.name for g in dataclasses.fields(getattr(defaults, f.name))}
                for f in dataclasses.fields(Settings)}
    assert {section: set(keys) for section, keys in documented.items()} == expected


def test_sections_are_frozen_and_replaceable():
    s = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.limits.streamers = 9  # type: ignore[misc]
    shorter = dataclasses.replace(s.limits, stream_max_seconds=0.1)  # below the file's minimum: not re-validated
    assert shorter.stream_max_seconds == 0.1 and shorter.streamers == 4


def test_ints_are_accepted_for_floats_and_become_floats():
    s = Settings.from_dict({"limits": {"stream_max_seconds": 2}, "media": {"keyframe_interval_seconds": 1}})
    assert s.limits.stream_max_seconds == 2.0 and isinstance(s.limits.stream_max_seconds, float)
    assert isinstance(s.media.keyframe_interval_seconds, float)


def test_port_zero_means_any_free_port():
    assert Settings.from_dict({"server": {"port": 0}}).server.port == 0


def test_public_url_loses_its_trailing_slash():
    assert Settings.from_dict({"server": {"public_url": "https://relay.example.com/"}}).server.public_url == \
        "https://relay.example.com"
    assert Settings.from_dict({"server": {"public_url": "http://h:9/base"}}).server.public_url == "http://h:9/base"


# -------------------------------------------------------------------------------------------- errors

def test_unknown_section_names_it_and_suggests():
    assert error_for({"limitz": {}}) == 'limitz: unknown section (did you mean "limits"?)'
    assert error_for({"nonsense": {}}) == "nonsense: unknown section"


def test_unknown_key_names_it_and_suggests():
    assert error_for({"limits": {"streamrs": 4}}) == 'limits.streamrs: unknown key (did you mean "streamers"?)'


def test_wrong_type():
    assert error_for({"limits": {"streamers": "four"}}) == 'limits.streamers: expected an integer ≥ 1, got "four"'
    assert error_for({"server": {"host": 1}}).startswith("server.host: expected a non-empty string, got 1")
    assert error_for({"auth": {"api_keys": "k"}}) == 'auth.api_keys: expected an array of strings, got "k"'
    assert error_for({"limits": {"streamers": 2.0}}).startswith("limits.streamers: expected an integer")
    assert error_for({"limits": 4}) == "limits: expected a table, got 4"


def test_bool_is_not_an_int_nor_a_float():
    assert error_for({"server": {"port": True}}) == "server.port: expected an integer from 0 to 65535, got true"
    assert error_for({"limits": {"stream_max_seconds": False}}).startswith("limits.stream_max_seconds: expected")


@pytest.mark.parametrize("section, key, value, expected", [
    ("server", "port", 65536, "an integer from 0 to 65535"),
    ("server", "max_body_bytes", 1000, "an integer ≥ 1024"),
    ("limits", "streamers", 0, "an integer ≥ 1"),
    ("limits", "stream_max_seconds", 0.1, "a number ≥ 0.5"),
    ("limits", "stream_max_seconds", float("inf"), "a number ≥ 0.5"),
    ("limits", "spectators_per_broadcast", -1, "an integer ≥ 0"),
    ("world_model", "fps", 61, "an integer from 1 to 60"),
    ("media", "bitrate_kbps", 99, "an integer from 100 to 50000"),
    ("media", "spectator_queue_packets", 1, "an integer ≥ 2"),
    ("auth", "api_keys", ["ok", ""], None),
])
def test_out_of_range(section, key, value, expected):
    message = error_for({section: {key: value}})
    assert message.startswith(f"{section}.{key}")
    if expected:
        assert f"expected {expected}, got " in message


def test_odd_width():
    assert error_for({"world_model": {"width": 1281}}) == \
        "world_model.width: expected an even integer from 16 to 3840, got 1281"
    assert error_for({"world_model": {"height": 705}}).startswith("world_model.height: expected an even integer")


def test_bad_enum():
    assert error_for({"media": {"mode": "sfu"}}) == \
        'media.mode: expected one of "encode-once", "encode-once-sender", "per-spectator", got "sfu"'
    assert error_for({"world_model": {"kind": "magic"}}).startswith('world_model.kind: expected one of "synthetic"')
    assert error_for({"server": {"log_level": "loud"}}).startswith("server.log_level: expected one of")


def test_bad_public_url():
    for url in ("relay.example.com", "ftp://relay.example.com", "https://", "https://h/?q=1"):
        assert error_for({"server": {"public_url": url}}).startswith("server.public_url: expected an http")


@pytest.mark.parametrize("servers, key", [
    (["http://stun.example.com"], "webrtc.ice_servers[0]"),
    (["stun://stun.example.com"], "webrtc.ice_servers[0]"),
    (["stun:ok.example.com", "stun:"], "webrtc.ice_servers[1]"),
    ([{"urls": ["stun:ok", "udp:bad"]}], "webrtc.ice_servers[0].urls"),
    ([{"urls": []}], "webrtc.ice_servers[0].urls"),
    ([{"username": "u"}], "webrtc.ice_servers[0].urls"),
    (["turn:turn.example.com"], "webrtc.ice_servers[0]"),  # TURN without credentials: browsers throw
    ([{"urls": "stun:s", "username": 5}], "webrtc.ice_servers[0].username"),
    ([3], "webrtc.ice_servers[0]"),
    ("stun:s", "webrtc.ice_servers"),
])
def test_bad_ice_server(servers, key):
    assert error_for({"webrtc": {"ice_servers": servers}}).startswith(f"{key}: expected ")


def test_unknown_ice_server_key_suggests():
    assert error_for({"webrtc": {"ice_servers": [{"url": "stun:s"}]}}) == \
        'webrtc.ice_servers[0].url: unknown key (did you mean "urls"?)'


def test_bad_toml_names_the_file(tmp_path):
    path = write(tmp_path, "[limits]\nstreamers = \n")
    with pytest.raises(ConfigError, match=r"relay\.toml: invalid TOML: .*line 2"):
        load_config(path, environ={})


def test_missing_file_names_it(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.toml: config file not found"):
        load_config(tmp_path / "nope.toml", environ={})


def test_file_errors_name_the_key(tmp_path):
    path = write(tmp_path, '[world_model]\nwidth = 1281\n')
    with pytest.raises(ConfigError, match=r"^world_model\.width: "):
        load_config(path, environ={})


# ---------------------------------------------------------------------------- ice server normalization

def test_ice_servers_are_normalized_to_the_w3c_shape(tmp_path):
    path = write(tmp_path, """
[webrtc]
ice_servers = [
  "stun:stun.l.google.com:19302",
  { urls = "turn:turn.example.com:3478?transport=udp", username = "u", credential = "p" },
  { urls = ["stun:a.example.com", "turns:turn.example.com:443?transport=tcp"], username = "u", credential = "p" },
]
""")
    assert load_config(path, environ={}).webrtc.ice_servers == (
        {"urls": ["stun:stun.l.google.com:19302"]},
        {"urls": ["turn:turn.example.com:3478?transport=udp"], "username": "u", "credential": "p"},
        {"urls": ["stun:a.example.com", "turns:turn.example.com:443?transport=tcp"],
         "username": "u", "credential": "p"},
    )


# -------------------------------------------------------------------------- overrides and environment

def test_overrides_apply_on_top_of_the_file_and_are_validated(tmp_path):
    path = write(tmp_path, '[server]\nhost = "0.0.0.0"\nport = 9000\n[limits]\nstreamers = 2\n')
    s = load_config(path, overrides={"server": {"port": 0, "host": None}, "media": {"mode": "per-spectator"}},
                    environ={})
    assert (s.server.host, s.server.port, s.limits.streamers, s.media.mode) == ("0.0.0.0", 0, 2, "per-spectator")
    with pytest.raises(ConfigError, match=r"^server\.port: "):
        load_config(path, overrides={"server": {"port": -1}}, environ={})
    with pytest.raises(ConfigError, match=r"^server\.prot: unknown key"):
        load_config(overrides={"server": {"prot": 1}}, environ={})


def test_relay_api_key_is_appended_once():
    assert load_config(environ={"RELAY_API_KEY": "env-key"}).auth.api_keys == ("env-key",)
    assert load_config(environ={"RELAY_API_KEY": ""}).auth.api_keys == ()
    merged = load_config(overrides={"auth": {"api_keys": ["a", "env-key"]}}, environ={"RELAY_API_KEY": "env-key"})
    assert merged.auth.api_keys == ("a", "env-key")
    appended = load_config(overrides={"auth": {"api_keys": ["a"]}}, environ={"RELAY_API_KEY": "b"})
    assert appended.auth.api_keys == ("a", "b")


def test_environ_defaults_to_os_environ(monkeypatch):
    monkeypatch.setenv("RELAY_API_KEY", "from-os")
    assert load_config().auth.api_keys == ("from-os",)


# ------------------------------------------------------------------------------------- orchestration

def test_orchestration_defaults():
    o = Settings().orchestration
    assert dataclasses.asdict(o) == {
        "mode": "host", "queue_interval_seconds": 5.0, "queue_max": 50, "vote_window_seconds": 15.0,
        "max_candidates": 10, "turn_seconds": 30.0, "max_prompt_chars": 200, "blocked_words": (),
        "cooldown_seconds": 3.0, "duplicate_window_seconds": 30.0, "participant_messages_per_second": 5.0,
        "participant_messages_burst": 20, "votes_per_address": 100, "invite_only": False,
    }


def test_orchestration_blocked_words_are_trimmed_to_single_spaces():
    s = Settings.from_dict({"orchestration": {"mode": "vote", "blocked_words": ["  darn ", "big\t bad"]}})
    assert (s.orchestration.mode, s.orchestration.blocked_words) == ("vote", ("darn", "big bad"))


@pytest.mark.parametrize("key, value, message", [
    ("mode", "chaos", 'expected one of "host", "queue", "vote", "turns", got "chaos"'),
    ("queue_max", 0, "expected an integer from 1 to 1000, got 0"),
    ("queue_interval_seconds", 0.1, "expected a number from 0.5 to 3600, got 0.1"),
    ("max_prompt_chars", 2001, "expected an integer from 1 to 2000, got 2001"),
    ("cooldown_seconds", -1.5, "expected a number from 0 to 3600, got -1.5"),
    ("blocked_words", "darn", 'expected an array of words, got "darn"'),
])
def test_orchestration_out_of_range(key, value, message):
    assert error_for({"orchestration": {key: value}}) == f"orchestration.{key}: {message}"


def test_orchestration_blocked_word_needs_a_letter_or_digit():
    assert error_for({"orchestration": {"blocked_words": ["ok", " * "]}}) == \
        'orchestration.blocked_words[1]: expected a word with at least one letter or digit, got " * "'
    assert error_for({"orchestration": {"blocked_words": [3]}}).startswith("orchestration.blocked_words[0]: ")
