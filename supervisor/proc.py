"""Process plumbing shared by the master and its children: the one after-fork policy,
the parent-death signal and lifeline, PID 1 duties (subreaper, reaping, the final sweep of
descendants) and inherited descriptors."""

from __future__ import annotations

import ctypes
import os
import select
import signal
import threading
import time
from typing import Any, Callable, Iterable, Iterator

import psutil
import setproctitle

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

# Signals that report a fault of the process itself: their default action (a core dump) stays.
_FAULTS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGABRT, signal.SIGTRAP,
           signal.SIGSYS}
# Every other signal the master can catch gets a handler that only wakes its loop, so that
# none kills it by its default action (SIGALRM, SIGPWR, SIGXCPU, real-time signals...): each has
# a defined effect, decided by the lifecycle.  SIGPIPE stays ignored (EPIPE instead), SIGCONT
# only continues.  A child gets them all back at their default action (`after_fork`).
MASTER_SIGNALS = tuple(sorted(
    s for s in signal.valid_signals()
    if s not in _FAULTS and s not in (signal.SIGKILL, signal.SIGSTOP, signal.SIGPIPE, signal.SIGCONT)))


def signal_name(signum: int) -> str:
    """SIGHUP, ..., SIGRTMIN+3."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        if signal.SIGRTMIN <= signum <= signal.SIGRTMAX:
            return f"SIGRTMIN+{signum - signal.SIGRTMIN}"
        return f"signal {signum}"

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
        try:
            signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError):
            pass  # not ours to set where we run (the master skipped it too)
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


class Lifeline:
    """A pipe whose write end only the master holds.  Every worker keeps the read end: when the
    master dies, however it dies, the read end sees EOF.  The parent-death signal alone is not
    enough: a worker hung in a request, or still importing a module that hangs, never acts on
    it, and would keep the listening socket open for ever."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe2(os.O_CLOEXEC)


def watch_lifeline(read_fd: int, grace: Callable[[], float]) -> None:
    """In a worker: a watchdog thread that ends the process `grace()` seconds after the
    master died (the drain gets that long), whatever the worker is doing meanwhile."""

    def watchdog() -> None:
        while True:
            try:
                if not os.read(read_fd, 1):
                    break  # EOF: the master is gone (it never writes)
            except InterruptedError:
                continue
            except OSError:
                break
        threading.Event().wait(grace())  # the drain's deadline, not a blind sleep: then we go
        os._exit(1)

    threading.Thread(target=watchdog, name="lifeline", daemon=True).start()


def terminate_descendants(grace: float) -> int:
    """On exit, as PID 1 or subreaper: TERM every remaining descendant (a daemon the app
    forked, say), then KILL what is left after `grace` seconds, as `tini -g` and systemd's
    control-group kill do.  Reaps them; returns how many there were."""
    try:
        procs = psutil.Process().children(recursive=True)
    except psutil.Error:
        return 0
    for p in procs:
        _signal_process(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    alive = procs
    while alive:
        for _ in reap():
            pass
        alive = [p for p in alive if _running(p)]
        left = deadline - time.monotonic()
        if not alive or left <= 0:
            break
        _wait_any(alive, min(left, 0.05))
    for p in alive:
        _signal_process(p, signal.SIGKILL)
    if alive:
        _wait_any(alive, 1.0)
    for _ in reap():
        pass
    return len(procs)


def _signal_process(p: psutil.Process, sig: int) -> None:
    try:
        p.send_signal(sig)
    except psutil.Error:
        pass


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _wait_any(procs: list[psutil.Process], timeout: float) -> None:
    """Wait until one of `procs` exits (pidfd), or the timeout."""
    fds = []
    for p in procs:
        try:
            fds.append(os.pidfd_open(p.pid))
        except OSError:
            pass
    try:
        if fds:
            select.select(fds, [], [], timeout)
    finally:
        for fd in fds:
            os.close(fd)


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


def write_pid_file(path: str) -> str | None:
    """Write this process's pid (atomically: a reader never sees half a number).  The error,
    in one line, if it cannot."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return f"cannot write --pid-file {path}: {exc.strerror}"
    return None


def remove_pid_file(path: str) -> None:
    """Remove the pid file if it still names this process (not a successor's)."""
    try:
        with open(path) as f:
            if f.read().strip() == str(os.getpid()):
                os.unlink(path)
    except OSError:
        pass


def set_title(title: str) -> None:
    """Name this process in `ps` and `top`: `supervise: master app.wsgi`, `supervise: worker g3/w1`,
    `supervise: watcher`...  (the command line is the same for all, they are forked from one)."""
    try:
        setproctitle.setproctitle(f"supervise: {title}")
    except Exception:  # noqa: BLE001 - a title is a convenience: never fail for it
        pass


def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)
