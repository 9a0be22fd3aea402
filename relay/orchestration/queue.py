"""queue: first in, first out; one input forwarded every `queue_interval_seconds`.

One waiting entry per participant, `queue_max` in all; past half full, one client address holds at most
its share (policies.past_share): a crowd of sockets behind one address cannot fill the queue, and an
input past it is refused "rate_limited" until a place frees (retry_after: one queue interval).
"""

from __future__ import annotations

import itertools
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any

from .policies import STATE_LIST_MAX, Forward, InputResult, NameOf, Policy, past_share, person, rejected


@dataclass(frozen=True)
class _Entry:
    participant_id: str
    prompt: str
    key: str
    address: str | None  # the client address it counts against


class QueuePolicy(Policy):
    mode = "queue"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # by participant: one waiting entry each
        self._by_address: Counter[str | None] = Counter()  # waiting entries per client address
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
        address = self.address_of(participant_id)
        if address is not None and past_share(self._by_address[address], len(self._entries),
                                              self.settings.queue_max, self.addresses()):
            return rejected("rate_limited", retry_after=self.settings.queue_interval_seconds)
        self._entries[participant_id] = _Entry(participant_id, prompt, key, address)
        self._by_address[address] += 1
        self._changed()
        return InputResult("queued")

    def tick(self) -> list[Forward]:
        if not self._entries:
            return []
        now = self.clock.monotonic()
        if self._last_forward is not None and now - self._last_forward < self.settings.queue_interval_seconds:
            return []
        _, entry = self._entries.popitem(last=False)
        self._left(entry)
        self._last_forward = now
        self._changed()
        return [Forward(entry.prompt, entry.participant_id, self.mode)]

    def reset(self) -> None:
        self._entries.clear()  # the interval since the last forward still holds if the queue comes back
        self._by_address.clear()
        self._changed()

    def remove(self, participant_id: str, *, purge: bool = False) -> None:
        entry = self._entries.pop(participant_id, None)
        if entry is not None:
            self._left(entry)
            self._changed()

    def _left(self, entry: _Entry) -> None:
        self._by_address[entry.address] -= 1
        if not self._by_address[entry.address]:
            del self._by_address[entry.address]

    def state(self, name_of: NameOf) -> dict[str, Any]:
        # The head of the queue only: the state goes to every participant several times a second.
        shown = itertools.islice(self._entries.values(), STATE_LIST_MAX)
        return {"queue": [{**person(e.participant_id, name_of), "prompt": e.prompt} for e in shown],
                "queue_length": len(self._entries)}
