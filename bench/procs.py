"""What every benchmark that starts processes needs: no orphans, free loopback ports."""

from __future__ import annotations

import contextlib
import ctypes
import signal
import socket


def die_with_parent() -> None:
    """preexec_fn: the kernel sends SIGTERM to the child if the benchmark dies (no orphans)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
