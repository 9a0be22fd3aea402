"""Script validation: a submission checked precisely, every problem a 422 naming the entry's index and
what is wrong, and what passes normalized (prompts NFC and stripped) into the script a job records."""

from __future__ import annotations

import base64
import binascii
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import RelayError, unprocessable
from ..inputs import text_problem

__all__ = ["MAX_ENTRIES", "MAX_PROMPT_CHARS", "MAX_SCRIPTS", "Script", "parse_request", "script_seconds",
           "validate_script"]

# A validated script: entries {timestamp_ms, start|interact|end}, as validate_script returns them.
Script = list[dict[str, Any]]

MAX_PROMPT_CHARS = 2000  # what the host's own interact accepts (relay/sessions.py)
MAX_ENTRIES = 1000  # per script
MAX_SCRIPTS = 10  # per batch job


def _bad(message: str, index: int | None, field_: str | None, reason: str,
         script_index: int | None, **more: Any) -> RelayError:
    details: dict[str, Any] = {}
    if script_index is not None:
        details["script_index"] = script_index
        message = f"scripts[{script_index}]: {message}"
    if index is not None:
        details["index"] = index
    if field_ is not None:
        details["field"] = field_
    details["reason"] = reason
    details.update(more)
    return unprocessable(message, **details)


def _prompt(value: Any, index: int, field_: str, script_index: int | None) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _bad(f"entry {index}: '{field_}' must be a non-empty string.", index, field_, "invalid_prompt",
                   script_index)
    if len(value) > MAX_PROMPT_CHARS:
        raise _bad(f"entry {index}: '{field_}' is longer than {MAX_PROMPT_CHARS} characters.", index, field_,
                   "prompt_too_long", script_index, limit=MAX_PROMPT_CHARS)
    problem = text_problem(value)  # the boundary's one text rule (relay.inputs), with the entry's index
    if problem is not None:
        raise _bad(f"entry {index}: '{field_}' contains {problem}.", index, field_, "invalid_text", script_index)
    return unicodedata.normalize("NFC", value).strip()


def _only(obj: Mapping[str, Any], allowed: Sequence[str], index: int, prefix: str,
          script_index: int | None) -> None:
    for key in obj:
        if key not in allowed:
            name = f"{prefix}{key}"
            raise _bad(f"entry {index}: unknown field '{name}'.", index, name, "unknown_field", script_index)


def validate_script(script: Any, max_seconds: float, script_index: int | None = None) -> Script:
    """A script, checked entry by entry and normalized (prompts stripped); RelayError 422 otherwise.

    Entries are ``{timestamp_ms, start: {prompt, image?}}`` (the first, at 0 ms, and only once),
    ``{timestamp_ms, interact: {prompt}}`` and ``{timestamp_ms, end: {}}`` (the last, and only last).
    Timestamps are non-negative integers and strictly increasing (two entries at the same millisecond
    would be one frame: say what you mean with one). The script lasts until its end: more than 0 ms,
    at most ``max_seconds``.
    """
    where = "script" if script_index is None else "scripts"
    if not isinstance(script, list):
        raise _bad("the script must be an array of entries.", None, where, "not_an_array", script_index)
    if not script:
        raise _bad("the script is empty: it needs a start and an end.", None, where, "empty", script_index)
    if len(script) > MAX_ENTRIES:
        raise _bad(f"the script has more than {MAX_ENTRIES} entries.", None, where, "too_many_entries",
                   script_index, limit=MAX_ENTRIES)
    limit_ms = int(round(max_seconds * 1000))
    out: list[dict[str, Any]] = []
    previous: int | None = None
    for index, entry in enumerate(script):
        if not isinstance(entry, dict):
            raise _bad(f"entry {index} must be an object.", index, None, "not_an_object", script_index)
        _only(entry, ("timestamp_ms", "start", "interact", "end"), index, "", script_index)
        ts = entry.get("timestamp_ms")
        if "timestamp_ms" not in entry:
            raise _bad(f"entry {index}: 'timestamp_ms' is missing.", index, "timestamp_ms", "missing_timestamp",
                       script_index)
        if not isinstance(ts, int) or isinstance(ts, bool) or ts < 0:
            raise _bad(f"entry {index}: 'timestamp_ms' must be a non-negative integer (milliseconds).", index,
                       "timestamp_ms", "invalid_timestamp", script_index)
        actions = [k for k in ("start", "interact", "end") if k in entry]
        if len(actions) != 1:
            reason = "no_action" if not actions else "several_actions"
            raise _bad(f"entry {index} must have exactly one of 'start', 'interact' or 'end'.", index, None,
                       reason, script_index)
        action = actions[0]
        body = entry[action]
        if not isinstance(body, dict):
            raise _bad(f"entry {index}: '{action}' must be an object.", index, action, "not_an_object",
                       script_index)
        if index == 0 and action != "start":
            raise _bad("the script must begin with a 'start' entry.", index, action, "start_not_first",
                       script_index)
        if index > 0 and action == "start":
            raise _bad(f"entry {index}: a script has exactly one 'start', the first entry.", index, "start",
                       "duplicate_start", script_index)
        if action == "end" and index != len(script) - 1:
            raise _bad(f"entry {index}: 'end' must be the last entry.", index, "end", "end_not_last", script_index)
        if index == len(script) - 1 and action != "end":
            raise _bad(f"entry {index}: the script must finish with an 'end' entry.", index, action,
                       "missing_end", script_index)
        if index == 0 and ts != 0:
            raise _bad("the 'start' entry must be at timestamp_ms 0.", index, "timestamp_ms", "start_not_at_zero",
                       script_index)
        if action == "end" and ts == 0:
            raise _bad(f"entry {index}: 'end' must come after the start (timestamp_ms > 0).", index, "timestamp_ms",
                       "end_not_after_start", script_index)
        if previous is not None and ts <= previous:
            raise _bad(f"entry {index}: timestamp_ms {ts} is not after the previous entry's {previous}.", index,
                       "timestamp_ms", "not_ascending", script_index)
        if ts > limit_ms:
            raise _bad(f"entry {index}: the script may last at most {max_seconds:g} s ({limit_ms} ms).", index,
                       "timestamp_ms", "too_long", script_index, limit_ms=limit_ms)
        previous = ts
        if action == "start":
            _only(body, ("prompt", "image"), index, "start.", script_index)
            normalized: dict[str, Any] = {"prompt": _prompt(body.get("prompt"), index, "start.prompt", script_index)}
            if body.get("image") is not None:
                normalized["image"] = _image(body["image"], index, script_index)
        elif action == "interact":
            _only(body, ("prompt",), index, "interact.", script_index)
            normalized = {"prompt": _prompt(body.get("prompt"), index, "interact.prompt", script_index)}
        else:
            _only(body, (), index, "end.", script_index)
            normalized = {}
        out.append({"timestamp_ms": ts, action: normalized})
    return out


def _image(value: Any, index: int, script_index: int | None) -> str:
    ok = isinstance(value, str)
    if ok:
        try:
            base64.b64decode(value.split(",", 1)[-1], validate=True)  # a data: URL or bare base64
        except (binascii.Error, ValueError):
            ok = False
    if not ok:
        raise _bad(f"entry {index}: 'start.image' must be a base64 string (or a data: URL).", index, "start.image",
                   "invalid_image", script_index)
    return value


def parse_request(body: Mapping[str, Any], max_seconds: float) -> tuple[list[Script], bool]:
    """``{script, portrait?}`` or ``{scripts: [...], portrait?}`` -> (scripts, portrait); 422 otherwise."""
    for key in body:
        if key not in ("script", "scripts", "portrait"):
            raise _bad(f"unknown field '{key}'.", None, key, "unknown_field", None)
    if ("script" in body) == ("scripts" in body):
        raise _bad("send exactly one of 'script' (one stream) or 'scripts' (a batch, one stream each).", None,
                   "script", "missing" if "script" not in body else "both", None)
    portrait = body.get("portrait", False)
    if not isinstance(portrait, bool):
        raise _bad("'portrait' must be true or false.", None, "portrait", "not_a_boolean", None)
    if "script" in body:
        return [validate_script(body["script"], max_seconds)], portrait
    scripts = body["scripts"]
    if not isinstance(scripts, list) or not scripts:
        raise _bad("'scripts' must be a non-empty array of scripts.", None, "scripts", "empty", None)
    if len(scripts) > MAX_SCRIPTS:
        raise _bad(f"a batch holds at most {MAX_SCRIPTS} scripts.", None, "scripts", "too_many_scripts", None,
                   limit=MAX_SCRIPTS)
    return [validate_script(s, max_seconds, i) for i, s in enumerate(scripts)], portrait


def script_seconds(script: Script) -> float:
    return script[-1]["timestamp_ms"] / 1000

