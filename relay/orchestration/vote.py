"""vote: inputs become candidates during a window; when it closes, the most voted one is forwarded.

- The window opens with the first accepted input while none is open, and lasts `vote_window_seconds`
  (a changed setting applies from the next window).
- Proposing is supporting: the author's vote moves to their new candidate. One candidate per
  participant per window ("already_proposed"), at most `max_candidates` ("too_many_candidates").
- An input identical (normalized) to a candidate is a vote for that candidate, not a new one.
- Each participant has one vote and may move it. Votes of participants who leave are dropped (a
  reconnecting spectator gets a new participant id and could otherwise vote twice); their candidates stay.
- Votes per client address are capped per window (`votes_per_address`): one address behind which a
  crowd of sockets sits counts as at most that many voters; beyond it a vote (or an input, which is a
  vote too) is refused "rate_limited" until the window closes. Generous by default: a classroom shares
  one address.
- Candidates are shared the same way: past half of `max_candidates`, one address proposes at most its
  share (policies.past_share), so one address's sockets cannot fill the ballot; refused "rate_limited".
- At the close: most votes wins, ties go to the earliest candidate; a window with no candidate, or
  whose candidates all lost their votes, forwards nothing. The next window opens on the next input.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from ..clock import iso
from .policies import Forward, InputResult, NameOf, Policy, past_share, rejected

_ID = re.compile(r"c([0-9]+)")


@dataclass(frozen=True)
class _Candidate:
    candidate_id: str
    prompt: str
    key: str
    author: str
    address: str | None  # the author's client address (the candidates' shares)


class VotePolicy(Policy):
    mode = "vote"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._candidates: dict[str, _Candidate] = {}  # insertion order = age, which breaks ties
        self._votes: dict[str, str] = {}  # participant -> candidate_id
        self._tally: Counter[str] = Counter()
        self._voter_address: dict[str, str] = {}  # participant -> the address their vote counts against
        self._by_address: Counter[str] = Counter()  # votes held per address
        self._ends: float | None = None  # monotonic; None: no window open
        self._ends_wall: float | None = None
        self._issued = 0
        self._window_first = 1  # the first candidate number of the current (or next) window

    @property
    def window_open(self) -> bool:
        return self._ends is not None

    def is_pending(self, key: str) -> bool:
        return False  # an identical input merges into a vote instead

    def submit(self, participant_id: str, prompt: str, key: str) -> InputResult:
        if self._address_full(participant_id):
            return self._address_refusal()
        same = next((c for c in self._candidates.values() if c.key == key), None)
        if same is not None:
            self._cast(participant_id, same.candidate_id)
            return InputResult("candidate", candidate_id=same.candidate_id)
        if any(c.author == participant_id for c in self._candidates.values()):
            return rejected("already_proposed")
        if len(self._candidates) >= self.settings.max_candidates:
            return rejected("too_many_candidates")
        address = self.address_of(participant_id)
        if address is not None and past_share(sum(c.address == address for c in self._candidates.values()),
                                              len(self._candidates), self.settings.max_candidates,
                                              self.addresses()):
            return self._address_refusal()
        if not self.window_open:
            seconds = self.settings.vote_window_seconds
            self._ends = self.clock.monotonic() + seconds
            self._ends_wall = self.clock.time() + seconds
        self._issued += 1
        candidate = _Candidate(f"c{self._issued}", prompt, key, participant_id, address)
        self._candidates[candidate.candidate_id] = candidate
        self._cast(participant_id, candidate.candidate_id)
        self._changed()
        return InputResult("candidate", candidate_id=candidate.candidate_id)

    def vote(self, participant_id: str, candidate_id: Any) -> InputResult:
        if isinstance(candidate_id, str) and candidate_id in self._candidates:
            if self._address_full(participant_id):
                return self._address_refusal()
            self._cast(participant_id, candidate_id)
            return InputResult("voted", candidate_id=candidate_id)
        match = _ID.fullmatch(candidate_id) if isinstance(candidate_id, str) else None
        if not self.window_open or (match and int(match[1]) < self._window_first):
            return rejected("window_closed")
        return rejected("unknown_candidate")

    def _address_full(self, participant_id: str) -> bool:
        """A new voter whose address already holds its share of this window's votes (moving a vote is free)."""
        address = self.address_of(participant_id)
        return (participant_id not in self._votes and address is not None
                and self._by_address[address] >= self.settings.votes_per_address)

    def _address_refusal(self) -> InputResult:
        left = self._ends - self.clock.monotonic() if self._ends is not None else 0.0
        return rejected("rate_limited", retry_after=max(0.1, left))

    def _drop_vote(self, participant_id: str) -> str | None:
        address = self._voter_address.pop(participant_id, None)
        if address is not None:
            self._by_address[address] -= 1
            if not self._by_address[address]:
                del self._by_address[address]
        return self._votes.pop(participant_id, None)

    def _cast(self, participant_id: str, candidate_id: str) -> None:
        previous = self._votes.get(participant_id)
        if previous == candidate_id:
            return
        if previous is not None:
            self._tally[previous] -= 1
        else:
            address = self.address_of(participant_id)
            if address is not None:
                self._voter_address[participant_id] = address
                self._by_address[address] += 1
        self._votes[participant_id] = candidate_id
        self._tally[candidate_id] += 1
        self._changed()

    def settle(self) -> list[Forward]:
        if self._ends is None or self.clock.monotonic() < self._ends:
            return []
        winner = None
        for candidate in self._candidates.values():  # oldest first: a later one must beat, not tie
            if self._tally[candidate.candidate_id] > (self._tally[winner.candidate_id] if winner else 0):
                winner = candidate
        self.reset()
        return [Forward(winner.prompt, winner.author, self.mode)] if winner else []

    def reset(self) -> None:
        """Close the window without forwarding anything; candidate ids keep counting, so a stale one
        never votes for a later window's candidate."""
        self._candidates.clear()
        self._votes.clear()
        self._tally.clear()
        self._voter_address.clear()
        self._by_address.clear()
        self._ends = self._ends_wall = None
        self._window_first = self._issued + 1
        self._changed()

    def remove(self, participant_id: str, *, purge: bool = False) -> None:
        voted = self._drop_vote(participant_id)
        if voted is not None:
            self._tally[voted] -= 1
            self._changed()
        if purge:  # blocked: their candidates go too, and whoever voted for them may vote again
            for candidate in [c for c in self._candidates.values() if c.author == participant_id]:
                del self._candidates[candidate.candidate_id]
                del self._tally[candidate.candidate_id]
                for voter in [p for p, c in self._votes.items() if c == candidate.candidate_id]:
                    self._drop_vote(voter)
                self._changed()

    def state(self, name_of: NameOf) -> dict[str, Any]:
        return {
            "candidates": [{"candidate_id": c.candidate_id, "prompt": c.prompt, "votes": self._tally[c.candidate_id]}
                           for c in self._candidates.values()],
            "window_ends_at": iso(self._ends_wall),
        }
