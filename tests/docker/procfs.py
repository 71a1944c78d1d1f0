"""Who holds a file open, read from /proc (no lsof, no procps): the lock detector of the lock tests."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
from pathlib import Path

from tests.harness import wait_until


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return ""


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    """Exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:].split()[0] != "Z"


def holders(path: Path) -> dict[int, str]:
    """pid -> command line of every process with a descriptor open on `path` (/proc/PID/fd/*)."""
    target = os.path.realpath(path)
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{entry}/fd/{fd}")
            except OSError:
                continue
            if link == target:
                found[int(entry)] = cmdline(int(entry))
                break
    return found


def lock_is_free(path: Path) -> bool:
    """True when an exclusive flock(2) on `path` succeeds at once (the lock scripts/image.sh takes)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        raise
    finally:
        os.close(fd)  # closing the only descriptor releases the lock
    return True


def kill_and_wait(pid: int, sig: int = signal.SIGKILL, timeout: float = 30) -> None:
    """Signal one process we started (by pid) and wait until it is gone or a zombie."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    wait_until(lambda: not alive(pid), timeout, f"pid {pid} to exit")
