"""Shutdown: the one state machine from the first stop signal to the exit.

    running --stop--> withdrawing --Withdrawn or timeout--> delaying --drain delay--> draining
       |                  (Consul)                          (DNS, LBs)               (pool drains)
       +--stop, not registered--------------------------> delaying --stop delay----> draining
       +--stop, not registered, no stop delay--------------------------------------> draining
    any phase --fast stop (SIGQUIT, or a second SIGTERM/SIGINT)--------------------> killing

The service leaves Consul first, then waits `drain_delay` so DNS caches and load balancers
stop sending it traffic, and only then do the workers drain.  Without Consul, `stop_delay`
(0 by default) plays that part for load balancers that learn of the stop some other way (a
Kubernetes Service, a load balancer polling /health).  Health answers 503 from the first step.  Draining and killing end when the pool is empty (`PoolEmpty`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Union

from supervisor.lifecycle.actions import Level, Log
from supervisor.lifecycle.pool import Retire


class Phase(str, Enum):
    RUNNING = "running"
    WITHDRAWING = "withdrawing"  # the Consul helper deregisters; bounded by withdraw_timeout
    DELAYING = "delaying"  # drain delay: let DNS caches and load balancers notice
    DRAINING = "draining"  # the pool drains gracefully
    KILLING = "killing"  # the pool is killed (fast shutdown)


@dataclass(frozen=True)
class ShutdownTimes:
    withdraw_timeout: float  # how long to wait for Consul's answer
    drain_delay: float
    stop_delay: float = 0.0  # not registered with Consul: wait this long before draining


@dataclass(frozen=True)
class StartWithdraw:
    """Ask the Consul helper to withdraw the service."""


@dataclass(frozen=True)
class RetirePool:
    how: Retire


Step = Union[Log, StartWithdraw, RetirePool]


class Shutdown:
    def __init__(self, times: ShutdownTimes) -> None:
        self.times = times
        self.phase = Phase.RUNNING
        self.until: float | None = None  # when the current phase ends by itself

    @property
    def running(self) -> bool:
        return self.phase == Phase.RUNNING

    def stop(self, now: float, signal: str, registered: bool) -> list[Step]:
        """A graceful stop request (SIGTERM, SIGINT).  A second one makes it fast.
        `registered`: the service was announced to Consul, so it withdraws first."""
        if not self.running:
            return self.fast(now, signal, "second stop signal")
        out: list[Step] = [Log("shutdown_requested", {"signal": signal})]
        if registered:
            self._enter(Phase.WITHDRAWING, now + self.times.withdraw_timeout)
            return out + [StartWithdraw()]
        if self.times.stop_delay > 0:
            self._enter(Phase.DELAYING, now + self.times.stop_delay)
            return out + [Log("drain_delay", {"seconds": self.times.stop_delay})]
        self._enter(Phase.DRAINING, None)
        return out + [RetirePool(Retire.GRACEFUL)]

    def fast(self, now: float, signal: str, why: str) -> list[Step]:
        """Kill the workers now: no Consul withdrawal, no drain."""
        if self.phase == Phase.KILLING:
            return []
        self._enter(Phase.KILLING, None)
        return [Log("fast_shutdown", {"signal": signal, "why": why}, Level.WARNING), RetirePool(Retire.FAST)]

    def withdrawn(self, now: float) -> list[Step]:
        """Consul answered the withdrawal (whatever its outcome)."""
        if self.phase != Phase.WITHDRAWING:
            return []
        return self._delay(now)

    def due(self, now: float) -> list[Step]:
        """The current phase's time is up."""
        if self.until is None or now < self.until:
            return []
        if self.phase == Phase.WITHDRAWING:
            return self._delay(now)
        self._enter(Phase.DRAINING, None)
        return [RetirePool(Retire.GRACEFUL)]

    def _delay(self, now: float) -> list[Step]:
        self._enter(Phase.DELAYING, now + self.times.drain_delay)
        return [Log("drain_delay", {"seconds": self.times.drain_delay})]

    def _enter(self, phase: Phase, until: float | None) -> None:
        self.phase, self.until = phase, until
