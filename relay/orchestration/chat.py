"""A broadcast's chat and reactions: what participants say beside the stream, not to the world model.

Plain object, no timers, no I/O, like the orchestrator it leans on: a message passes the inputs'
moderation (`Orchestrator.moderate_chat`: blocks, the text rule, length, blocked words), then chat's own
cooldown (slow mode, off by default: the per-socket chat rate usually suffices), then the broadcast's
chat rate (each message goes to every socket: the crowd's total, not its size, bounds that; shared max-min
fairly between client addresses, so one address's hundred sockets cannot take it all), and then lives in
a bounded history a joiner is sent. Reactions are counted, not relayed one by one: `flush()` returns one
`reactions` event per interval with the counts, so a crowd's reactions cost each socket O(1) per interval.
The host clears a message (everyone's pages drop it) or turns chat off; the caller (Audience) sends the
events these methods return.
"""

from __future__ import annotations

import math
import uuid
from collections import Counter, deque
from typing import Any

from ..clock import Clock
from ..config import ChatSettings
from ..errors import not_found
from ..ratelimit import FairShare
from .orchestrator import Orchestrator

# Refusals explained in the reply, so a page can show a sentence rather than a code.
REASONS = {
    "chat_off": "The host has turned chat off.",
    "blocked": "The host has blocked you from taking part.",
    "unknown_participant": "Send hello first.",
    "too_long": "The message is too long.",
    "invalid_text": "The message contains characters that cannot be shown (control characters).",
    "empty": "The message is empty.",
    "blocked_word": "The message contains a word that is not allowed here.",
    "unknown_reaction": "That reaction is not offered here.",
    "cooldown": "Slow mode: wait a moment before your next message.",
    "chat_busy": "The chat is very busy: try again in a moment.",
}
COOLDOWNS_PRUNE_AT = 1000


def refusal(type_: str, reason: str, **extra: Any) -> dict[str, Any]:
    return {"type": type_, "status": "rejected", "reason": reason, "message": REASONS[reason], **extra}


class Chat:
    def __init__(self, settings: ChatSettings, clock: Clock, orchestrator: Orchestrator) -> None:
        self.settings = settings
        self.enabled = settings.enabled
        self._clock = clock
        self._orchestrator = orchestrator
        self._history: deque[dict[str, Any]] = deque(maxlen=settings.history)
        self._pending: Counter[str] = Counter()  # reactions since the last flush
        self._flushed_at = clock.monotonic()
        self._last_said: dict[str, float] = {}  # participant -> when their last message went out (slow mode)
        self._prune_at = COOLDOWNS_PRUNE_AT
        # Every message is sent to every socket: N people each at their own rate would cost N² sends,
        # so the broadcast as a whole relays at most this many a second, whatever the crowd; fairly
        # shared between addresses while contended (ratelimit.FairShare).
        rate = settings.broadcast_messages_per_second
        self._relayed = FairShare(clock, rate, max(1, int(rate)))

    def state(self) -> dict[str, Any]:
        """What a joiner needs: on or off, the reactions offered, the last messages (oldest first)."""
        return {"enabled": self.enabled, "reactions": list(self.settings.reactions), "max_chars": self.settings.max_chars,
                "history": list(self._history)}

    def say(self, participant_id: str, text: Any, *, address: str = "",
            addresses: int = 1) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """(the reply to the sender, the `chat` event for everyone or None when refused). ``address``: the
        client address of the sender's socket, among ``addresses`` with a socket open (the fair share)."""
        if not self.enabled:
            return refusal("chat_result", "chat_off"), None
        reason, text = self._orchestrator.moderate_chat(participant_id, text, self.settings.max_chars)
        if reason:
            return refusal("chat_result", reason), None
        wait = self._cooldown_left(participant_id)
        if wait > 0:
            return refusal("chat_result", "cooldown", retry_after=math.ceil(wait * 10) / 10), None
        wait = self._relayed.take(address, addresses)
        if wait:
            return refusal("chat_result", "chat_busy", code="RATE_LIMITED", retry_after=math.ceil(wait * 10) / 10), None
        self._said(participant_id)
        message = {"type": "chat", "message_id": uuid.uuid4().hex[:12], "participant_id": participant_id,
                   "name": self._orchestrator.participants.get(participant_id), "text": text,
                   "at": round(self._clock.time(), 3)}
        self._history.append(message)
        return {"type": "chat_result", "status": "sent", "message_id": message["message_id"]}, message

    def react(self, participant_id: str, emoji: Any) -> dict[str, Any]:
        """The reply; an accepted reaction is counted into the next `flush()`."""
        if not self.enabled:
            return refusal("reaction_result", "chat_off")
        if self._orchestrator.is_blocked(participant_id):
            return refusal("reaction_result", "blocked")
        if not self._orchestrator.is_present(participant_id):
            return refusal("reaction_result", "unknown_participant")
        if not isinstance(emoji, str) or emoji not in self.settings.reactions:
            return refusal("reaction_result", "unknown_reaction", reactions=list(self.settings.reactions))
        self._pending[emoji] += 1
        return {"type": "reaction_result", "status": "sent"}

    def flush(self) -> dict[str, Any] | None:
        """The `reactions` event (counts since the last one) once the interval has passed, else None."""
        now = self._clock.monotonic()
        if not self._pending or now - self._flushed_at < self.settings.reaction_interval_seconds:
            return None
        counts, self._pending = dict(self._pending), Counter()
        self._flushed_at = now
        return {"type": "reactions", "counts": counts}

    def _cooldown_left(self, participant_id: str) -> float:
        last = self._last_said.get(participant_id)
        if last is None:
            return 0.0
        return last + self.settings.cooldown_seconds - self._clock.monotonic()

    def _said(self, participant_id: str) -> None:
        if not self.settings.cooldown_seconds:
            return
        now = self._clock.monotonic()
        self._last_said[participant_id] = now
        # Outlives sockets (a resumed participant keeps its wait) but not the wait itself: pruned
        # once it grows, bounded by the people who spoke within one cooldown (amortized O(1)).
        if len(self._last_said) > self._prune_at:
            horizon = now - self.settings.cooldown_seconds
            self._last_said = {p: at for p, at in self._last_said.items() if at > horizon}
            self._prune_at = max(COOLDOWNS_PRUNE_AT, 2 * len(self._last_said))

    # -- the host ------------------------------------------------------------------------

    def clear(self, message_id: str) -> dict[str, Any]:
        """Remove a message from the history; the `chat_cleared` event for everyone. 404 if unknown
        (or already gone from the history: pages only hold what the history held)."""
        for message in self._history:
            if message["message_id"] == message_id:
                self._history.remove(message)
                return {"type": "chat_cleared", "message_id": message_id}
        raise not_found("message", message_id)

    def set_enabled(self, enabled: bool) -> dict[str, Any] | None:
        """The `chat_state` event for everyone when it changed, else None."""
        if enabled == self.enabled:
            return None
        self.enabled = enabled
        if not enabled:
            self._pending.clear()
        return {"type": "chat_state", "enabled": enabled}
