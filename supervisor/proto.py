"""The one wire protocol between the master and every child it forks.

Workers, the code watcher and the Consul helper all talk to the master over a socketpair
(`supervisor.channel.Channel`), one JSON object per line: `{"t": KIND, ...fields}`.  Each
kind is a frozen dataclass below; `decode` checks every field's type, so a child can never
crash the master with garbage: anything malformed decodes to None and is dropped.

Two kinds carry a file descriptor (SCM_RIGHTS) along with their line: `Handoff` (a draining
worker's late connection, to the master) and `Adopt` (that connection, to a newer worker).

Pure: json and dataclasses only.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Union


# Upper bounds, in seconds, of the request-duration histogram workers send in Beat.hist (the
# last bucket is +Inf): part of the protocol, since the master adds the buckets up by index.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class Message:
    kind: ClassVar[str] = ""
    carries_fd: ClassVar[bool] = False


# --------------------------------------------------------------------------- worker -> master


@dataclass(frozen=True)
class Ready(Message):
    """The app is imported: the worker can serve once told to accept.  `code`: a fingerprint
    of the app's modules it imported (paths, sizes, mtimes), so the master can tell when a
    respawn loaded different code than its generation runs."""

    kind: ClassVar[str] = "ready"
    code: str = ""
    capacity: int = 0  # requests it can serve at once (0: --threads); an ASGI worker's is its concurrency


@dataclass(frozen=True)
class BootError(Message):
    """The app failed to import; the worker exits 3 next."""

    kind: ClassVar[str] = "boot_error"
    error: str = ""


@dataclass(frozen=True)
class Beat(Message):
    """Heartbeat: the worker's loop turns.  Requests served so far, since it began draining, and
    in app threads now."""

    kind: ClassVar[str] = "beat"
    requests: int = 0
    drained: int = 0
    busy: int = 0  # requests in app threads right now (with --threads > 1)
    started: int = 0  # requests handed to the app so far (the first is reported at once)
    counts: dict[str, int] = field(default_factory=dict)  # requests by "STATUS METHOD", cumulative
    hist: list[int] = field(default_factory=list)  # request durations per bucket, cumulative
    seconds: float = 0.0  # all request durations added up


@dataclass(frozen=True)
class RequestTimedOut(Message):
    """A request ran past --request-timeout (the worker logged its stack and answered 504):
    replace this worker."""

    kind: ClassVar[str] = "request_timeout"
    method: str = ""
    path: str = ""
    seconds: float = 0.0


@dataclass(frozen=True)
class Handoff(Message):
    """A connection accepted after the drain began; the descriptor travels with this line."""

    kind: ClassVar[str] = "handoff"
    carries_fd: ClassVar[bool] = True


# --------------------------------------------------------------------------- master -> worker


@dataclass(frozen=True)
class StartAccepting(Message):
    """The worker's generation is swapped in: accept connections."""

    kind: ClassVar[str] = "accept"


@dataclass(frozen=True)
class Draining(Message):
    """Sent just before the SIGTERM that drains a worker: why it drains.  "shutdown" (supervise
    stops), "reload" (a newer generation serves), "recycle" (--max-requests, --max-rss, a
    request timeout) or "scale" (live scaling).  WebSockets close with 1001 on a shutdown and
    1012 (service restart: reconnect) otherwise."""

    kind: ClassVar[str] = "draining"
    why: str = "shutdown"


@dataclass(frozen=True)
class Adopt(Message):
    """Serve this connection (handed off by an older worker); the descriptor travels along."""

    kind: ClassVar[str] = "adopt"
    carries_fd: ClassVar[bool] = True


# --------------------------------------------------------------------------- zygote <-> master (--preload)


@dataclass(frozen=True)
class ZygoteReady(Message):
    """A generation's zygote imported the app (and froze its heap): it forks workers on
    request.  `code`: the fingerprint of what it imported, as in `Ready`."""

    kind: ClassVar[str] = "zygote_ready"
    code: str = ""
    threads: list[str] = field(default_factory=list)  # other threads alive at fork time (a fork-safety mistake)
    connections: list[str] = field(default_factory=list)  # peers of connected sockets the workers would share


@dataclass(frozen=True)
class ForkPipe(Message):
    """To a zygote, just before `Fork`: the write end of the next worker's stack-dump pipe."""

    kind: ClassVar[str] = "fork_pipe"
    carries_fd: ClassVar[bool] = True


@dataclass(frozen=True)
class Fork(Message):
    """To a zygote: fork the worker for `slot`; the descriptor is its end of its channel."""

    kind: ClassVar[str] = "fork"
    carries_fd: ClassVar[bool] = True
    slot: int = 0


@dataclass(frozen=True)
class Forked(Message):
    """From a zygote: the worker for `slot` runs as `pid` (0: the fork failed, see `error`).
    The worker is the master's child (the zygote forks twice), so the master reaps it."""

    kind: ClassVar[str] = "forked"
    slot: int = 0
    pid: int = 0
    error: str = ""


# --------------------------------------------------------------------------- watcher -> master


@dataclass(frozen=True)
class Watching(Message):
    """The observer (re)started.  `reason` says why polling is used (None with inotify)."""

    kind: ClassVar[str] = "watching"
    mode: str = ""
    paths: list[str] = field(default_factory=list)
    touch_files: list[str] = field(default_factory=list)
    reason: str | None = None


@dataclass(frozen=True)
class Changed(Message):
    """Files that passed the include/exclude filters changed."""

    kind: ClassVar[str] = "changed"
    paths: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Retarget(Message):
    """A watched path now resolves elsewhere (a re-pointed symlink); a Changed follows."""

    kind: ClassVar[str] = "retarget"
    path: str = ""
    target: str = ""


@dataclass(frozen=True)
class HelperWarning(Message):
    """Something a helper wants logged as a warning."""

    kind: ClassVar[str] = "warning"
    message: str = ""


@dataclass(frozen=True)
class HelperFailing(Message):
    """A helper's last words before it dies of an unexpected exception."""

    kind: ClassVar[str] = "failing"
    message: str = ""


# --------------------------------------------------------------------------- master -> Consul helper


@dataclass(frozen=True)
class Register(Message):
    """The service is ready: register (and keep registered).  `env` is the KV environment
    the master runs with: the baseline of the KV watch."""

    kind: ClassVar[str] = "register"
    env: dict[str, str] | None = None


@dataclass(frozen=True)
class Alive(Message):
    """The master's loop turns: TTL heartbeats may go on.  Sent every ttl/3."""

    kind: ClassVar[str] = "alive"


@dataclass(frozen=True)
class Note(Message):
    """The TTL check's output (it stays passing); "" clears it."""

    kind: ClassVar[str] = "note"
    text: str = ""


@dataclass(frozen=True)
class Withdraw(Message):
    """Shutdown: deregister (or enter maintenance), then answer Withdrawn.  `serving`: the
    service was ready, so withdraw even if this (restarted) helper never got Register."""

    kind: ClassVar[str] = "withdraw"
    serving: bool = False


# --------------------------------------------------------------------------- Consul helper -> master


@dataclass(frozen=True)
class Registered(Message):
    """After every successful (re-)registration."""

    kind: ClassVar[str] = "registered"
    service_id: str = ""


@dataclass(frozen=True)
class ConsulDown(Message):
    """Consul became unusable (sent on the change only)."""

    kind: ClassVar[str] = "consul_down"
    error: str = ""


@dataclass(frozen=True)
class ConsulUp(Message):
    """Consul is usable again (sent on the change only)."""

    kind: ClassVar[str] = "consul_up"


@dataclass(frozen=True)
class KVChanged(Message):
    """The KV prefix's content differs from the last one sent."""

    kind: ClassVar[str] = "kv"
    env: dict[str, str] = field(default_factory=dict)
    index: int = 0


@dataclass(frozen=True)
class Withdrawn(Message):
    """The answer to Withdraw, within the Consul timeout whatever Consul does."""

    kind: ClassVar[str] = "withdrawn"
    ok: bool = False
    error: str | None = None


KINDS: dict[str, type[Message]] = {
    cls.kind: cls for cls in (
        Ready, BootError, Beat, RequestTimedOut, Handoff, StartAccepting, Draining, Adopt, Watching, Changed, Retarget,
        HelperWarning, HelperFailing, Register, Alive, Note, Withdraw, Registered, ConsulDown,
        ConsulUp, KVChanged, Withdrawn, ZygoteReady, ForkPipe, Fork, Forked)
}


# --------------------------------------------------------------------------- encoding


def encode(message: Message) -> bytes:
    """One line on the wire: compact JSON and a newline."""
    return json.dumps({"t": message.kind, **asdict(message)}, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> Message | None:
    """The message on one line, or None when it is not a well-formed message of a known kind."""
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    cls = KINDS.get(obj.get("t"))  # type: ignore[arg-type]
    if cls is None:
        return None
    hints = _hints(cls)
    values: dict[str, Any] = {}
    for f in fields(cls):
        if f.name in obj:
            if not _fits(hints[f.name], obj[f.name]):
                return None
            values[f.name] = obj[f.name]
    return cls(**values)


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _fits(hint: Any, value: Any) -> bool:
    """Whether a JSON value matches a field's annotation (the few shapes used above)."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_fits(arm, value) for arm in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_fits(item, v) for v in value)
    if origin is dict:
        key, item = typing.get_args(hint)
        return isinstance(value, dict) and all(_fits(key, k) and _fits(item, v) for k, v in value.items())
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint)
