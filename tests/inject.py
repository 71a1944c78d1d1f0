"""Test-only injection: run supervise with a behaviour changed from outside the product.

    python -m tests.inject NAME[,NAME...] -- SUPERVISE-ARGS...

Each NAME patches the product's classes in this process before `supervisor.cli.main`
runs; workers and helpers are forked from it, so they inherit the patch.  The product
carries no test switch: negative controls and deterministic races live here.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable


def retire_early() -> None:
    """Negative control for the reload order: drain the old generation as soon as a reload
    starts (gunicorn's order), instead of after the new one is ready."""
    from supervisor.lifecycle.pool import Pool

    new_generation = Pool._new_generation

    def patched(self: Pool, now: float, reason: str, env: Any) -> Any:
        gen = new_generation(self, now, reason, env)
        for slot in self.slots:
            if slot.serving is not None:
                self._drain(now, self.workers[slot.serving], "reload")
                slot.serving = None
        return gen

    Pool._new_generation = patched  # type: ignore[method-assign]


def handoff_gate() -> None:
    """Make the accept-after-drain race happen on demand.

    Once the file named by $SUPERVISE_TEST_GATE exists, the first generation-1 worker that
    accepts a connection holds it, as a worker descheduled inside accept() would: it writes
    GATE.held (the test's handshake), then waits (bounded) until the master's SIGTERM has
    arrived before accept() returns.  The worker's check after accept() must then see the
    drain and hand the connection to the master."""
    from supervisor.worker.loop import WorkerLoop

    gate = Path(os.environ["SUPERVISE_TEST_GATE"])
    state: dict[str, Any] = {"generation": None, "term": False}
    init = WorkerLoop.__init__

    def patched_init(self: WorkerLoop, spec: Any, *args: Any, **kwargs: Any) -> None:
        init(self, spec, *args, **kwargs)
        state["generation"] = spec.generation
        loop_handler = signal.getsignal(signal.SIGTERM)

        def on_term(signum: int, frame: Any) -> None:  # the loop's handler, and a note for the gate
            loop_handler(signum, frame)  # type: ignore[operator]
            state["term"] = True

        signal.signal(signal.SIGTERM, on_term)

    accept = socket.socket._accept  # type: ignore[attr-defined]

    def patched_accept(self: socket.socket) -> Any:
        result = accept(self)
        if state["generation"] == 1 and _take(gate):
            Path(f"{gate}.held").write_text(str(os.getpid()))
            deadline = time.monotonic() + 20
            while not state["term"] and time.monotonic() < deadline:
                time.sleep(0.005)  # the held worker's wait for the signal, bounded
        return result

    WorkerLoop.__init__ = patched_init  # type: ignore[method-assign]
    socket.socket._accept = patched_accept  # type: ignore[attr-defined]


def serve_late() -> None:
    """Negative control for the hand-off: a draining worker serves a late connection itself
    (as before the post-accept check existed), so its client gets the old code."""
    from supervisor.worker.loop import WorkerLoop

    def serve_anyway(self: WorkerLoop, sock: socket.socket) -> None:
        self._serve_new(sock, sock.getpeername(), True)

    WorkerLoop._hand_off = serve_anyway  # type: ignore[method-assign]


def handoff_gate_asgi() -> None:
    """handoff-gate for the ASGI worker (supervisor/worker/asgi/server.py): the first
    generation-1 worker that accepts once $SUPERVISE_TEST_GATE exists holds the connection inside
    accept() until the master's SIGTERM has arrived."""
    from supervisor.worker.asgi.server import AsgiWorker

    gate = Path(os.environ["SUPERVISE_TEST_GATE"])
    state: dict[str, Any] = {"generation": None, "term": False}
    init, noted = AsgiWorker.__init__, AsgiWorker._term_arrived

    def patched_init(self: AsgiWorker, spec: Any, *args: Any, **kwargs: Any) -> None:
        init(self, spec, *args, **kwargs)
        state["generation"] = spec.generation

    def patched_term(self: AsgiWorker, signum: int, frame: Any) -> None:
        noted(self, signum, frame)
        state["term"] = True

    accept = socket.socket._accept  # type: ignore[attr-defined]

    def patched_accept(self: socket.socket) -> Any:
        result = accept(self)
        if state["generation"] == 1 and _take(gate):
            Path(f"{gate}.held").write_text(str(os.getpid()))
            deadline = time.monotonic() + 20
            while not state["term"] and time.monotonic() < deadline:
                time.sleep(0.005)  # the held worker's wait for the signal, bounded
        return result

    AsgiWorker.__init__ = patched_init  # type: ignore[method-assign]
    AsgiWorker._term_arrived = patched_term  # type: ignore[method-assign]
    socket.socket._accept = patched_accept  # type: ignore[attr-defined]


def serve_late_asgi() -> None:
    """serve-late for the ASGI worker: a draining worker serves its late connection itself."""
    from supervisor.worker.asgi.server import AsgiWorker

    def serve_anyway(self: AsgiWorker, sock: Any) -> None:
        self._serve(sock, True)

    AsgiWorker._hand_off = serve_anyway  # type: ignore[method-assign]


# --------------------------------------------------------------------------- negative controls for
# the hostile-client and careless-operator cases (tests/test_hostile.py): each puts back the
# behaviour that caused an outage, to show the test would catch it.


def health_leak() -> None:
    """#1: the health server closes an idle client without unregistering it from the selector."""
    from supervisor.master.health import HealthServer

    def close_without_unregister(self: HealthServer, client: Any) -> None:
        if self.clients.pop(client.sock, None) is not None:
            client.sock.close()

    HealthServer._close = close_without_unregister  # type: ignore[method-assign]


def blocking_writes() -> None:
    """#3: a response write waits for the client, holding the worker."""
    import select

    from supervisor.worker.loop import WorkerLoop

    def wait_for_the_client(self: WorkerLoop, conn: Any, progress: bool) -> int:
        if select.select([], [conn.sock], [], self.spec.write_timeout)[1]:
            return self._pump(conn)
        return self._abort(conn)

    WorkerLoop._await_write = wait_for_the_client  # type: ignore[method-assign]


def escalating_backoff() -> None:
    """#5: every crash grows the slot's backoff, even for workers that served."""
    from supervisor.lifecycle.actions import Log
    from supervisor.lifecycle.backoff import WORKER_RESPAWN
    from supervisor.lifecycle.pool import Pool

    def schedule(self: Pool, now: float, slot: Any, w: Any) -> None:
        if self.retiring:
            return
        slot.failures += 1
        delay = WORKER_RESPAWN.delay(slot.failures)
        slot.spawn_at, slot.generation = now + delay, w.generation
        if delay:
            self._emit(Log("worker_backoff", {"worker": slot.index, "failures": slot.failures, "delay": delay}))

    Pool._schedule_respawn = schedule  # type: ignore[method-assign]


def unbounded_boots() -> None:
    """#4: every worker of the pool is forked at once."""
    from supervisor.master import loop

    loop.usable_cpus = lambda: 100_000  # type: ignore[assignment]


def accept_spin() -> None:
    """#6: accept() failing for lack of descriptors is logged and retried at once."""
    from supervisor.worker.loop import WorkerLoop

    def log_and_retry(self: WorkerLoop, exc: OSError) -> None:
        self.log.warning("accept_failed", error=str(exc))

    WorkerLoop._accept_failed = log_and_retry  # type: ignore[method-assign]


def no_lifeline() -> None:
    """#7: workers rely on the parent-death signal alone."""
    from supervisor import proc

    proc.watch_lifeline = lambda read_fd, grace: None  # type: ignore[assignment]


def no_descendant_sweep() -> None:
    """#8: the exiting master leaves the app's daemons alone."""
    from supervisor import proc

    proc.terminate_descendants = lambda grace: 0  # type: ignore[assignment]


def no_pause_grace() -> None:
    """#9: the master judges heartbeats right after it was paused."""
    from supervisor.lifecycle import core

    core.PAUSE_SLACK = float("inf")  # type: ignore[misc]


def default_signals() -> None:
    """#10: the master handles only the signals it used to."""
    from supervisor import proc

    proc.MASTER_SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD,
                           signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH, signal.SIGTTIN, signal.SIGTTOU)


def idle_no_peek() -> None:
    """#11: an idle keep-alive connection past its timeout is closed, unread bytes or not."""
    from supervisor.worker.loop import WorkerLoop

    WorkerLoop._idle_expired = lambda self, conn, now: self._linger(conn, now)  # type: ignore[method-assign]


def unsolicited_response() -> None:
    """The HTTP fuzz test's negative control: an error answered with a 200 and then the error
    (three responses for two requests, the trailer bug of old)."""
    from supervisor.worker.wsgi import Adapter

    error_bytes = Adapter.error_bytes

    def twice(self: Adapter, code: int) -> bytes:
        return b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n" + error_bytes(self, code)

    Adapter.error_bytes = twice  # type: ignore[method-assign]


def no_response_validation() -> None:
    """The response-splitting negative control: the app's header lines go out as they are."""
    from supervisor.worker import wsgi

    def as_is(self: Any, header: Any) -> tuple[bytes, int]:
        name, value = header
        return f"{name}: {value}\r\n".encode("latin-1"), wsgi._KINDS.get(name.lower(), 0)

    wsgi._Heads.line = as_is  # type: ignore[method-assign]


def _take(path: Path) -> bool:
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return False


def scale_down_kills() -> None:
    """Negative control for live scaling: a removed slot's worker is killed, not drained."""
    from supervisor.lifecycle.pool import Pool

    resize = Pool.resize

    def patched(self: Pool, now: float, count: int, why: str) -> None:
        before = {s.index: s.serving for s in self.slots}
        resize(self, now, count, why)
        for index, pid in before.items():
            if index > len(self.slots) and pid in self.workers:
                self._kill(self.workers[pid], "scaled down (killed)")

    Pool.resize = patched  # type: ignore[method-assign]


def raw_access_log() -> None:
    """The combined access log without its escaping: hostile values go into the line as they are."""
    from supervisor.worker import accesslog

    def as_is(value: str | bytes, limit: int, unsafe: Any = None) -> str:
        return value.decode("latin-1") if isinstance(value, bytes) else value

    accesslog.escape = as_is  # type: ignore[assignment]


def workers_die_with_zygote() -> None:
    """Negative control for --preload: a naive zygote forks its workers once, so they are its
    children, with their parent-death signal tied to it: a dead zygote takes them along."""
    from dataclasses import replace

    from supervisor.worker import main as worker
    from supervisor.worker import zygote

    def single_fork(spec: Any, kind: Any, listeners: Any, chan_fd: int, chan: Any, exiting: Any) -> tuple[int, str]:
        pid = os.fork()
        if pid == 0:
            chan.sock.detach()
            worker.run(replace(spec, master_pid=os.getppid()), listeners, socket.socket(fileno=chan_fd),
                       preloaded=kind)
        return pid, ""

    zygote._fork_worker = single_fork  # type: ignore[assignment]


PATCHES: dict[str, Callable[[], None]] = {
    "workers-die-with-zygote": workers_die_with_zygote,
    "raw-access-log": raw_access_log,
    "retire-early": retire_early,
    "handoff-gate": handoff_gate,
    "serve-late": serve_late,
    "handoff-gate-asgi": handoff_gate_asgi,
    "serve-late-asgi": serve_late_asgi,
    "health-leak": health_leak,
    "blocking-writes": blocking_writes,
    "escalating-backoff": escalating_backoff,
    "unbounded-boots": unbounded_boots,
    "accept-spin": accept_spin,
    "no-lifeline": no_lifeline,
    "no-descendant-sweep": no_descendant_sweep,
    "no-pause-grace": no_pause_grace,
    "default-signals": default_signals,
    "idle-no-peek": idle_no_peek,
    "unsolicited-response": unsolicited_response,
    "no-response-validation": no_response_validation,
    "scale-down-kills": scale_down_kills,
}


def main(argv: list[str]) -> int:
    split = argv.index("--")
    for name in ",".join(argv[:split]).split(","):
        PATCHES[name]()
    from supervisor.cli import main as supervise

    return supervise(argv[split + 1:])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
