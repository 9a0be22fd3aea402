"""turns: participants raise hands; the holder's inputs go straight through for `turn_seconds`.

The turn passes to the next raised hand when it expires, is released, is revoked by the host, or
its holder leaves or is blocked. A changed `turn_seconds` applies from the next turn. The next hand is
the earliest raised from the client address that held a turn least recently (never first): hands are
served round-robin between addresses, so a hundred sockets behind one address that raised first take
every other turn at most, not the next hundred.
"""

from __future__ import annotations

import itertools

from collections import OrderedDict
from typing import Any

from ..clock import iso
from .policies import STATE_LIST_MAX, Forward, InputResult, NameOf, Policy, person, rejected

SERVED_KEPT = 1000  # addresses remembered for the round-robin


class TurnsPolicy(Policy):
    mode = "turns"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._hands: OrderedDict[str, None] = OrderedDict()  # in the order raised
        # Client addresses by when they last held a turn, least recent first (the round-robin); bounded,
        # and an address forgotten ranks as never served, which is where the oldest ones stood anyway.
        self._served: OrderedDict[str | None, None] = OrderedDict()
        self.holder: str | None = None
        self._ends: float | None = None
        self._ends_wall: float | None = None

    def gate(self, participant_id: str) -> str | None:
        return None if participant_id == self.holder else "not_your_turn"

    def mentions(self, participant_id: str) -> bool:
        return participant_id == self.holder or participant_id in self._hands

    def submit(self, participant_id: str, prompt: str, key: str) -> InputResult:
        return InputResult("forwarded", forward=Forward(prompt, participant_id, self.mode))

    def raise_hand(self, participant_id: str) -> InputResult:
        if participant_id == self.holder:
            return rejected("has_turn")
        if participant_id in self._hands:
            return rejected("already_raised")
        self._hands[participant_id] = None
        self._changed()
        if self.holder is None:
            self._next()
        return InputResult("raised")

    def release(self, participant_id: str) -> InputResult:
        """The holder ends their turn early; someone still waiting lowers their hand."""
        if participant_id == self.holder:
            self._next()
        elif participant_id in self._hands:
            del self._hands[participant_id]
            self._changed()
        else:
            return rejected("not_your_turn")
        return InputResult("released")

    def grant(self, participant_id: str) -> None:
        self._hands.pop(participant_id, None)
        self._start(participant_id)

    def revoke(self) -> str | None:
        """End the current turn (the next hand gets it); returns who held it."""
        holder = self.holder
        if holder is not None:
            self._next()
        return holder

    def settle(self) -> list[Forward]:
        if self.holder is not None and self._ends is not None and self.clock.monotonic() >= self._ends:
            self._next()
        return []

    def reset(self) -> None:
        self._hands.clear()
        self.holder = self._ends = self._ends_wall = None
        self._changed()

    def remove(self, participant_id: str, *, purge: bool = False) -> None:
        if participant_id in self._hands:
            del self._hands[participant_id]
            self._changed()
        if participant_id == self.holder:
            self._next()

    def _next(self) -> None:
        if self._hands:
            rank = {address: i for i, address in enumerate(self._served)}
            participant_id = min(self._hands, key=lambda p: rank.get(self.address_of(p), -1))  # earliest of ties
            del self._hands[participant_id]
            self._start(participant_id)
        else:
            self.holder = self._ends = self._ends_wall = None
            self._changed()

    def _start(self, participant_id: str) -> None:
        seconds = self.settings.turn_seconds
        self.holder = participant_id
        address = self.address_of(participant_id)
        self._served.pop(address, None)
        self._served[address] = None
        while len(self._served) > SERVED_KEPT:
            self._served.popitem(last=False)
        self._ends = self.clock.monotonic() + seconds
        self._ends_wall = self.clock.time() + seconds
        self._changed()

    def state(self, name_of: NameOf) -> dict[str, Any]:
        return {"turn": {
            "holder": person(self.holder, name_of) if self.holder is not None else None,
            "ends_at": iso(self._ends_wall),
            "hands": [person(p, name_of) for p in itertools.islice(self._hands, STATE_LIST_MAX)],
            "hands_count": len(self._hands),
        }}
