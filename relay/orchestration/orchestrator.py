"""The facade a broadcast drives: participants' actions in, inputs for the world model out.

Plain object, no timers, no I/O: the broadcast calls `tick()` a few times a second and sends what it
returns to the stream's interact, and pushes `state()` when `version` moved. Every action first
settles passed deadlines, so a window or a turn ends on time however late the next tick comes (a
window's winner is then delivered by that next tick); a queue forwards only from `tick()`.

An action is checked in this order: known participant, not blocked, invited (invite_only mode), the
policy's gate (host_only, not_your_turn, already_queued), content (too_long, invalid_text, empty,
blocked_word), cooldown, duplicate, then the policy itself (queue_full, already_proposed,
too_many_candidates; rate_limited past an address's share of the queue or of the candidates, and in
vote mode past votes_per_address). The message rate is the
broadcast's, before all this.

Switching mode discards the old policy's pending state: queued inputs are dropped, an open vote
window closes without a winner, the turn and the raised hands are cleared (a window or turn that had
already run out is settled first, its forward delivered by the next tick). Cooldowns, the duplicate
memory and blocked participants carry over: moderation is the same in every mode.
"""

from __future__ import annotations

import dataclasses
from collections import Counter, OrderedDict
from typing import Any

from ..clock import SYSTEM_CLOCK, Clock
from ..config import ConfigError, OrchestrationSettings, Settings
from ..errors import RelayError, not_found, unprocessable
from ..inputs import check_text
from .moderation import Moderator, clean, normalize
from .policies import Forward, HostPolicy, InputResult, Policy, rejected
from .queue import QueuePolicy
from .turns import TurnsPolicy
from .vote import VotePolicy

POLICIES: dict[str, type[Policy]] = {p.mode: p for p in (HostPolicy, QueuePolicy, VotePolicy, TurnsPolicy)}
NAME_MAX_CHARS = 40
DEPARTED_MAX = 10_000
# Shown to participants; blocked_words is not, so nobody learns what to spell around.
PUBLIC_SETTINGS = tuple(f.name for f in dataclasses.fields(OrchestrationSettings)
                        if f.name not in ("mode", "blocked_words"))


def _display_name(name: Any) -> str | None:
    """The name as shown; 422 for one the relay could not keep (relay.inputs' rule, one line: no line breaks)."""
    if not isinstance(name, str):
        return None
    return clean(check_text(name, "name", multiline=False))[:NAME_MAX_CHARS] or None


class Orchestrator:
    def __init__(self, settings: OrchestrationSettings | None = None, clock: Clock = SYSTEM_CLOCK) -> None:
        self._clock = clock
        self._settings = settings or OrchestrationSettings()
        self._moderator = Moderator(clock, self._settings)
        self._participants: dict[str, str | None] = {}  # id -> display name
        # Who left recently, with their names: they may come back with a resume token, and the
        # host may still block someone who just dropped off. Oldest forgotten first.
        self._departed: OrderedDict[str, str | None] = OrderedDict()
        self._blocked: set[str] = set()
        self._addresses: dict[str, str] = {}  # participant -> client address of their socket (vote caps)
        self._room: Counter[str] = Counter()  # client address -> participants present from it (the shares)
        # Identities that came from a host's invite; they stay invited when they resume.
        self._invited: set[str] = set()
        self._outbox: list[Forward] = []  # decided while catching up, delivered by the next tick
        self.version = 0  # moves whenever state() would change
        self.host_version = 0  # moves whenever state(host=True) would change
        # One instance per mode, made on first use and reset when the host switches away.
        self._policies: dict[str, Policy] = {}
        self._policy = self._activate(self._settings.mode)

    # -- reading -------------------------------------------------------------------------

    @property
    def mode(self) -> str:
        return self._settings.mode

    @property
    def settings(self) -> OrchestrationSettings:
        return self._settings

    @property
    def participants(self) -> dict[str, str | None]:
        return dict(self._participants)

    def is_blocked(self, participant_id: str) -> bool:
        return participant_id in self._blocked

    def is_present(self, participant_id: str) -> bool:
        return participant_id in self._participants

    def state(self, *, host: bool = False) -> dict[str, Any]:
        """docs/api.md's `orchestration` object; with `host`, also blocked_words and the participants."""
        settings = {name: getattr(self._settings, name) for name in PUBLIC_SETTINGS}
        state: dict[str, Any] = {
            "mode": self.mode,
            "settings": settings,
            "queue": [],
            "queue_length": 0,
            "candidates": [],
            "window_ends_at": None,
            "turn": {"holder": None, "ends_at": None, "hands": [], "hands_count": 0},
        }
        state.update(self._policy.state(self._participants.get))
        if host:
            settings["blocked_words"] = list(self._settings.blocked_words)
            state["participants"] = [{"participant_id": p, "name": n, "blocked": p in self._blocked,
                                      "invited": p in self._invited} for p, n in self._participants.items()]
        return state

    # -- participants --------------------------------------------------------------------

    def is_invited(self, participant_id: str) -> bool:
        return participant_id in self._invited

    def admit(self, participant_id: str, *, address: str | None = None, invited: bool = False) -> None:
        """A socket opened for this identity (new, resumed, or replacing its older socket): note where
        it comes from and whether an invite vouched for it, and make it present."""
        if address is not None:
            self._forget_address(participant_id)
            self._addresses[participant_id] = address
            self._room[address] += 1
        if invited:
            self._invited.add(participant_id)
        if participant_id not in self._participants:
            self.participant_joined(participant_id)

    def _forget_address(self, participant_id: str) -> None:
        address = self._addresses.pop(participant_id, None)
        if address is not None:
            self._room[address] -= 1
            if not self._room[address]:
                del self._room[address]

    def participant_joined(self, participant_id: str, name: str | None = None) -> None:
        """A participant opened the events socket; calling it again (their hello) renames them.
        One who left and comes back (resumed) gets their old name unless they send a new one."""
        name = _display_name(name)
        if participant_id in self._departed:
            departed_name = self._departed.pop(participant_id)
            name = name or departed_name
        if participant_id in self._participants and self._participants[participant_id] == name:
            return
        self._participants[participant_id] = name
        if self._policy.mentions(participant_id):
            self._changed()
        else:
            self.host_version += 1

    def participant_left(self, participant_id: str) -> None:
        if participant_id not in self._participants:
            return
        self._departed[participant_id] = self._participants.pop(participant_id)
        self._forget_address(participant_id)
        while len(self._departed) > DEPARTED_MAX:
            self._departed.popitem(last=False)
        self._catch_up()
        self._policy.remove(participant_id)
        self.host_version += 1

    def submit(self, participant_id: str, prompt: Any) -> InputResult:
        self._catch_up()
        reason = self._refusal(participant_id) or self._policy.gate(participant_id)
        if reason:
            return rejected(reason)
        reason = self._moderator.raw_problem(prompt) if isinstance(prompt, str) else None
        if reason:
            return rejected(reason)
        text = clean(prompt) if isinstance(prompt, str) else ""
        reason = self._moderator.check_content(text)
        if reason:
            return rejected(reason)
        wait = self._moderator.cooldown_left(participant_id)
        if wait > 0:
            return rejected("cooldown", retry_after=wait)
        key = normalize(text)
        if self._settings.duplicate_window_seconds > 0 and (
                self._moderator.is_duplicate(key) or self._policy.is_pending(key)):
            return rejected("duplicate")
        result = self._policy.submit(participant_id, text, key)
        if result.ok:
            self._moderator.accepted(participant_id)
        if result.forward is not None:
            self._moderator.forwarded(key)
        return result

    def vote(self, participant_id: str, candidate_id: Any) -> InputResult:
        self._catch_up()
        reason = self._refusal(participant_id)
        if reason:
            return rejected(reason)
        if not isinstance(self._policy, VotePolicy):
            return rejected("wrong_mode")
        return self._policy.vote(participant_id, candidate_id)

    def raise_hand(self, participant_id: str) -> InputResult:
        self._catch_up()
        reason = self._refusal(participant_id)
        if reason:
            return rejected(reason)
        if not isinstance(self._policy, TurnsPolicy):
            return rejected("wrong_mode")
        return self._policy.raise_hand(participant_id)

    def release_turn(self, participant_id: str) -> InputResult:
        """The holder ends their turn early; a participant still waiting lowers their hand."""
        self._catch_up()
        if participant_id not in self._participants:
            return rejected("unknown_participant")
        if not isinstance(self._policy, TurnsPolicy):
            return rejected("wrong_mode")
        return self._policy.release(participant_id)

    def moderate_chat(self, participant_id: str, text: Any, max_chars: int) -> tuple[str | None, str]:
        """(rejection reason or None, the text as shown) for a chat message: the inputs' moderation
        (unknown, blocked, too long, the text rule, empty, blocked words) but no policy, cooldown or
        duplicate check, and open to uninvited participants (invite_only is about steering)."""
        if participant_id not in self._participants:
            return "unknown_participant", ""
        if participant_id in self._blocked:
            return "blocked", ""
        if not isinstance(text, str):
            return "empty", ""
        reason = self._moderator.raw_problem(text, max_chars)
        if reason:
            return reason, ""
        text = clean(text)
        return self._moderator.check_content(text, max_chars), text

    def _refusal(self, participant_id: str) -> str | None:
        if participant_id not in self._participants:
            return "unknown_participant"
        if participant_id in self._blocked:
            return "blocked"
        if self._settings.invite_only and participant_id not in self._invited:
            return "invite_required"  # uninvited: they watch and see the state, but have no say
        return None

    # -- the host ------------------------------------------------------------------------

    def grant_turn(self, participant_id: str) -> None:
        """Give the turn to this participant now (replacing any holder, who does not get it back)."""
        turns = self._turns()
        if participant_id not in self._participants:
            raise not_found("participant", participant_id)
        if participant_id in self._blocked:
            raise unprocessable("A blocked participant cannot be given the turn; unblock them first.",
                                participant_id=participant_id)
        turns.grant(participant_id)

    def revoke_turn(self) -> str | None:
        """End the current turn (the next raised hand gets it); returns who held it, if anyone."""
        return self._turns().revoke()

    def block(self, participant_id: str) -> None:
        """Remove a participant's voice: their inputs, votes, raised hand, turn and candidates go."""
        if not self._known(participant_id):
            raise not_found("participant", participant_id)
        if participant_id in self._blocked:
            return
        self._catch_up()
        self._blocked.add(participant_id)
        self._policy.remove(participant_id, purge=True)
        self.host_version += 1

    def unblock(self, participant_id: str) -> None:
        if not self._known(participant_id):
            raise not_found("participant", participant_id)
        if participant_id in self._blocked:
            self._blocked.discard(participant_id)
            self.host_version += 1

    def _known(self, participant_id: str) -> bool:
        return (participant_id in self._participants or participant_id in self._blocked
                or participant_id in self._departed)

    def configure(self, mode: str | None = None, **settings: Any) -> OrchestrationSettings:
        """Switch mode and/or change settings live; settings not named keep their value.

        Validated exactly like the config file's [orchestration] section; a bad value raises
        RelayError 422 whose details name the field, and changes nothing.
        """
        words = settings.get("blocked_words")
        for word in words if isinstance(words, (list, tuple)) else ():
            if isinstance(word, str):  # the host's text, as sent: the boundary's one rule, as for prompts
                check_text(word, "blocked_words", multiline=False)
        values = {f.name: getattr(self._settings, f.name) for f in dataclasses.fields(OrchestrationSettings)}
        values.update(settings)
        if mode is not None:
            values["mode"] = mode
        try:
            new = Settings.from_dict({"orchestration": values}).orchestration
        except ConfigError as error:
            message = str(error).removeprefix("orchestration.")
            raise unprocessable(message, field=message.split(":", 1)[0]) from None
        if new == self._settings:
            return new
        self._catch_up()
        old, self._settings = self._settings, new
        self._moderator.settings = new
        if new.mode != old.mode:
            self._policy.reset()
            self._policy = self._activate(new.mode)
        self._policy.settings = new
        self._changed()
        return new

    # -- time ----------------------------------------------------------------------------

    def tick(self) -> list[Forward]:
        """The inputs to send to the world model now, in order."""
        self._collect(self._policy.tick())
        forwards, self._outbox = self._outbox, []
        return forwards

    def _catch_up(self) -> None:
        self._collect(self._policy.settle())

    def _collect(self, forwards: list[Forward]) -> None:
        for forward in forwards:
            self._moderator.forwarded(normalize(forward.prompt))
            self._outbox.append(forward)

    # -- internals -----------------------------------------------------------------------

    def _activate(self, mode: str) -> Policy:
        policy = self._policies.get(mode)
        if policy is None:
            policy = self._policies[mode] = POLICIES[mode](self._clock, self._settings, self._changed)
            policy.address_of = self._addresses.get
            policy.addresses = lambda: len(self._room)
        return policy

    def _turns(self) -> TurnsPolicy:
        if not isinstance(self._policy, TurnsPolicy):
            raise RelayError("INVALID_REQUEST", 409, f"Turns exist only in mode 'turns' (the mode is {self.mode!r}).",
                             action="Switch the orchestration mode to 'turns' first.", details={"mode": self.mode})
        self._catch_up()
        return self._policy

    def _changed(self) -> None:
        self.version += 1
        self.host_version += 1
