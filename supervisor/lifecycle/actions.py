"""What the lifecycle asks the master to do.  The master carries each out and reports back
with events (`supervisor.lifecycle.events`) when there is something to report."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Mapping, Union

from supervisor import proto


class Level(str, Enum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


@dataclass(frozen=True)
class Spawn:
    """Fork a worker for `slot` of `generation`, with the generation's environment."""

    generation: int
    slot: int
    env: Mapping[str, str] = field(default_factory=dict)
    zygote: int | None = None  # --preload: ask this zygote (pid) to fork it


@dataclass(frozen=True)
class StartZygote:
    """--preload: fork the zygote of `generation`; it imports the app once and forks the
    generation's workers."""

    generation: int
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Accept:
    """Tell a booted worker to start accepting connections."""

    pid: int


@dataclass(frozen=True)
class Drain:
    """SIGTERM a worker: stop accepting, finish in-flight requests, exit.  `why`: see
    proto.Draining."""

    pid: int
    why: str = "shutdown"


@dataclass(frozen=True)
class Kill:
    """SIGKILL a child (a worker or a helper); `dump`: a stuck worker, log its stacks first."""

    pid: int
    reason: str
    dump: bool = False


@dataclass(frozen=True)
class Log:
    """One log event."""

    event: str
    fields: Mapping[str, object] = field(default_factory=dict)
    level: Level = Level.INFO


@dataclass(frozen=True)
class Tell:
    """Send a message to a child (a worker or a helper) over its channel."""

    pid: int
    message: proto.Message


@dataclass(frozen=True)
class Forward:
    """Pass a handed-off connection to worker `to` (Adopt), or close it when `to` is None."""

    fd: int
    sender: int
    to: int | None


@dataclass(frozen=True)
class StartHelper:
    """Fork the helper process `name` ("watcher", "consul")."""

    name: str


@dataclass(frozen=True)
class Measure:
    """Read these workers' memory and report each as a `Measured` event."""

    pids: tuple[int, ...]


@dataclass(frozen=True)
class Exit:
    """Stop the helpers, close the sockets, leave with `code`."""

    code: int
    reason: str


Action = Union[Spawn, StartZygote, Accept, Drain, Kill, Log, Tell, Forward, StartHelper, Measure, Exit]


# Milestones: what the pool tells the rest of the lifecycle (never carried out by the master).


@dataclass(frozen=True)
class GenerationServing:
    number: int
    first: bool


@dataclass(frozen=True)
class ReloadFailed:
    number: int
    error: str


@dataclass(frozen=True)
class PoolEmpty:
    """Retiring is complete: no worker is left."""


Milestone = Union[GenerationServing, ReloadFailed, PoolEmpty]
