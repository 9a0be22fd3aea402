"""What the policies share, and the simplest of them (host).

A policy is a plain object driven by method calls and an injected clock; it owns no timer. The facade
(`Orchestrator`) runs moderation first, then hands the policy an input that is clean, short enough,
free of blocked words, out of cooldown and not a recent duplicate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from ..clock import Clock
from ..config import OrchestrationSettings


@dataclass(frozen=True)
class Forward:
    """An input to send to the world model now (through the stream's interact)."""

    prompt: str
    participant_id: str
    mode: str


REASON_CODES = {"rate_limited": "RATE_LIMITED", "invite_required": "INVITE_REQUIRED"}


@dataclass(frozen=True)
class InputResult:
    """The answer to a participant's action.

    status: for `input`: "queued" | "candidate" | "forwarded" | "rejected"; for the other actions
    "voted", "raised", "released" or "rejected". `reason` is set exactly when rejected.
    `forward` is set when the input went straight through (turns): send it to the model at once.
    """

    status: str
    reason: str | None = None
    candidate_id: str | None = None
    retry_after: float | None = None  # seconds, for "cooldown" and "rate_limited"
    forward: Forward | None = None

    @property
    def ok(self) -> bool:
        return self.status != "rejected"

    def as_event(self, type: str = "input_result") -> dict[str, Any]:
        event: dict[str, Any] = {"type": type, "status": self.status}
        if self.reason is not None:
            event["reason"] = self.reason
            if self.reason in REASON_CODES:  # the refusals the contract has an error code for
                event["code"] = REASON_CODES[self.reason]
        if self.candidate_id is not None:
            event["candidate_id"] = self.candidate_id
        if self.retry_after is not None:
            event["retry_after"] = round(self.retry_after, 1)
        return event


def rejected(reason: str, **extra: Any) -> InputResult:
    return InputResult("rejected", reason, **extra)


NameOf = Callable[[str], "str | None"]


def past_share(held: int, used: int, capacity: int, addresses: int) -> bool:
    """Whether an address holding ``held`` of a shared list's ``used`` places (``capacity`` in all) must
    leave the rest to other addresses. Max-min fair, as ratelimit.FairShare is for rates: while more
    than half the places are free anyone takes one; past that, an address holds at most the upper half
    plus its share of the lower half (the lower half over the ``addresses`` in the room, at least one).
    So one address (a hundred sockets behind a NAT) cannot fill the list, yet alone it may."""
    lower = max(1, capacity // 2)
    if capacity - used > lower:
        return False
    return held >= capacity - lower + max(1, lower // max(1, addresses))

# Lists in the public state (queue, hands) show their head only; their full length is given beside.
STATE_LIST_MAX = 100


def person(participant_id: str, name_of: NameOf) -> dict[str, Any]:
    return {"participant_id": participant_id, "name": name_of(participant_id)}


class Policy:
    """The base: accepts nothing, forwards nothing, shows nothing."""

    mode: ClassVar[str]

    def __init__(self, clock: Clock, settings: OrchestrationSettings, changed: Callable[[], None]) -> None:
        self.clock = clock
        self.settings = settings  # replaced by the facade when the host changes settings
        self._changed = changed  # call whenever state() would change
        # The client address a participant's socket came from (None if unknown), and how many addresses
        # have a participant present (the shares of past_share): the facade sets both.
        self.address_of: Callable[[str], str | None] = lambda participant_id: None
        self.addresses: Callable[[], int] = lambda: 1

    def gate(self, participant_id: str) -> str | None:
        """A rejection reason that does not depend on the prompt (checked before moderation)."""
        return None

    def submit(self, participant_id: str, prompt: str, key: str) -> InputResult:
        """A moderated input (`key` is its normalized form)."""
        return rejected("host_only")

    def mentions(self, participant_id: str) -> bool:
        """Whether state() shows this participant (so a new display name changes it)."""
        return False

    def is_pending(self, key: str) -> bool:
        """Whether an identical input already waits here (duplicate suppression)."""
        return False

    def settle(self) -> list[Forward]:
        """Act on deadlines that have passed (a window or a turn ending); run before every action."""
        return []

    def tick(self) -> list[Forward]:
        """What is due now; only the periodic tick calls it (a queue forwards on its own rhythm)."""
        return self.settle()

    def reset(self) -> None:
        """Drop all pending state, forwarding nothing: the host switched to another mode."""

    def remove(self, participant_id: str, *, purge: bool = False) -> None:
        """The participant left (or, with `purge`, was blocked): drop what they hold here."""

    def state(self, name_of: NameOf) -> dict[str, Any]:
        """This policy's part of the orchestration state (keys of docs/api.md's `orchestration` event)."""
        return {}


class HostPolicy(Policy):
    """Only the host prompts (through interact); participants watch."""

    mode = "host"

    def gate(self, participant_id: str) -> str | None:
        return "host_only"
