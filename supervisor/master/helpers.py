"""Forking the master's helper processes (the code watcher, the Consul helper).

A helper is forked from the single-threaded master and may then use threads (it never
forks).  Its body gets its end of the channel and returns when the master closes the
other end.  When to start or restart one is decided by `supervisor.lifecycle.helpers`."""

from __future__ import annotations

import os
import signal
import socket
import threading
import traceback
import warnings
from typing import Any, Callable

import structlog

from supervisor import channel as channels, logs, proc
from supervisor.channel import Channel

HelperMain = Callable[[socket.socket], None]  # runs in the child with its end of the channel


def fork_helper(main: HelperMain, name: str = "helper") -> tuple[int, Channel]:
    """Fork a helper running `main`; returns its pid and the master's end of its channel.
    OSError when fork() fails.  `name` titles the process (`supervise: watcher`) and tags its
    log events (role)."""
    parent, child = channels.pair()
    try:
        pid = os.fork()
    except OSError:
        parent.close()
        child.close()
        raise
    if pid == 0:
        code = 0
        try:
            proc.after_fork({child.fileno()})
            proc.set_title(name)
            # Inherited from the master through fork: tag our events as this process's.
            structlog.contextvars.bind_contextvars(pid=os.getpid(), role=name)
            threading.excepthook = _thread_crash_logger(name)  # watchdog's threads, the agent's...
            warnings.showwarning = _warning_logger(name)  # e.g. urllib3's, in the Consul helper
            main(child)
        except BaseException as exc:  # noqa: BLE001 - report, then leave without running master code
            try:
                logs.get().critical("helper_crashed", helper=name, error=f"{type(exc).__name__}: {exc}",
                                    traceback=traceback.format_exc())
            except BaseException:  # noqa: BLE001 - logging itself broke: plain text is all that is left
                traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    child.close()
    return pid, Channel(parent, queue_sends=True)


def _thread_crash_logger(name: str) -> Callable[[Any], None]:
    """An exception that ends a helper's thread is an event with its traceback, not plain text
    on stderr.  (A new thread starts without the context variables: pid and role are bound.)"""

    def hook(args: Any) -> None:
        if args.exc_type is SystemExit:
            return
        logs.get(pid=os.getpid(), role=name).error(
            "thread_crashed", helper=name, thread=args.thread.name if args.thread is not None else None,
            error=f"{args.exc_type.__name__}: {args.exc_value}",
            traceback="".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback)))

    return hook


WARNING_CHARS = 300  # a warning's text is cut here (some repr whole tables)


def _warning_logger(name: str) -> Callable[..., None]:
    """A Python warning raised in a helper is a `python_warning` event, not plain text on
    stderr; each source line once (the same warning tends to repeat for every request)."""
    seen: set[tuple[str, int, str]] = set()

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: Any = None, line: str | None = None) -> None:
        if (filename, lineno, category.__name__) in seen:
            return
        seen.add((filename, lineno, category.__name__))
        text = " ".join(str(message).split())
        logs.get(pid=os.getpid(), role=name).warning(
            "python_warning", helper=name, category=category.__name__, where=f"{filename}:{lineno}",
            message=text if len(text) <= WARNING_CHARS else text[:WARNING_CHARS] + "...")

    return show


def stop_helper(pid: int, chan: Channel) -> None:
    """Close the channel (the helper exits on EOF) and make sure it goes."""
    chan.close()
    proc.send_signal(pid, signal.SIGTERM)
