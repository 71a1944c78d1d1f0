"""What the master reports to the lifecycle: typed events, each with the time it happened
passed alongside (`Lifecycle.handle(event, now)`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from supervisor import proto


@dataclass(frozen=True)
class Signalled:
    """A signal reached the master (by name: "SIGHUP", "SIGTERM", ...)."""

    name: str


@dataclass(frozen=True)
class Spawned:
    generation: int
    slot: int
    pid: int


@dataclass(frozen=True)
class SpawnFailed:
    """fork() itself failed (out of memory, pid limit)."""

    generation: int
    slot: int
    error: str


@dataclass(frozen=True)
class ZygoteStarted:
    """--preload: the zygote of `generation` was forked (pid), or could not be (`error`)."""

    generation: int
    pid: int | None
    error: str = ""


@dataclass(frozen=True)
class HelperStarted:
    name: str
    pid: int


@dataclass(frozen=True)
class HelperStartFailed:
    name: str
    error: str


@dataclass(frozen=True)
class Said:
    """A child sent a message.  `fd` comes with the kinds that carry a descriptor; the
    lifecycle always answers those with a Forward, so the descriptor is never leaked."""

    pid: int
    message: proto.Message
    fd: int | None = None


@dataclass(frozen=True)
class SendFailed:
    """The channel to a child is broken or stuck."""

    pid: int


@dataclass(frozen=True)
class Exited:
    """waitpid() collected a child: a worker, a helper or an adopted orphan.  `cause`: what the
    master found wrong that explains a worker's exit before ready (the code directory is gone)."""

    pid: int
    status: str
    cause: str | None = None


@dataclass(frozen=True)
class Measured:
    """A worker's (or a zygote's) memory, in bytes (None: it could not be read).  uss: its own
    pages; pss: its proportional share of every page it maps; shared: pages it shares (measured
    with --preload or --max-memory only)."""

    pid: int
    rss: int | None
    uss: int | None = None
    pss: int | None = None
    shared: int | None = None


Event = Union[Signalled, Spawned, SpawnFailed, ZygoteStarted, HelperStarted, HelperStartFailed, Said, SendFailed, Exited,
              Measured]
