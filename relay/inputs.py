"""The boundary rules for what a stranger sends: JSON that parses in bounded time and space, and text
the relay can store, log and send on.

``parse_json`` is every REST body's and every socket message's parser. ``text_problem``/``check_text``
is the one text rule, applied wherever text enters (prompts, display names, simulation scripts).
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from array import array
from itertools import accumulate
from typing import Any

from .errors import invalid_request, unprocessable

# Digits in one JSON number. A real number in this API has a few; Python's own int limit (4,300
# digits) would raise mid-parse, and a float of any length silently becomes inf.
MAX_NUMBER_CHARS = 100

# A JSON string, escapes included (the unrolled form: no backtracking). An unterminated one runs to the
# end of the input: otherwise every later quote would start a new scan to the end (quadratic time on
# 'a\\"' repeated). On UTF-8 bytes a '"' or '\\' byte is always that character, so this is exact.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)
# Brackets as +1/-1 (signed bytes), everything else deleted.
_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")


class _NumberTooLarge(ValueError):
    pass


def json_depth(raw: bytes) -> int:
    """How deep ``raw``'s arrays and objects nest (brackets inside strings do not count), in linear time.

    Only C loops (regex, translate, accumulate): a megabyte of '[' costs milliseconds, not the
    recursion the parser would need.
    """
    steps = array("b", _STRING.sub(b"", raw).translate(_STEPS, _NOT_BRACKETS))
    return max(accumulate(steps), default=0)


def _int(text: str) -> int:
    if len(text) > MAX_NUMBER_CHARS:
        raise _NumberTooLarge(f"a number has more than {MAX_NUMBER_CHARS} digits")
    return int(text)


def _float(text: str) -> float:
    value = float(text) if len(text) <= MAX_NUMBER_CHARS else math.inf
    if not math.isfinite(value):
        raise _NumberTooLarge(f"the number {text[:20]}{'...' if len(text) > 20 else ''} is out of range")
    return value


def _constant(name: str) -> Any:
    raise _NumberTooLarge(f"{name} is not JSON")


def parse_json(raw: str | bytes, max_depth: int) -> Any:
    """The JSON value in ``raw``; RelayError 400 INVALID_REQUEST when it is not JSON, nests deeper than
    ``max_depth``, or holds a number that is not a finite, reasonably sized one (NaN, 1e999999, 10^5 digits).
    """
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    # Fewer openers than the limit cannot nest past it: the common case skips the scan.
    if data.count(b"[") + data.count(b"{") > max_depth and json_depth(data) > max_depth:
        raise invalid_request(f"The JSON nests deeper than {max_depth} levels.", limit=max_depth)
    try:
        # UTF-8 only (RFC 8259), decoded here: json.loads would sniff UTF-16/32 from bytes, which the
        # depth scan above does not read, so such a body could nest past it unseen.
        text = raw if isinstance(raw, str) else data.decode("utf-8")
        return json.loads(text, parse_int=_int, parse_float=_float, parse_constant=_constant)
    except _NumberTooLarge as exc:
        raise invalid_request(f"The JSON is not accepted: {exc}.", limit_digits=MAX_NUMBER_CHARS) from None
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise invalid_request(f"Not valid JSON: {exc}.") from None


# -- text ----------------------------------------------------------------------------------------

# Lone surrogates (JSON's "\ud800" decodes to one; no encoder will write it) and control characters
# (Unicode Cc). Multi-line fields may carry tab, newline and carriage return; one-line fields none.
_BAD_MULTILINE = re.compile("[\ud800-\udfff\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_BAD_LINE = re.compile("[\ud800-\udfff\x00-\x1f\x7f-\x9f]")


def text_problem(text: str, *, multiline: bool = True) -> str | None:
    """What makes ``text`` unacceptable (a lone surrogate, a control character), or None."""
    found = (_BAD_MULTILINE if multiline else _BAD_LINE).search(text)
    if found is None:
        return None
    char = found.group()
    kind = "a lone surrogate" if "\ud800" <= char <= "\udfff" else "a control character"
    return f"{kind} (U+{ord(char):04X}) at position {found.start()}"


def check_text(text: str, field: str, *, multiline: bool = True) -> str:
    """``text`` NFC-normalized; RelayError 422 INVALID_REQUEST (details ``field``, ``reason: invalid_text``)
    when it carries a lone surrogate or a control character."""
    problem = text_problem(text, multiline=multiline)
    if problem is not None:
        raise unprocessable(f"'{field}' contains {problem}.", field=field, reason="invalid_text")
    return unicodedata.normalize("NFC", text)
