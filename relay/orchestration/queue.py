"""queue: first in, first out; one input forwarded every `queue_interval_seconds`."""

from __future__ import annotations

import itertools

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from .policies import STATE_LIST_MAX, Forward, InputResult, NameOf, Policy, person, rejected


@dataclass(frozen=True)
class _Entry:
    participant_id: str
    prompt: str
    key: str


class QueuePolicy(Policy):
    mode = "queue"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # by participant: one waiting entry each
        self._last_forward: float | None = None

    def gate(self, participant_id: str) -> str | None:
        return "already_queued" if participant_id in self._entries else None

    def mentions(self, participant_id: str) -> bool:
        return participant_id in self._entries

    def is_pending(self, key: str) -> bool:
        return any(entry.key == key for entry in self._entries.values())

    def submit(self, participant_id: str, prompt: str, key: str) -> InputResult:
        # A lowered queue_max keeps the entries already accepted; it only refuses new ones.
        if len(self._entries) >= self.settings.queue_max:
            return rejected("queue_full")
        self._entries[participant_id] = _Entry(participant_id, prompt, key)
        self._changed()
        return InputResult("queued")

    def tick(self) -> list[Forward]:
        if not self._entries:
            return []
        now = self.clock.monotonic()
        if self._last_forward is not None and now - self._last_forward < self.settings.queue_interval_seconds:
            return []
        _, entry = self._entries.popitem(last=False)
        self._last_forward = now
        self._changed()
        return [Forward(entry.prompt, entry.participant_id, self.mode)]

    def reset(self) -> None:
        self._entries.clear()  # the interval since the last forward still holds if the queue comes back
        self._changed()

    def remove(self, participant_id: str, *, purge: bool = False) -> None:
        if self._entries.pop(participant_id, None) is not None:
            self._changed()

    def state(self, name_of: NameOf) -> dict[str, Any]:
        # The head of the queue only: the state goes to every participant several times a second.
        shown = itertools.islice(self._entries.values(), STATE_LIST_MAX)
        return {"queue": [{**person(e.participant_id, name_of), "prompt": e.prompt} for e in shown],
                "queue_length": len(self._entries)}
