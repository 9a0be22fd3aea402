"""Moderation: the checks every participant input passes before any policy sees it.

Content checks (empty, too long, blocked words) cost nothing to the participant; only an accepted input
starts their cooldown. Duplicates are judged on a normalized key (Unicode NFKC, case-folded, invisible
format characters dropped, whitespace collapsed), the same key the vote policy merges candidates on.
"""

from __future__ import annotations

import re
import unicodedata
from collections import OrderedDict
from collections.abc import Iterable

from ..clock import Clock
from ..config import OrchestrationSettings
from ..inputs import text_problem

# Forwarded prompts remembered for duplicate suppression; a few per second at most are forwarded, so
# this only bites if the window is very long, and then forgets the oldest first.
RECENT_MAX = 1000
COOLDOWNS_PRUNE_AT = 1000
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # Unicode category Cc


def clean(prompt: str) -> str:
    """The prompt as forwarded: NFC, control characters and runs of whitespace become one space, ends trimmed."""
    return " ".join(_CONTROL.sub(" ", unicodedata.normalize("NFC", prompt)).split())


def normalize(text: str) -> str:
    """The key two prompts are 'the same' on: 'Add a  DRAGON' == 'add a dragon'; zero-width tricks undone."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(c for c in text if unicodedata.category(c) != "Cf")
    return " ".join(text.split())


def blocked_words_pattern(words: Iterable[str]) -> re.Pattern[str] | None:
    """One regex matching any of the words or phrases as whole words in a normalized text.

    `\\w` is Unicode-aware, so 'ass' does not match inside 'class' nor 'été' inside 'étés'.
    """
    keys = sorted({normalize(w) for w in words} - {""}, key=len, reverse=True)
    if not keys:
        return None
    return re.compile(r"(?<!\w)(?:" + "|".join(re.escape(k) for k in keys) + r")(?!\w)")


class Moderator:
    """Per-broadcast moderation state: cooldowns and recently forwarded prompts; blocking is the facade's."""

    def __init__(self, clock: Clock, settings: OrchestrationSettings) -> None:
        self._clock = clock
        self._last_accepted: dict[str, float] = {}
        self._prune_at = COOLDOWNS_PRUNE_AT
        self._recent: OrderedDict[str, float] = OrderedDict()  # normalized prompt -> forwarded at
        self.settings = settings

    @property
    def settings(self) -> OrchestrationSettings:
        return self._settings

    @settings.setter
    def settings(self, settings: OrchestrationSettings) -> None:
        self._settings = settings
        self._blocked = blocked_words_pattern(settings.blocked_words)

    def raw_problem(self, prompt: str, max_chars: int | None = None) -> str | None:
        """The rejection reason for the prompt as sent, before cleaning: far too long (refused without
        looking: a megabyte of spaces costs nothing), or text the relay cannot keep (the boundary's one
        rule, relay.inputs: a lone surrogate, or a control character other than tab and line breaks).
        ``max_chars`` is a chat message's limit instead of the prompts'."""
        if len(prompt) > 4 * (max_chars or self._settings.max_prompt_chars) + 64:
            return "too_long"
        if text_problem(prompt) is not None:
            return "invalid_text"
        return None

    def check_content(self, prompt: str, max_chars: int | None = None) -> str | None:
        """The rejection reason for this (cleaned) prompt's (or chat message's) content, or None."""
        if not prompt:
            return "empty"
        if len(prompt) > (max_chars or self._settings.max_prompt_chars):
            return "too_long"
        if self._blocked is not None and self._blocked.search(normalize(prompt)):
            return "blocked_word"
        return None

    def cooldown_left(self, participant_id: str) -> float:
        last = self._last_accepted.get(participant_id)
        if last is None:
            return 0.0
        return max(0.0, last + self._settings.cooldown_seconds - self._clock.monotonic())

    def is_duplicate(self, key: str) -> bool:
        """Whether a prompt with this normalized key was forwarded within the duplicate window."""
        self._forget_old()
        return key in self._recent

    def accepted(self, participant_id: str) -> None:
        now = self._clock.monotonic()
        self._last_accepted[participant_id] = now
        # Cooldowns outlive sockets (a participant may come back with its resume token), so
        # they are forgotten when they run out, not when someone leaves: bounded by the
        # number of people who prompted within one cooldown.
        if len(self._last_accepted) > self._prune_at:
            horizon = now - self._settings.cooldown_seconds
            self._last_accepted = {p: at for p, at in self._last_accepted.items() if at > horizon}
            self._prune_at = max(COOLDOWNS_PRUNE_AT, 2 * len(self._last_accepted))  # amortized O(1)

    def forwarded(self, key: str) -> None:
        self._recent.pop(key, None)
        self._recent[key] = self._clock.monotonic()
        while len(self._recent) > RECENT_MAX:
            self._recent.popitem(last=False)

    def _forget_old(self) -> None:
        horizon = self._clock.monotonic() - self._settings.duplicate_window_seconds
        while self._recent:
            key, at = next(iter(self._recent.items()))
            if at > horizon:
                break
            del self._recent[key]
