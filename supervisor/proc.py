"""Process plumbing shared by the master and its children: the one after-fork policy,
the parent-death signal, PID 1 duties (subreaper, reaping) and inherited descriptors."""

from __future__ import annotations

import ctypes
import os
import signal
from typing import Any, Callable, Iterable, Iterator

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

# Every signal the master installs a handler for (they only wake its loop).  A child gets
# them all back at their default action, then the policy of `after_fork`.
MASTER_SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD,
                  signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH, signal.SIGTTIN, signal.SIGTTOU)

Handler = Callable[[int, Any], None]


def after_fork(keep: Iterable[int], on_term: Handler | None = None) -> None:
    """The one policy for a freshly forked child of the master (worker or helper).

    * The master's signal setup is undone: no wakeup fd, default actions, empty mask.
    * HUP and INT are ignored: a stray `pkill -HUP`, or a Ctrl-C sent to the whole process
      group, must not kill a child; the master decides when its children go.
    * SIGPIPE stays ignored (Python's choice: EPIPE instead of death).
    * SIGTERM kills, unless the child passes `on_term` (a worker drains on it).
    * Every inherited descriptor but stdio and `keep` is closed, so no child holds another
      child's channel or the master's selector.
    """
    signal.set_wakeup_fd(-1)
    for sig in MASTER_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    if on_term is not None:
        signal.signal(signal.SIGTERM, on_term)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    close_inherited_fds(set(keep))


def close_inherited_fds(keep: set[int]) -> None:
    """Close every descriptor but stdio and `keep`."""
    keep = keep | {0, 1, 2}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass  # the descriptor of the listdir itself, already closed


def die_with_parent(parent_pid: int, sig: int) -> None:
    """Get `sig` when the parent dies (PR_SET_PDEATHSIG), and at once if it already has."""
    try:
        _libc().prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # it died before prctl took effect
        os.kill(os.getpid(), sig)


def become_subreaper() -> bool:
    """Make orphaned descendants re-parent to us instead of to the real init.
    Not needed (and not done) when we already are PID 1."""
    if os.getpid() == 1:
        return True
    try:
        return _libc().prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
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


def send_signal(pid: int, sig: int) -> None:
    """kill(2) that ignores a process already gone."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)
