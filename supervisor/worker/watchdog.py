"""--request-timeout (uWSGI's harakiri, with a traceback): a thread that watches the time the
app spends on each request.

The loop arms the watch while app code runs for a request (the app call, and each pull of its
iterable) and disarms it in between.  When a request has run longer than the timeout, the
watchdog thread, which runs whatever the app is stuck in (sleep, I/O, a lock, a pure-Python
loop: anything that lets another thread take the GIL):

* logs `request_timeout` with the method, the path, the elapsed time and the Python stack of
  every thread of the worker;
* answers 504 if no byte of the response was sent yet, and shuts the connection down;
* asks the master to replace the worker (ready-before-retire): its other requests finish on
  their own time, and the drain's graceful timeout ends a request that never returns.

A stuck worker that holds the GIL is beyond any thread: the master's heartbeat timeout kills
it, after a stack dump (faulthandler, from the signal handler)."""

from __future__ import annotations

import socket
import sys
import threading
import time
import traceback
from typing import Any, Callable

from supervisor.worker.http import Connection


class _Armed:
    __slots__ = ("conn", "ex", "method", "path", "started", "fired")

    def __init__(self, conn: Connection, ex: Any, started: float) -> None:
        self.conn, self.ex, self.started, self.fired = conn, ex, started, False
        environ = getattr(ex, "environ", None) or {}
        self.method, self.path = environ.get("REQUEST_METHOD", "?"), environ.get("PATH_INFO", "?")


class RequestWatch:
    def __init__(self, timeout: float, log: Any, error_response: Callable[[int], bytes],
                 replace_me: Callable[[str, str, float], None]) -> None:
        self.timeout = timeout
        self.log = log
        self.error_response = error_response
        self.replace_me = replace_me
        self.lock = threading.Lock()  # also taken by the loop before a response head is sent
        self._cond = threading.Condition(self.lock)
        self._armed: dict[int, _Armed] = {}  # thread id -> the request its app code works on
        threading.Thread(target=self._run, name="request-watch", daemon=True).start()

    def arm(self, conn: Connection, ex: Any) -> None:
        with self._cond:
            self._armed[threading.get_ident()] = _Armed(conn, ex, ex.started)
            self._cond.notify()

    def disarm(self) -> None:
        with self._cond:
            self._armed.pop(threading.get_ident(), None)

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                due = [(ident, a) for ident, a in self._armed.items() if not a.fired]
                late = [(ident, a) for ident, a in due if now - a.started >= self.timeout]
                for ident, armed in late:
                    armed.fired = True
                    self._fire(ident, armed, now)
                waits = [a.started + self.timeout - now for _, a in due if not a.fired]
                self._cond.wait(max(0.01, min(waits)) if waits else None)

    def _fire(self, ident: int, armed: _Armed, now: float) -> None:
        """With the lock held: the loop cannot start the response head meanwhile."""
        elapsed = round(now - armed.started, 3)
        self.log.error("request_timeout", method=armed.method, path=armed.path, seconds=elapsed,
                       timeout=self.timeout, stacks=_stacks(ident))
        ex = armed.ex
        if not ex.head_sent:
            ex.head_sent, ex.aborted = True, True  # the app's own response, if it ever comes, is dropped
            try:
                armed.conn.sock.send(self.error_response(504))
                armed.conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.replace_me(armed.method, armed.path, elapsed)


def _stacks(stuck: int) -> str:
    """Every thread's Python stack, the stuck request's thread first."""
    names = {t.ident: t.name for t in threading.enumerate()}
    frames = sys._current_frames()
    out = []
    for ident in sorted(frames, key=lambda i: i != stuck):
        marker = " (the request that timed out)" if ident == stuck else ""
        out.append(f"Thread {names.get(ident, ident)}{marker}:\n" + "".join(traceback.format_stack(frames[ident])))
    return "\n".join(out)
