"""The lifecycle on a fake clock, driven by the master's own driver (`lifecycle.core.drive`).

The simulator plays the master's effects: a Spawn or a StartHelper becomes a new fake pid,
reported back as the master would report it.  Everything else is recorded for the test to
inspect.  Time only moves when the test says so."""

from __future__ import annotations

import itertools
import random
from typing import Any

from supervisor import proto
from supervisor.lifecycle.actions import Action, Exit, Log, Measure, Spawn, StartHelper, StartZygote
from supervisor.lifecycle.core import Lifecycle, Plan, drive
from supervisor.lifecycle.events import (
    Event, Exited, HelperStarted, Measured, Said, Signalled, Spawned, ZygoteStarted,
)
from supervisor.lifecycle.pool import PoolLimits
from supervisor.lifecycle.shutdown import ShutdownTimes


class Sim:
    def __init__(self, workers: int = 2, rolling: bool = False, *, watcher: bool = False,
                 consul_ttl: float | None = None, withdraw_timeout: float = 5.5, drain_delay: float = 2.0,
                 stop_delay: float = 0.0,
                 max_rss: int = 0, threads: int = 1, **limits: Any) -> None:
        base: dict[str, Any] = dict(boot_timeout=10.0, graceful_timeout=5.0, worker_timeout=0.0)
        base.update(limits)
        plan = Plan(pool=PoolLimits(workers=workers, rolling=rolling, **base),
                    shutdown=ShutdownTimes(withdraw_timeout=withdraw_timeout, drain_delay=drain_delay,
                                           stop_delay=stop_delay),
                    watcher=watcher, consul_ttl=consul_ttl, max_rss=max_rss, threads=threads)
        self.core = Lifecycle(plan, {}, random.Random(1))
        self.pool = self.core.pool
        self.now = 0.0
        self.pids = itertools.count(100)
        self.log: list[object] = []  # every action, in order, with the Exit if one came
        self.timeline: list[tuple[float, object]] = []  # (time, action)
        self.exited_with: Exit | None = None
        self.max_alive_generations = 0
        self.max_alive_workers = 0
        self._batch: list[object] = []
        self.memory: dict[int, Measured] = {}  # what a Measure reports for each pid (none: nothing)

    # ------------------------------------------------------------------ the master's part
    def _carry_out(self, action: Action) -> None:
        self._batch.append(action)
        if isinstance(action, Spawn):
            self.core.handle(Spawned(action.generation, action.slot, next(self.pids)), self.now)
        elif isinstance(action, StartHelper):
            self.core.handle(HelperStarted(action.name, next(self.pids)), self.now)
        elif isinstance(action, StartZygote):
            self.core.handle(ZygoteStarted(action.generation, next(self.pids)), self.now)
        elif isinstance(action, Measure):
            for pid in action.pids:
                if pid in self.memory:
                    self.core.handle(self.memory[pid], self.now)

    def step(self) -> list[object]:
        self._batch = []
        exit = drive(self.core, self.now, self._carry_out)
        if exit is not None:
            self._batch.append(exit)
            self.exited_with = exit
        out, self._batch = self._batch, []
        self.log += out
        self.timeline += [(self.now, a) for a in out]
        self.max_alive_generations = max(self.max_alive_generations, len(self.pool.alive_generations()))
        self.max_alive_workers = max(self.max_alive_workers, len(self.pool.workers))
        return out

    def handle(self, event: Event) -> list[object]:
        self.core.handle(event, self.now)
        return self.step()

    # ------------------------------------------------------------------ conveniences
    def start(self) -> list[object]:
        self.core.start(self.now)
        return self.step()

    def advance(self, seconds: float) -> list[object]:
        self.now += seconds
        return self.step()

    def advance_to_next_deadline(self) -> list[object]:
        deadline = self.core.next_deadline()
        assert deadline is not None, "nothing is due"
        return self.advance(max(0.0, deadline - self.now))

    def signal(self, name: str) -> list[object]:
        return self.handle(Signalled(name))

    def say(self, pid: int, message: proto.Message, fd: int | None = None) -> list[object]:
        return self.handle(Said(pid, message, fd))

    def pids_of(self, generation: int, state: str | None = None) -> list[int]:
        return sorted(w.pid for w in self.pool.workers.values()
                      if w.generation == generation and (state is None or w.state == state))

    def ready_all(self, generation: int) -> list[object]:
        for pid in self.pids_of(generation, "starting"):
            self.pool.ready(self.now, pid)
        return self.step()

    def exit(self, pid: int, status: str = "exit 0") -> list[object]:
        return self.handle(Exited(pid, status))

    def exit_all(self, pids: list[int]) -> list[object]:
        out = []
        for pid in pids:
            out += self.exit(pid)
        return out

    def reload(self, supersede: bool = True) -> list[object]:
        self.pool.reload(self.now, "test", {}, supersede=supersede)
        return self.step()

    def serving(self) -> int:
        gen = self.pool.serving_generation()
        assert gen is not None
        return gen.number


def notes(actions: list[object], event: str) -> list[Log]:
    return [a for a in actions if isinstance(a, Log) and a.event == event]


def running(workers: int = 2, **kw: Any) -> Sim:
    sim = Sim(workers, **kw)
    sim.start()
    for name, helper in sim.core.helpers.items():
        assert helper.pid is not None, name
    sim.ready_all(1)
    assert sim.serving() == 1
    return sim
