"""A worker process: imports the app, then serves HTTP on the inherited sockets.

Life: forked by the master -> reset signals and fds -> import the app (a failure is
reported as `BootError` and the worker exits 3) -> report `Ready` -> wait for the
master's `StartAccepting` -> serve -> on SIGTERM (or the master's death) drain and exit 0.

The worker never accepts before the master says so: that is how a whole new
generation can boot while the old one keeps serving, and swap in only after the
old one stopped accepting.
"""

from __future__ import annotations

import faulthandler
import gc
import os
import signal
import socket
from typing import Any, Callable, NamedTuple, NoReturn

from supervisor import logs, proc, proto
from supervisor.channel import Channel
from supervisor.worker.app import code_fingerprint, interface_of, load_app, prepare_import
# Imported here, in the master, once: every ASGI worker it forks then has asyncio's loop (or
# uvloop's), httptools and wsproto loaded, and boots in a fork's time instead of ~0.1-0.3 s.
# Without one of its dependencies (an install that skipped wsproto) WSGI apps still run, and an
# ASGI app fails to boot with that one line.
try:
    from supervisor.worker.asgi.server import AsgiWorker
except ImportError as exc:
    AsgiWorker = None  # type: ignore[assignment,misc]
    ASGI_UNAVAILABLE = f"ImportError: the ASGI worker cannot run: {exc} (pip install supervise, with its dependencies)"
from supervisor.worker.loop import WorkerLoop
from supervisor.worker.spec import WorkerSpec

EXIT_BOOT_FAILED = 3


class Preloaded(NamedTuple):
    """What a worker forked by its generation's zygote (--preload) starts with."""

    interface: str  # wsgi or asgi
    app: Any
    code: str  # the fingerprint of the code, taken by the zygote right after it imported it


def run(spec: WorkerSpec, listeners: list[socket.socket], chan_sock: socket.socket,
        preloaded: Preloaded | None = None) -> NoReturn:
    """The whole life of a worker, in the child after fork.  Never returns.  `preloaded`:
    (interface, app) already imported by the generation's zygote (--preload)."""
    code = 1
    try:
        code = _run(spec, listeners, chan_sock, preloaded)
    finally:
        os._exit(code)


def _run(spec: WorkerSpec, listeners: list[socket.socket], chan_sock: socket.socket,
         preloaded: Preloaded | None) -> int:
    # SIGTERM only wakes the loop until the loop installs its own handler (that notes it too).
    proc.after_fork({chan_sock.fileno(), spec.lifeline_fd, spec.dump_fd, *(s.fileno() for s in listeners)},
                    on_term=_wake_only)
    proc.set_title(f"worker g{spec.generation}/w{spec.slot}")
    if spec.dump_fd >= 0:  # the master asks for the stacks of a stuck worker before it kills it
        faulthandler.register(signal.SIGUSR2, file=spec.dump_fd, all_threads=True)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    # When the master dies: SIGTERM drains a worker whose loop turns, and the lifeline ends
    # any worker, even one hung in a request or in an import, once the drain's time is up
    # (at once while it has not served yet).  Nothing outlives the master with the port.
    grace = [0.0]
    proc.watch_lifeline(spec.lifeline_fd, lambda: grace[0])
    proc.die_with_parent(spec.master_pid, signal.SIGTERM)
    logs.configure(spec.log_level, spec.log_format, role="worker", generation=spec.generation,
                   worker=spec.slot)
    log = logs.get()
    os.environ.update(spec.env)
    code_dir = os.path.realpath(spec.chdir) if spec.chdir else os.getcwd()
    if spec.chdir:
        os.chdir(code_dir)
    if preloaded is None:
        prepare_import(code_dir)
    chan = Channel(chan_sock, queue_sends=False)
    if preloaded is None:
        app_or_error = load_app(spec.target)
        if isinstance(app_or_error, str):
            return _boot_failed(log, chan, app_or_error)
        kind = interface_of(app_or_error, spec.interface, spec.target)
        if isinstance(kind, str):
            return _boot_failed(log, chan, kind)
    else:
        kind = preloaded.interface, preloaded.app
    interface, app = kind
    # A preloaded worker runs what its zygote imported: its fingerprint, not the files' now.
    imported = preloaded.code if preloaded is not None else None

    def code() -> str:
        return imported if imported is not None else code_fingerprint(code_dir)

    # What the app imported lives as long as the worker: the cyclic garbage collector need not
    # scan it again and again (and copy-on-write pages stay shared with nothing to touch them).
    gc.freeze()
    if interface == "asgi":
        return _run_asgi(spec, app, listeners, chan, log, grace, code)
    loop = WorkerLoop(spec, app, listeners, chan, wake_r, log)
    grace[0] = spec.graceful_timeout
    chan.send(proto.Ready(code()))
    loop.run()
    loop.beat()  # the final count, read by the master before it handles our exit
    return 0


def _boot_failed(log: Any, chan: Channel, error: str) -> int:
    log.error("boot_failed", error=error.splitlines()[0], traceback=error)
    chan.send(proto.BootError(error.splitlines()[0]))
    return EXIT_BOOT_FAILED


def _run_asgi(spec: WorkerSpec, app: Any, listeners: list[socket.socket], chan: Channel, log: Any,
              grace: list[float], code: Callable[[], str]) -> int:
    """An ASGI worker: the lifespan startup runs before Ready, and a failed one is a boot failure."""
    if AsgiWorker is None:
        return _boot_failed(log, chan, ASGI_UNAVAILABLE)
    if spec.threads > 1:
        log.warning("setting_ignored", setting="--threads", why="an ASGI app's coroutines run on the event loop")
    worker = AsgiWorker(spec, app, listeners, chan, log)

    def ready() -> None:
        grace[0] = spec.graceful_timeout
        chan.send(proto.Ready(code(), spec.limit_concurrency or spec.worker_connections))

    error = worker.run(ready)
    if error is not None:
        return _boot_failed(log, chan, error)
    worker.beat()  # the final count, read by the master before it handles our exit
    return 0


def _wake_only(signum: int, frame: Any) -> None:
    """Signal handlers only wake the loop (through the wakeup fd); the loop does the work."""
