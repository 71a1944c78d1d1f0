"""The one backoff rule: capped exponential, optionally with a few free retries."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """delay(n) for the n-th consecutive failure (n >= 1): 0 for the first `free` failures,
    then base, 2*base, 4*base, ... capped at `cap`."""

    base: float
    cap: float
    free: int = 0

    def delay(self, failures: int) -> float:
        if failures <= self.free:
            return 0.0
        return min(self.cap, self.base * 2 ** (failures - self.free - 1))


# A crashed worker's slot: the first respawn is immediate, then 0.5 s doubling to 15 s.
WORKER_RESPAWN = Backoff(base=0.5, cap=15.0, free=1)
# A crashed helper process (watcher, Consul): 0.5 s doubling to 30 s.
HELPER_RESTART = Backoff(base=0.5, cap=30.0)
# The Consul helper's retries of an unreachable agent: 0.25 s doubling to 60 s.
CONSUL_RETRY = Backoff(base=0.25, cap=60.0)
