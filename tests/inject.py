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
                self._drain(now, self.workers[slot.serving])
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

        def on_term(signum: int, frame: Any) -> None:  # the wakeup fd still gets the signal
            state["term"] = True

        signal.signal(signal.SIGTERM, on_term)

    accept = socket.socket.accept

    def patched_accept(self: socket.socket) -> Any:
        result = accept(self)
        if state["generation"] == 1 and _take(gate):
            Path(f"{gate}.held").write_text(str(os.getpid()))
            deadline = time.monotonic() + 20
            while not state["term"] and time.monotonic() < deadline:
                time.sleep(0.005)  # the held worker's wait for the signal, bounded
        return result

    WorkerLoop.__init__ = patched_init  # type: ignore[method-assign]
    socket.socket.accept = patched_accept  # type: ignore[method-assign]


def serve_late() -> None:
    """Negative control for the hand-off: a draining worker serves a late connection itself
    (as before the post-accept check existed), so its client gets the old code."""
    from supervisor.worker.loop import WorkerLoop

    def serve_anyway(self: WorkerLoop, sock: socket.socket) -> None:
        self._serve_new(sock, sock.getpeername(), True)

    WorkerLoop._hand_off = serve_anyway  # type: ignore[method-assign]


def _take(path: Path) -> bool:
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return False


PATCHES: dict[str, Callable[[], None]] = {
    "retire-early": retire_early,
    "handoff-gate": handoff_gate,
    "serve-late": serve_late,
}


def main(argv: list[str]) -> int:
    split = argv.index("--")
    for name in ",".join(argv[:split]).split(","):
        PATCHES[name]()
    from supervisor.cli import main as supervise

    return supervise(argv[split + 1:])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
