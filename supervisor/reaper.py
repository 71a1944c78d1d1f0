"""PID 1 duties: adopt orphans (child subreaper when not PID 1) and reap every child."""

from __future__ import annotations

import ctypes
import os
import signal
from typing import Iterator

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Make orphaned descendants re-parent to us instead of to the real init.
    Not needed (and not done) when we already are PID 1."""
    if os.getpid() == 1:
        return True
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def reap() -> Iterator[tuple[int, str]]:
    """Collect every child that has exited: (pid, how it ended), until none is left."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, describe(status)


def describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return f"signal {sig} ({name})"
    return f"exit {os.WEXITSTATUS(status)}"
