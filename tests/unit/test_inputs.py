"""relay.inputs: the JSON parser's bounds and the one text rule; the recorder's log takes any string."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.errors import RelayError
from relay.inputs import check_text, json_depth, parse_json, text_problem
from relay.media.recorder import EVENTS_FILE, StreamRecorder
from tests.unit.test_recorder import FPS, H, W, encode


def nesting(value) -> int:
    if isinstance(value, list):
        return 1 + max((nesting(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((nesting(v) for v in value.values()), default=0)
    return 0


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.sampled_from('[]{}"\\ab\u00e9\u2603')),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(alphabet='[]{}"\\k', max_size=3), inner,
                                                                max_size=3),
    max_leaves=30)


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_depth_counts_containers_not_brackets_in_strings(value):
    raw = json.dumps(value, ensure_ascii=False).encode()
    assert json_depth(raw) == nesting(value)
    assert parse_json(raw, max_depth=nesting(value)) == value
    if nesting(value) > 0:
        with pytest.raises(RelayError) as info:
            parse_json(raw, max_depth=nesting(value) - 1)
        assert info.value.status == 400 and info.value.details["limit"] == nesting(value) - 1


def test_a_megabyte_of_brackets_is_refused_in_milliseconds():
    for raw in (b"[" * 1_000_000, b"[" * 500_000 + b"]" * 500_000, b'{"a":' * 200_000):
        start = time.thread_time()
        with pytest.raises(RelayError) as info:
            parse_json(raw, 32)
        assert info.value.status == 400 and "deeper than 32" in info.value.message
        assert time.thread_time() - start < 0.5


def test_unterminated_strings_cost_one_pass():
    """Each quote of 'a\\"' repeated once started a scan to the end: 90 KB took 14 s."""
    for raw in (b'"' + b'a\\"' * 300_000, b'"\\' * 500_000, b'["' + b'[' * 900_000):
        start = time.thread_time()
        with pytest.raises(RelayError) as info:
            parse_json(raw, 32)
        assert info.value.status == 400
        assert time.thread_time() - start < 0.5


@pytest.mark.parametrize("raw", ["1e999999", "-1e400", "[NaN]", '{"a": Infinity}', "1" * 101, "0." + "1" * 200,
                                 "9" * 100_000])
def test_numbers_must_be_finite_and_short(raw):
    with pytest.raises(RelayError) as info:
        parse_json(raw, 32)
    assert info.value.status == 400 and info.value.code == "INVALID_REQUEST"


def test_ordinary_numbers_and_text_pass():
    assert parse_json('{"n": 12, "x": -1.5e3, "s": "\\u00e9\\ud83d\\ude00", "big": %s}' % ("9" * 100), 32) == \
        {"n": 12, "x": -1500.0, "s": "\u00e9\U0001f600", "big": int("9" * 100)}


@pytest.mark.parametrize("text, multiline, problem", [
    ("a dragon \U0001f409", True, None),
    ("line one\nline two\ttab\r\n", True, None),
    ("one line\n", False, "a control character (U+000A) at position 8"),
    ("x\ud800", True, "a lone surrogate (U+D800) at position 1"),
    ("\udc00", False, "a lone surrogate (U+DC00) at position 0"),
    ("nul\x00", True, "a control character (U+0000) at position 3"),
    ("c1\x9b", True, "a control character (U+009B) at position 2"),
    ("\u202eright-to-left", True, None),  # format characters are the moderation's business, not storage's
])
def test_text_rule(text, multiline, problem):
    assert text_problem(text, multiline=multiline) == problem


def test_check_text_normalizes_or_refuses_with_the_field():
    assert check_text("Zoe\u0301", "name") == "Zo\u00e9"
    with pytest.raises(RelayError) as info:
        check_text("a\ud800", "prompt")
    assert info.value.status == 422 and info.value.code == "INVALID_REQUEST"
    assert info.value.details == {"field": "prompt", "reason": "invalid_text"}


def test_the_events_log_writes_any_string(tmp_path):
    """Second line of defence: text no encoder takes is written as its JSON escape, not a failed recording."""
    rec = StreamRecorder(tmp_path / "s1", stream_id="s1", width=W, height=H, fps=FPS, owner="o")
    packets = encode(10)
    rec.write(packets[0], True)
    rec.log_event({"type": "prompt_applied", "prompt": "a \ud800 b \udfff", "name": "\x00\U0001f600"})
    for packet in packets[1:]:
        rec.write(packet, packet.is_keyframe)
    result = rec.close("ended")
    assert rec.error is None, rec.error
    lines = (tmp_path / "s1" / EVENTS_FILE).read_text(encoding="utf-8").splitlines()
    events = [json.loads(line) for line in lines]
    assert events[0]["prompt"] == "a \ud800 b \udfff" and events[0]["name"] == "\x00\U0001f600"
    assert events[-1]["type"] == "stream_ended" and result.status == "complete" and result.frame_count == 10
