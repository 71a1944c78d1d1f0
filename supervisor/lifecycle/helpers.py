"""When a helper process (the code watcher, the Consul helper) is started and restarted.

A helper that dies is restarted with capped exponential backoff; one that stayed up for
STABLE_UPTIME has proven itself and starts over from the shortest delay.  The service never
depends on a helper: workers serve whatever happens to one."""

from __future__ import annotations

from dataclasses import dataclass

from supervisor.lifecycle.backoff import HELPER_RESTART

STABLE_UPTIME = 60.0


@dataclass
class HelperSlot:
    name: str
    pid: int | None = None
    failures: int = 0
    start_at: float | None = None  # when to (re)start it; None while it runs or is being started
    started_at: float = 0.0

    def due(self, now: float) -> bool:
        return self.pid is None and self.start_at is not None and now >= self.start_at

    def starting(self) -> None:
        """A StartHelper was emitted: wait for its outcome."""
        self.start_at = None

    def started(self, now: float, pid: int) -> None:
        self.pid, self.started_at, self.start_at = pid, now, None

    def exited(self, now: float, restart: bool) -> float:
        """The helper died (or could not be forked).  Returns the restart delay."""
        stable = self.pid is not None and now - self.started_at >= STABLE_UPTIME
        self.pid = None
        self.failures = 1 if stable else self.failures + 1
        delay = HELPER_RESTART.delay(self.failures)
        self.start_at = now + delay if restart else None
        return delay
