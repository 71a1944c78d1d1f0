"""Structured logging: one event per line, every event tagged with pid, role, generation, worker."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class _LineWriter:
    """Writes each rendered event with a single os.write, so lines from the master and
    all workers sharing one stdout pipe never interleave (writes <= PIPE_BUF are atomic)."""

    def __init__(self, fd: int = 1) -> None:
        self._fd = fd

    def msg(self, message: str) -> None:
        data = (message + "\n").encode("utf-8", "replace")
        try:
            while data:
                data = data[os.write(self._fd, data):]
        except OSError:
            pass  # stdout gone (closed pipe): logging must never take the process down

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


def configure(level: str = "info", fmt: str = "auto", **context: Any) -> None:
    """Configure structlog for this process.  Called again in each worker after fork."""
    if fmt == "auto":
        fmt = "console" if os.isatty(1) else "json"
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fmt == "json":
        processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        # Console: a traceback (or a stack dump) is a real multi-line block under its event,
        # not one escaped line.  exc_info is formatted by the renderer's exception formatter.
        processors += [_blocks_as_exception,
                       structlog.dev.ConsoleRenderer(colors=False, exception_formatter=structlog.dev.plain_traceback)]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=lambda *args: _LineWriter(),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(pid=os.getpid(), **context)


BLOCK_FIELDS = ("traceback", "stacks")  # multi-line text fields (a traceback formatted elsewhere)


def _blocks_as_exception(logger: Any, name: str, event: dict[str, Any]) -> dict[str, Any]:
    """Console format: move multi-line text fields to `exception`, which the console renderer
    prints as a block after the event's line (a traceback read in another process arrives
    as text, not as exc_info)."""
    blocks = [str(event.pop(key)).rstrip("\n") for key in BLOCK_FIELDS if event.get(key)]
    error = event.get("error")
    if blocks and error and blocks[0].startswith(f"{error}\n"):
        blocks[0] = blocks[0][len(error) + 1:]  # already on the event's line
    if blocks:
        if event.get("exception"):
            blocks.insert(0, str(event["exception"]).rstrip("\n"))
        event["exception"] = "\n".join(blocks)
    return event


def get(**context: Any) -> Any:
    return structlog.get_logger().bind(**context)


def error_line(message: str) -> None:
    """The one clear line a user sees for a fatal error (stderr, plain text)."""
    sys.stderr.write(f"supervise: error: {message}\n")
    sys.stderr.flush()
