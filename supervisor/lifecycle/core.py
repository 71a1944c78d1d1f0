r"""Lifecycle: every decision of the master, as one pure state machine.

The master reports what happened (`handle(event, now)`), then asks what to do
(`decide(now)`) and when to ask again (`next_deadline()`).  `drive` is that loop, shared
by the master and the tests' simulator:

    signals ----------\                          /--> Spawn, Accept, Drain, Kill
    child messages ----+--> Lifecycle.handle    +---> Tell (a message to a child)
    child exits -------+        |                +---> Forward (a handed-off connection)
    fork outcomes -----+   Lifecycle.decide ----+---> StartHelper, Measure
    measurements -----/   (pool, shutdown,      \--> Log, Exit
                           helpers, Consul link,
                           debounce, timers)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

from supervisor import proto
from supervisor.lifecycle.actions import (
    Action, Exit, Forward, GenerationServing, Kill, Level, Log, Measure, PoolEmpty, ReloadFailed, StartHelper,
    Tell,
)
from supervisor.lifecycle.consul_link import ConsulLink
from supervisor.lifecycle.debounce import Debouncer
from supervisor.lifecycle.events import (
    Event, Exited, HelperStarted, HelperStartFailed, Measured, Said, SendFailed, Signalled, Spawned, SpawnFailed,
    ZygoteStarted,
)
from supervisor.lifecycle.helpers import HelperSlot
from supervisor.lifecycle.metrics import Totals
from supervisor.lifecycle.pool import Jitter, Pool, PoolLimits
from supervisor.lifecycle.shutdown import RetirePool, Shutdown, ShutdownTimes, StartWithdraw, Step

WATCHER, CONSUL = "watcher", "consul"
MEASURE_INTERVAL = 5.0  # how often serving workers' memory is checked against --max-rss
PAUSE_SLACK = 1.0  # run this much later than the deadline it promised, the master was paused
HEARTBEAT_STALE = 3.0  # a serving worker silent this long is busy in a request (or hung)
IGNORED_LOG_INTERVAL = 10.0  # an ignored signal is logged at most once per interval, with a count
GRACEFUL_SIGNALS = ("SIGTERM", "SIGINT", "SIGPWR")
SCALE_SIGNALS = {"SIGTTIN": 1, "SIGTTOU": -1}  # live scaling: one worker more, one fewer


@dataclass(frozen=True)
class Plan:
    """The settings the lifecycle decides with (built by the master from the Config)."""

    pool: PoolLimits
    shutdown: ShutdownTimes
    watcher: bool = False
    debounce: float = 0.3
    consul_ttl: float | None = None  # None: no Consul helper
    max_rss: int = 0  # bytes; 0: never measured
    threads: int = 1  # per worker: a worker with this many requests in its threads is full


class Lifecycle:
    def __init__(self, plan: Plan, env: Mapping[str, str], rng: Jitter) -> None:
        self.plan = plan
        self.env = dict(env)
        self.pool = Pool(plan.pool, rng)
        self.shutdown = Shutdown(plan.shutdown)
        self.helpers: dict[str, HelperSlot] = {}
        self.debouncer: Debouncer | None = None
        self.consul: ConsulLink | None = None
        if plan.watcher:
            self.helpers[WATCHER] = HelperSlot(WATCHER)
            self.debouncer = Debouncer(plan.debounce)
        if plan.consul_ttl is not None:
            self.helpers[CONSUL] = HelperSlot(CONSUL)
            self.consul = ConsulLink(plan.consul_ttl)
        self.next_measure: float | None = None
        self.totals = Totals(proto.DURATION_BUCKETS)
        self._withdraw_on_start = False  # the Consul helper must withdraw as soon as it runs
        self._out: list[Action] = []
        self._exit: Exit | None = None
        self._promised: float | None = None  # the deadline next_deadline() last gave the master
        self._ignored: dict[str, tuple[float, int]] = {}  # signal -> (last logged, suppressed since)

    # ------------------------------------------------------------------ queries
    def available_workers(self, now: float) -> list[int]:
        """Serving workers that can take a request now: their loop answered recently (not stuck
        in a request or hung) and a thread is free."""
        return [w.pid for w in self.pool.serving_workers()
                if now - w.last_seen <= HEARTBEAT_STALE and w.busy < (w.capacity or self.plan.threads)]

    def can_serve(self, now: float) -> bool:
        """Health: no shutdown has begun and some worker can take a request."""
        return self.shutdown.running and bool(self.available_workers(now))

    def helper_named(self, pid: int) -> HelperSlot | None:
        return next((h for h in self.helpers.values() if h.pid == pid), None)

    # ------------------------------------------------------------------ events
    def start(self, now: float) -> None:
        for helper in self.helpers.values():
            helper.start_at = now
        self.pool.start(now, self.env)
        if self.plan.max_rss:
            self.next_measure = now + MEASURE_INTERVAL

    def handle(self, event: Event, now: float) -> None:
        if isinstance(event, Signalled):
            self._signalled(event.name, now)
        elif isinstance(event, Spawned):
            self.pool.spawned(now, event.generation, event.slot, event.pid)
        elif isinstance(event, SpawnFailed):
            self.pool.spawn_failed(now, event.generation, event.slot, event.error)
        elif isinstance(event, ZygoteStarted):
            self.pool.zygote_started(now, event.generation, event.pid, event.error)
        elif isinstance(event, Said):
            self._said(event, now)
        elif isinstance(event, Exited):
            self._exited(event, now)
        elif isinstance(event, HelperStarted):
            self._helper_started(event.name, event.pid, now)
        elif isinstance(event, HelperStartFailed):
            delay = self.helpers[event.name].exited(now, restart=self.shutdown.running)
            self._log("helper_start_failed", Level.ERROR, helper=event.name, error=event.error, restart_in=delay)
        elif isinstance(event, SendFailed):
            self._send_failed(event.pid, now)
        elif isinstance(event, Measured):
            self.pool.measured(now, event.pid, event.rss, event.uss, event.pss, event.shared)
            # Preloaded, a worker's own memory is its USS: the pages it shares with its zygote
            # (and its siblings) are not its own to give back.
            own, what = ((event.uss, "uss ") if self.plan.pool.preload and event.uss is not None
                         else (event.rss, ""))
            if self.plan.max_rss and own is not None and own > self.plan.max_rss:
                self.pool.recycle(now, event.pid, f"max-rss ({what}{own // 1048576} MiB)")

    def _signalled(self, name: str, now: float) -> None:
        if name == "SIGHUP":
            self._log("reload_requested", signal=name)
            self.pool.reload(now, name, self.env, supersede=True)
        elif name in GRACEFUL_SIGNALS:
            registered = self.consul is not None and self.consul.wanted
            self._steps(self.shutdown.stop(now, name, registered), now)
        elif name == "SIGQUIT":
            self._steps(self.shutdown.fast(now, name, "fast shutdown requested"), now)
        elif name in SCALE_SIGNALS:
            self.pool.resize(now, len(self.pool.slots) + SCALE_SIGNALS[name], name)
        elif name != "SIGCHLD":
            self._ignore_signal(name, now)

    def _ignore_signal(self, name: str, now: float) -> None:
        """Every other signal is ignored (none may kill the master by its default action),
        and logged at most once per interval per signal, with how many were not logged."""
        last, suppressed = self._ignored.get(name, (float("-inf"), 0))
        if now - last < IGNORED_LOG_INTERVAL:
            self._ignored[name] = (last, suppressed + 1)
            return
        self._ignored[name] = (now, 0)
        fields: dict[str, object] = {"signal": name}
        if suppressed:
            fields["not_logged"] = suppressed
        self._log("signal_ignored", **fields)

    def _said(self, event: Said, now: float) -> None:
        message, pid = event.message, event.pid
        if event.fd is not None:
            # Only a worker hands off connections; anything else just gets its descriptor closed.
            to = (self.pool.handoff_target(pid) or pid) if pid in self.pool.workers else None
            self._out.append(Forward(event.fd, pid, to))
            return
        if pid in self.pool.workers:
            if isinstance(message, proto.Beat):
                self.pool.heartbeat(now, pid, message.requests, message.drained, message.busy, message.started)
                if message.hist:
                    self.totals.beat(pid, message.counts, message.hist, message.seconds)
            elif isinstance(message, proto.Ready):
                self.pool.ready(now, pid, message.code, message.capacity)
            elif isinstance(message, proto.BootError):
                self.pool.boot_error(now, pid, message.error)
            elif isinstance(message, proto.RequestTimedOut):
                self.pool.recycle(now, pid, f"a request ran past --request-timeout ({message.method} {message.path})")
            return
        if self.pool.zygote_of(pid) is not None:
            if isinstance(message, proto.ZygoteReady):
                self.pool.zygote_ready(now, pid, tuple(message.threads), tuple(message.connections))
            elif isinstance(message, proto.BootError):
                self.pool.boot_error(now, pid, message.error)
            return
        helper = self.helper_named(pid)
        if helper is None:
            return
        if isinstance(message, (proto.HelperWarning, proto.HelperFailing)):
            kind = "warning" if isinstance(message, proto.HelperWarning) else "error"
            self._log(f"{helper.name}_{kind}", Level.WARNING, message=message.message)
        elif helper.name == WATCHER:
            self._from_watcher(message, now)
        else:
            self._from_consul(message, now)

    def _from_watcher(self, message: proto.Message, now: float) -> None:
        if isinstance(message, proto.Changed) and self.debouncer is not None:
            self.debouncer.add(now, message.paths)
        elif isinstance(message, proto.Watching):
            fallback = message.mode == "polling" and message.reason != "--watch-poll"
            fields = {"mode": message.mode, "paths": message.paths, "touch_files": message.touch_files}
            if message.reason:
                fields["reason"] = message.reason
            self._log("watching", Level.WARNING if fallback else Level.INFO, **fields)
        elif isinstance(message, proto.Retarget):
            self._log("code_retargeted", path=message.path, target=message.target)

    def _from_consul(self, message: proto.Message, now: float) -> None:
        assert self.consul is not None
        self.consul.heard(message)
        if isinstance(message, proto.KVChanged):
            env = dict(message.env)
            if env != self.env and self.shutdown.running:
                changed = sorted({k for k, _ in set(env.items()) ^ set(self.env.items())})
                self.env = env
                self._log("config_changed", keys=changed)
                self.pool.reload(now, "consul kv change", self.env, supersede=True)
        elif isinstance(message, proto.Withdrawn):
            self._steps(self.shutdown.withdrawn(now), now)

    def _exited(self, event: Exited, now: float) -> None:
        if self.pool.exited(now, event.pid, event.status, event.cause):
            self.totals.forget(event.pid)
            return
        helper = self.helper_named(event.pid)
        if helper is None:
            self._log("orphan_reaped", Level.DEBUG, child_pid=event.pid, status=event.status)
            return
        delay = helper.exited(now, restart=self.shutdown.running)
        if self.shutdown.running:
            self._log("helper_exited", Level.WARNING, helper=helper.name, status=event.status, restart_in=delay)

    def _helper_started(self, name: str, pid: int, now: float) -> None:
        self.helpers[name].started(now, pid)
        self._log("helper_started", Level.DEBUG, helper=name, helper_pid=pid)
        if name != CONSUL or self.consul is None:
            return
        if self._withdraw_on_start:
            self._withdraw_on_start = False
            self._out.append(Tell(pid, proto.Withdraw(serving=True)))
            return
        for message in self.consul.helper_started(now, self.env, running=self.shutdown.running):
            self._out.append(Tell(pid, message))

    def _send_failed(self, pid: int, now: float) -> None:
        if pid in self.pool.workers or self.pool.zygote_of(pid) is not None:
            self.pool.unreachable(now, pid)
        elif (helper := self.helper_named(pid)) is not None:
            self._out.append(Kill(pid, f"its channel to the master broke ({helper.name} helper)"))

    # ------------------------------------------------------------------ decisions
    def decide(self, now: float) -> list[Action]:
        """Everything due at `now`.  Call again after carrying out what it returned (carrying
        out can report new events) until it returns nothing."""
        if self._exit is not None:
            return self._flush()
        if self._promised is not None and now > self._promised + PAUSE_SLACK:
            # Run this late, the master was not running (SIGSTOP, a starved machine): the
            # heartbeats it could not read say nothing about the workers.
            self._log("master_was_paused", Level.WARNING, seconds=round(now - self._promised, 3))
            self.pool.grace(now)
        self._promised = None
        self._timers(now)
        for output in self.pool.decide(now):
            if isinstance(output, GenerationServing):
                if self.consul is not None:
                    self._tell_consul(self.consul.generation_serving(now, output.number, output.first, self.env))
            elif isinstance(output, ReloadFailed):
                if self.consul is not None:
                    self._tell_consul(self.consul.reload_failed(output.number, output.error))
            elif isinstance(output, PoolEmpty):
                self._finish(Exit(0, "shutdown complete"))
            elif isinstance(output, Exit):
                self._finish(output)
            else:
                self._out.append(output)
        return self._flush()

    def next_deadline(self) -> float | None:
        """The earliest time at which `decide` may have something new to do."""
        times = [self.pool.next_deadline(), self.next_measure, self.shutdown.until]
        if self.debouncer is not None:
            times.append(self.debouncer.deadline())
        if self.consul is not None:
            times.append(self.consul.next_alive)
        if self.shutdown.running:
            times += [h.start_at for h in self.helpers.values()]
        self._promised = min((t for t in times if t is not None), default=None)
        return self._promised

    def _timers(self, now: float) -> None:
        if self.debouncer is not None:
            batch = self.debouncer.take(now)
            if batch is not None and self.shutdown.running:
                self._log("code_changed", paths=list(batch.paths_sample), count=batch.count)
                self.pool.reload(now, "code change", self.env, supersede=False)
        if self.next_measure is not None and now >= self.next_measure:
            self.next_measure = now + MEASURE_INTERVAL
            pids = tuple(w.pid for w in self.pool.serving_workers())
            if pids:
                self._out.append(Measure(pids))
        if self.consul is not None:
            self._tell_consul(self.consul.due(now))
        self._steps(self.shutdown.due(now), now)
        for helper in self.helpers.values():
            if helper.due(now) and self.shutdown.running:
                helper.starting()
                self._out.append(StartHelper(helper.name))

    def _steps(self, steps: list[Step], now: float) -> None:
        """Carry out what the shutdown machine decided."""
        for step in steps:
            if isinstance(step, Log):
                self._out.append(step)
            elif isinstance(step, StartWithdraw):
                self._start_withdraw()
            elif isinstance(step, RetirePool):
                self.pool.retire_all(now, step.how)
        if not self.shutdown.running:
            self.next_measure = None
            if self.consul is not None:
                self.consul.shutdown_began()

    def _start_withdraw(self) -> None:
        consul = self.helpers.get(CONSUL)
        if consul is None:
            return
        if consul.pid is not None:
            self._out.append(Tell(consul.pid, proto.Withdraw(serving=True)))
        else:  # crashed and waiting for its restart: withdrawing comes first
            self._withdraw_on_start = True
            consul.starting()
            self._out.append(StartHelper(CONSUL))

    def _tell_consul(self, messages: list[proto.Message]) -> None:
        pid = self.helpers[CONSUL].pid
        if pid is not None:
            self._out += [Tell(pid, m) for m in messages]

    def _finish(self, exit: Exit) -> None:
        self._exit = exit
        self._out.append(exit)

    def _log(self, event: str, level: Level = Level.INFO, **fields: object) -> None:
        self._out.append(Log(event, fields, level))

    def _flush(self) -> list[Action]:
        out, self._out = self._out, []
        return out


def drive(core: Lifecycle, now: float, carry_out: Callable[[Action], None]) -> Exit | None:
    """Ask for actions and carry them out until nothing is due (carrying out an action can
    report events, e.g. a Spawn reports Spawned).  Returns the Exit once one is decided:
    the actions before it in the same batch are carried out first."""
    while True:
        actions = core.decide(now)
        if not actions:
            return None
        for action in actions:
            if isinstance(action, Exit):
                return action
            carry_out(action)
