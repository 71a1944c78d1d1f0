"""Helper processes of the master: the code watcher and the Consul agent client.

They are forked from the single-threaded master and may use threads (they never
fork).  Each talks to the master over a `Channel`.  A helper that dies is
restarted with capped exponential backoff; the service never depends on one."""

from __future__ import annotations

import os
import signal
import socket
from dataclasses import dataclass, field
from typing import Any, Callable

from supervisor import channel as channels
from supervisor.channel import Channel

RESTART_BASE = 0.5
RESTART_CAP = 30.0
STABLE_UPTIME = 60.0  # a helper up this long has proven itself: reset its backoff


def close_inherited_fds(keep: set[int]) -> None:
    """In a freshly forked child: close every descriptor inherited from the master except
    stdio and `keep`, so no child holds another child's channel or the master's epoll."""
    keep = keep | {0, 1, 2}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


@dataclass
class Helper:
    name: str
    main: Callable[[socket.socket], None]  # runs in the child; gets its end of the channel
    pid: int | None = None
    chan: Channel | None = None
    failures: int = 0
    restart_at: float | None = None
    started_at: float = 0.0
    on_message: Callable[[dict[str, Any]], None] = field(default=lambda message: None)

    def start(self, now: float) -> None:
        parent, child = channels.pair()
        pid = os.fork()
        if pid == 0:  # child
            code = 0
            try:
                signal.set_wakeup_fd(-1)
                close_inherited_fds({child.fileno()})
                for sig in (signal.SIGHUP, signal.SIGINT):
                    signal.signal(sig, signal.SIG_IGN)
                for sig in (signal.SIGTERM, signal.SIGQUIT, signal.SIGCHLD, signal.SIGUSR1, signal.SIGUSR2):
                    signal.signal(sig, signal.SIG_DFL)
                self.main(child)
            except BaseException:  # noqa: BLE001 - report, then leave without running master code
                import traceback

                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        child.close()
        self.pid, self.chan, self.restart_at, self.started_at = pid, Channel(parent), None, now

    def exited(self, now: float) -> float:
        """Bookkeeping after the helper died; returns the restart delay."""
        if self.chan is not None:
            self.chan.close()
        self.pid, self.chan = None, None
        self.failures = 1 if now - self.started_at >= STABLE_UPTIME else self.failures + 1
        delay = min(RESTART_CAP, RESTART_BASE * 2 ** (self.failures - 1))
        self.restart_at = now + delay
        return delay

    def send(self, **message: Any) -> None:
        if self.chan is not None:
            self.chan.sock.setblocking(True)
            self.chan.sock.settimeout(1.0)
            self.chan.send(**message)
            self.chan.sock.setblocking(False)

    def stop(self) -> None:
        """Close the channel (the helper exits on EOF) and make sure it goes."""
        if self.chan is not None:
            self.chan.close()
            self.chan = None
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
