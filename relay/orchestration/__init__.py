"""Audience participation: moderation, then a policy (host | queue | vote | turns), behind one facade.

No HTTP and no timers inside: the broadcast drives an `Orchestrator` with participants' actions and a
periodic `tick()`, and sends the `Forward`s it returns to the stream's interact.
"""

from .moderation import Moderator, blocked_words_pattern, clean, normalize
from .orchestrator import POLICIES, Orchestrator
from .policies import Forward, InputResult

__all__ = ["Orchestrator", "Forward", "InputResult", "Moderator", "POLICIES", "blocked_words_pattern", "clean",
           "normalize"]
