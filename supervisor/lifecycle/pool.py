"""Worker generations as explicit state, and the decisions taken on them.

Nothing here touches a process, a clock or a file.  The lifecycle feeds events in
(`spawned`, `ready`, `exited`, `reload`, ...) with the current time, then asks
`decide(now)` for the actions to carry out and `next_deadline()` for how long it may
wait.  Tests replay event histories with a fake clock.

Model
-----
The pool has `workers` slots.  Each slot has at most one *serving* worker (its
`serving` pid) that accepts connections.  A reload builds a new generation of
*replacement* workers, one per slot.  Replacements boot (import the app) and
report ready, but do not accept until the master says so: that only happens
when the swap is made, right after the old workers were told to drain.  So no
client ever sees the new code and then the old one, and a generation that fails
has never accepted a connection and can be killed outright.

Worker states:      starting -> ready -> serving -> draining -> (exited)
                    any state -> killed -> (exited)
Generation states:  starting -> serving -> draining -> stopped
                    starting -> failed | superseded
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Mapping, Protocol, Union

from supervisor.lifecycle.actions import (
    Accept, Action, Drain, Exit, GenerationServing, Kill, Level, Log, Measure, Milestone, PoolEmpty, ReloadFailed,
    Spawn, StartZygote,
)
from supervisor.lifecycle.backoff import WORKER_RESPAWN
from supervisor.lifecycle.metrics import Histogram

STABLE_UPTIME = 10.0  # a worker up this long has proven itself: reset its slot's backoff
RELOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)  # seconds, per reload phase
RELOADS_KEPT = 10  # reloads listed in the health JSON


class WorkerState(str, Enum):
    STARTING = "starting"  # forked, importing the app
    READY = "ready"  # imported, waiting to be told to accept
    SERVING = "serving"
    DRAINING = "draining"  # told to stop accepting and finish
    KILLED = "killed"  # SIGKILL sent


class GenState(str, Enum):
    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"
    SUPERSEDED = "superseded"


class Retire(str, Enum):
    """How the pool empties at shutdown."""

    GRACEFUL = "graceful"  # drain every worker, kill what is left at the graceful timeout
    FAST = "fast"  # kill every worker now


class ZygoteState(str, Enum):
    """--preload: a generation's zygote imports the app once and forks its workers."""

    FORKING = "forking"  # StartZygote emitted, pid not known yet
    STARTING = "starting"  # importing the app
    READY = "ready"  # forks workers on request
    STOPPING = "stopping"  # killed: its generation is retired, or it failed


BOOTING = (WorkerState.STARTING, WorkerState.READY)
LEAVING = (WorkerState.DRAINING, WorkerState.KILLED)


# --------------------------------------------------------------------------- state


@dataclass
class Memory:
    """One process's last memory measurement (bytes; None: not known)."""

    rss: int | None = None
    uss: int | None = None
    pss: int | None = None
    shared: int | None = None
    at: float = 0.0


@dataclass
class Worker:
    pid: int
    generation: int
    slot: int
    spawned_at: float
    last_seen: float
    state: WorkerState = WorkerState.STARTING
    ready_at: float | None = None
    deadline: float | None = None  # drain deadline while draining
    requests: int = 0
    drained_requests: int = 0
    recycle: str | None = None  # why a replacement is wanted (max-requests, max-rss)
    boot_error: str | None = None
    max_requests: int = 0
    busy: int = 0  # requests in its app threads at the last heartbeat
    kill_reason: str | None = None
    started: int = 0  # requests it handed to the app (its first one is reported at once)
    capacity: int = 0  # requests it serves at once (0: the plan's threads)
    memory: Memory = field(default_factory=Memory)


@dataclass
class Slot:
    index: int
    serving: int | None = None
    failures: int = 0
    spawn_at: float | None = None  # when to respawn an empty slot (backoff)
    generation: int = 0  # generation label for a respawn


@dataclass
class Generation:
    number: int
    reason: str
    started_at: float
    env: Mapping[str, str] = field(default_factory=dict)
    state: GenState = GenState.STARTING
    rolling: bool = False
    first: bool = False
    ready_at: float | None = None
    error: str | None = None
    finished_at: float | None = None
    drained_requests: int = 0
    outcome_logged: bool = False
    previous: int | None = None  # the generation this one replaces
    code: str | None = None  # the fingerprint of the code its workers run (from the first ready one)


@dataclass
class Zygote:
    generation: int
    requested_at: float
    pid: int | None = None
    state: ZygoteState = ZygoteState.FORKING
    started_at: float | None = None
    ready_at: float | None = None
    boot_error: str | None = None
    threads: tuple[str, ...] = ()  # threads alive when it was ready to fork (a fork-safety mistake)
    timed_out: bool = False  # killed at the boot timeout
    memory: Memory = field(default_factory=Memory)


@dataclass(frozen=True)
class PoolLimits:
    workers: int
    boot_timeout: float
    graceful_timeout: float
    worker_timeout: float = 0.0  # 0 disables heartbeat checks
    rolling: bool = False
    max_requests: int = 0
    max_requests_jitter: int = 0
    boot_concurrency: int = 8  # most workers importing the app at once: a fork storm never starves the loop
    max_workers: int = 0  # live scaling stops here (0: at `workers`)
    preload: bool = False  # each generation's workers are forked by its zygote
    max_memory: int = 0  # bytes: a reload whose full new generation would not fit rolls instead (0: off)


@dataclass(frozen=True)
class PendingReload:
    reason: str
    env: Mapping[str, str]
    requested_at: float


Output = Union[Action, Milestone]


class Jitter(Protocol):
    """Where --max-requests-jitter comes from (random.Random in the master, seeded in tests)."""

    def randint(self, a: int, b: int) -> int: ...


class Pool:
    """The bookkeeping of slots, workers and generations.  See the module docstring."""

    def __init__(self, limits: PoolLimits, rng: Jitter) -> None:
        self.limits = limits
        self.slots = [Slot(i + 1) for i in range(limits.workers)]
        self.workers: dict[int, Worker] = {}
        self.generations: dict[int, Generation] = {}
        self.pending: PendingReload | None = None
        self.retiring: Retire | None = None
        self.last_reload: Generation | None = None
        self._rng = rng
        self._next_generation = 1
        self._out: list[Output] = []
        self._spawning: set[int] = set()  # slots with a Spawn queued or emitted but not yet `spawned`
        self._queue: list[tuple[int, int]] = []  # (generation, slot) waiting for a boot place
        # What the metrics and the health JSON report (only ever growing, or bounded).
        self.exits: dict[str, int] = {}  # worker exits by reason
        self.reload_results: dict[str, int] = {}  # ok, failed, superseded
        self.reload_phases = {"boot": Histogram(RELOAD_BUCKETS), "drain": Histogram(RELOAD_BUCKETS)}
        self.reloads: deque[dict[str, object]] = deque(maxlen=RELOADS_KEPT)
        self._stale: set[int] = set()  # slots whose respawn loaded other code: refilled by a reload
        self._done = False  # the terminal output (Exit or PoolEmpty) was emitted
        # --preload: each generation's zygote (by generation), and when a generation whose
        # zygote died may start the next one (backoff, like a slot's respawn).
        self.zygotes: dict[int, Zygote] = {}
        self._zygote_failures: dict[int, int] = {}
        self._zygote_at: dict[int, float] = {}
        self._measuring: float | None = None  # --max-memory: when the measure before a reload was asked

    # ------------------------------------------------------------------ queries

    def serving_generation(self) -> Generation | None:
        """The newest generation whose workers serve."""
        serving = [g for g in self.generations.values() if g.state == GenState.SERVING]
        return max(serving, key=lambda g: g.number) if serving else None

    def starting_generation(self) -> Generation | None:
        return next((g for g in self.generations.values() if g.state == GenState.STARTING), None)

    def zygote_of(self, pid: int) -> Zygote | None:
        return next((z for z in self.zygotes.values() if z.pid == pid), None)

    def alive_generations(self) -> set[int]:
        return {w.generation for w in self.workers.values()}

    def serving_workers(self) -> list[Worker]:
        return [w for w in self.workers.values() if w.state == WorkerState.SERVING]

    def handoff_target(self, sender: int) -> int | None:
        """Who serves a connection that draining worker `sender` accepted too late: the
        serving worker of the newest generation with the fewest requests, if it is newer."""
        w = self.workers.get(sender)
        candidates = [c for c in self.serving_workers() if w is None or c.generation > w.generation]
        if not candidates:
            return None
        newest = max(c.generation for c in candidates)
        return min((c for c in candidates if c.generation == newest), key=lambda c: c.requests).pid

    # ------------------------------------------------------------------ events

    def start(self, now: float, env: Mapping[str, str]) -> None:
        gen = self._new_generation(now, "start", env)
        gen.first = True
        for slot in self.slots:
            slot.generation = gen.number
            slot.spawn_at = now

    def reload(self, now: float, reason: str, env: Mapping[str, str], supersede: bool) -> None:
        """Ask for a new generation.

        supersede=True (SIGHUP, KV change): a generation still booting is abandoned so the newest
        code wins.  supersede=False (file watcher): it is left to finish and one more reload is
        queued after it.  Either way a burst of requests leaves exactly one pending reload."""
        if self.retiring:
            return
        self.pending = PendingReload(reason, env, now)
        booting = self.starting_generation()
        if booting and supersede and not booting.first:
            self._abandon(now, booting, GenState.SUPERSEDED, f"superseded by a newer reload ({reason})")

    def resize(self, now: float, count: int, why: str) -> None:
        """Live scaling: serve with `count` workers from now on, through reloads too (a
        generation has one worker per slot).  New slots boot and accept as soon as they are
        ready; removed slots' workers drain (a booting one is killed: it never accepted)."""
        if self.retiring:
            return
        limit = self.limits.max_workers or self.limits.workers
        wanted = min(max(count, 1), limit)
        before = len(self.slots)
        fields: dict[str, object] = {"from": before, "to": wanted, "why": why}
        if wanted != count:
            fields["limit"] = limit if count > limit else 1
        if wanted == before:
            self._emit(Log("workers_not_scaled", fields, Level.WARNING))
            return
        self._emit(Log("workers_scaled", fields, Level.INFO))
        booting = self.starting_generation()
        serving = self.serving_generation()
        for index in range(before + 1, wanted + 1):
            slot = Slot(index, spawn_at=now, generation=serving.number if serving else 0)
            self.slots.append(slot)
            if booting is not None and not booting.rolling:
                slot.spawn_at, slot.generation = None, booting.number
                self._spawn(booting.number, index)  # the reload's generation gets every slot
            elif booting is not None and booting.first:
                slot.generation = booting.number
        for slot in self.slots[wanted:]:
            if slot.serving is not None:
                self._drain(now, self.workers[slot.serving], "scale")
            self._spawning.discard(slot.index)
            self._stale.discard(slot.index)
        del self.slots[wanted:]
        self._queue = [(g, s) for g, s in self._queue if s <= wanted]
        for w in list(self.workers.values()):
            if w.slot > wanted and w.state in BOOTING:
                self._kill(w, "scaled down")

    def spawn_failed(self, now: float, generation: int, slot: int, error: str) -> None:
        """fork() itself failed (out of memory, pid limit): retry that slot with backoff."""
        self._spawning.discard(slot)
        if slot > len(self.slots):
            return  # scaled down since
        gen = self.generations.get(generation)
        if self.limits.preload and gen is not None and gen.state == GenState.STARTING and not gen.first \
                and not gen.rolling:
            # A reload's slot is not respawned while it boots: the reload fails, the old
            # generation serves on (the zygote died under it, or could not fork).
            self._fail(now, gen, f"worker {slot} could not be forked: {error}")
            return
        s = self.slots[slot - 1]
        s.failures += 1
        s.spawn_at = now + WORKER_RESPAWN.delay(s.failures)
        s.generation = generation
        self._emit(Log("spawn_failed", {"worker": slot, "generation": generation, "error": error},
                       Level.ERROR))

    # -------------------------------------------------------------- zygotes (--preload)

    def zygote_started(self, now: float, generation: int, pid: int | None, error: str = "") -> None:
        """The master forked the zygote of `generation` (or could not: `error`)."""
        z = self.zygotes.get(generation)
        if z is None or z.state != ZygoteState.FORKING:
            return
        if pid is None:
            del self.zygotes[generation]
            self._zygote_failed(now, z, f"the zygote could not be forked: {error}")
            return
        z.pid, z.state, z.started_at = pid, ZygoteState.STARTING, now
        self._emit(Log("zygote_started", {"generation": generation, "zygote_pid": pid}))
        if self._zygote_retired(z):
            self._stop_zygote(z, "its generation is retired")

    def zygote_ready(self, now: float, pid: int, threads: tuple[str, ...] = (),
                     connections: tuple[str, ...] = ()) -> None:
        z = self.zygote_of(pid)
        if z is None or z.state != ZygoteState.STARTING:
            return
        z.state, z.ready_at, z.threads = ZygoteState.READY, now, tuple(threads)
        self._zygote_failures.pop(z.generation, None)
        self._zygote_at.pop(z.generation, None)
        fields: dict[str, object] = {"generation": z.generation, "zygote_pid": pid,
                                     "boot_seconds": round(now - (z.started_at or now), 3)}
        self._emit(Log("zygote_ready", fields))
        if threads:
            self._emit(Log("threads_at_fork", {"generation": z.generation, "zygote_pid": pid,
                                               "threads": list(threads),
                                               "hint": "the app started threads at import: they do not "
                                                       "exist in the forked workers"}, Level.WARNING))
        if connections:
            self._emit(Log("connections_at_fork", {"generation": z.generation, "zygote_pid": pid,
                                                   "peers": list(connections),
                                                   "hint": "the app opened connections at import: every worker "
                                                           "would share them; open them per worker"},
                           Level.WARNING))

    def _zygote_exited(self, now: float, z: Zygote, status: str, cause: str | None) -> None:
        del self.zygotes[z.generation]
        gen = self.generations.get(z.generation)
        expected = z.state == ZygoteState.STOPPING
        self._emit(Log("zygote_exited", {"generation": z.generation, "zygote_pid": z.pid, "status": status,
                                         "state": z.state.value}, Level.INFO if expected else Level.WARNING))
        if expected or gen is None:
            return
        if z.state == ZygoteState.READY:
            # Its workers live on (they are the master's children); the next respawn of the
            # generation starts a fresh zygote.
            return
        error = z.boot_error or f"the zygote exited before ready ({status}) with no import error reported"
        if cause:
            error = f"{error}: {cause}"
        self._zygote_failed(now, z, error)

    def _zygote_failed(self, now: float, z: Zygote, error: str) -> None:
        """A zygote that did not come up: a boot failure of its generation (exit 3 at start,
        the old generation serves on at a reload), else retry with backoff."""
        gen = self.generations.get(z.generation)
        if gen is None:
            return
        if gen.state == GenState.STARTING and not (gen.first and self._any_serving()):
            if gen.first:
                self._exit_unbootable(gen, error)
            else:
                self._fail(now, gen, error)
            return
        failures = self._zygote_failures[z.generation] = self._zygote_failures.get(z.generation, 0) + 1
        delay = WORKER_RESPAWN.delay(failures)
        self._zygote_at[z.generation] = now + delay
        self._emit(Log("zygote_failed", {"generation": z.generation, "error": error, "retry_in": delay},
                       Level.ERROR))

    def _zygote_retired(self, z: Zygote) -> bool:
        """No worker of its generation will be forked any more."""
        gen = self.generations.get(z.generation)
        return gen is None or gen.state not in (GenState.STARTING, GenState.SERVING) or self.retiring is not None

    def _stop_zygote(self, z: Zygote, reason: str) -> None:
        if z.state == ZygoteState.STOPPING or z.pid is None:
            return
        z.state = ZygoteState.STOPPING
        self._emit(Kill(z.pid, reason))
        self._emit(Log("zygote_stopping", {"generation": z.generation, "zygote_pid": z.pid, "reason": reason}))

    def _manage_zygotes(self, now: float) -> None:
        for z in list(self.zygotes.values()):
            if z.state == ZygoteState.FORKING or z.state == ZygoteState.STOPPING:
                continue
            if self._zygote_retired(z):
                self._stop_zygote(z, "its generation is retired")
            elif z.state == ZygoteState.STARTING and z.started_at is not None and not z.timed_out \
                    and now >= z.started_at + self.limits.boot_timeout:
                z.timed_out = True
                z.boot_error = f"boot timeout: the zygote was not ready after {self.limits.boot_timeout:g}s"
                assert z.pid is not None
                self._emit(Kill(z.pid, z.boot_error))

    def spawned(self, now: float, generation: int, slot: int, pid: int) -> None:
        self._spawning.discard(slot)
        jitter = self.limits.max_requests_jitter
        limit = self.limits.max_requests + (self._rng.randint(0, jitter) if jitter else 0)
        w = self.workers[pid] = Worker(pid, generation, slot, now, now,
                                       max_requests=limit if self.limits.max_requests else 0)
        self._emit(Log("worker_spawned", {"worker": slot, "generation": generation, "worker_pid": pid}))
        if slot > len(self.slots):
            self._kill(w, "scaled down")

    def ready(self, now: float, pid: int, code: str = "", capacity: int = 0) -> None:
        w = self.workers.get(pid)
        if w is None or w.state != WorkerState.STARTING:
            return
        w.state, w.ready_at, w.last_seen, w.capacity = WorkerState.READY, now, now, capacity
        self._emit(Log("worker_ready", {"worker": w.slot, "generation": w.generation, "worker_pid": pid,
                                        "boot_seconds": round(now - w.spawned_at, 3)}))
        gen = self.generations.get(w.generation)
        if gen is None or not code:
            return
        if gen.code is None:
            gen.code = code
        elif code != gen.code:
            self._code_changed(now, gen, w)

    def _code_changed(self, now: float, gen: Generation, w: Worker) -> None:
        """A worker loaded other code than its generation runs: the code changed on disk since
        the generation booted.  A generation is one version of the code, so that no client
        ever gets the new code and then the old: a reload builds a whole generation of it."""
        self._emit(Log("code_changed_under_generation", {"generation": gen.number, "worker": w.slot,
                                                          "worker_pid": w.pid}, Level.WARNING))
        reason = "the code changed on disk"
        if gen.first and gen.state == GenState.STARTING:
            self.reload(now, reason, gen.env, supersede=False)  # serve at start, then converge
        elif gen.state == GenState.STARTING:
            self._abandon(now, gen, GenState.SUPERSEDED, "the code changed while it booted")
            self.pending = PendingReload(gen.reason, gen.env, now)
        else:  # a respawn or a recycle replacement of a serving generation
            self._kill(w, "it loaded other code than its generation runs")
            self._stale.add(w.slot)
            self.reload(now, reason, gen.env, supersede=False)

    def heartbeat(self, now: float, pid: int, requests: int, drained: int = 0, busy: int = 0,
                  started: int = 0) -> None:
        """A worker's periodic report: requests served so far, since it began draining, and in
        its app threads now."""
        w = self.workers.get(pid)
        if w is None:
            return
        w.last_seen = now
        w.requests, w.drained_requests, w.busy = requests, drained, busy
        w.started = max(started, requests)
        if w.max_requests and requests >= w.max_requests and w.state == WorkerState.SERVING:
            self.recycle(now, pid, f"max-requests ({w.max_requests})")

    def boot_error(self, now: float, pid: int, error: str) -> None:
        w = self.workers.get(pid)
        if w is not None:
            w.boot_error = error
        z = self.zygote_of(pid)
        if z is not None:
            z.boot_error = error

    def recycle(self, now: float, pid: int, reason: str) -> None:
        """Replace one serving worker through the ready-before-retire path."""
        w = self.workers.get(pid)
        if w is None or w.state != WorkerState.SERVING or w.recycle or self.retiring:
            return
        w.recycle = reason
        self._emit(Log("worker_recycle", {"worker": w.slot, "generation": w.generation, "worker_pid": pid,
                                          "reason": reason}))

    def measured(self, now: float, pid: int, rss: int | None, uss: int | None = None, pss: int | None = None,
                 shared: int | None = None) -> None:
        """A worker's or a zygote's memory was read."""
        w = self.workers.get(pid)
        z = self.zygote_of(pid)
        record = w.memory if w is not None else z.memory if z is not None else None
        if record is not None:
            record.rss, record.uss, record.pss, record.shared, record.at = rss, uss, pss, shared, now

    def grace(self, now: float) -> None:
        """The master itself was not running (SIGSTOP, starved): heartbeats it could not read are
        no sign of a hung worker.  Every worker starts a fresh heartbeat period."""
        for w in self.workers.values():
            if w.state in (WorkerState.READY, WorkerState.SERVING):
                w.last_seen = max(w.last_seen, now)

    def unreachable(self, now: float, pid: int) -> None:
        """Its channel broke: a worker we cannot talk to is killed (and replaced)."""
        w = self.workers.get(pid)
        if w is not None:
            self._kill(w, "its channel to the master broke")
        z = self.zygote_of(pid)
        if z is not None and z.pid is not None and z.state != ZygoteState.STOPPING:
            self._emit(Kill(z.pid, "its channel to the master broke (zygote)"))

    def exited(self, now: float, pid: int, status: str, cause: str | None = None) -> bool:
        """A child exited.  Returns False for pids that are not workers (orphans, helpers).
        `cause`: what explains an exit before ready, when the master knows (a missing code
        directory)."""
        w = self.workers.pop(pid, None)
        if w is None:
            z = self.zygote_of(pid)
            if z is None:
                return False
            self._zygote_exited(now, z, status, cause)
            return True
        gen = self.generations.get(w.generation)
        expected = w.state in LEAVING
        fields: dict[str, object] = {"worker": w.slot, "generation": w.generation, "worker_pid": pid,
                                     "status": status, "state": w.state.value, "requests": w.requests}
        if w.state == WorkerState.DRAINING:
            fields["drained_requests"] = w.drained_requests
            if gen is not None:
                gen.drained_requests += w.drained_requests
        self._emit(Log("worker_exited", fields, Level.INFO if expected else Level.WARNING))
        reason = _exit_reason(w)
        self.exits[reason] = self.exits.get(reason, 0) + 1
        if w.slot > len(self.slots):
            return True  # its slot was scaled away
        slot = self.slots[w.slot - 1]
        if slot.serving == pid:
            slot.serving = None
            self._schedule_respawn(now, slot, w)
        elif w.state in BOOTING and gen is not None and gen.state == GenState.STARTING:
            self._replacement_died(now, gen, slot, w, status, cause)
        elif w.state in BOOTING:
            self._schedule_respawn(now, slot, w)  # a respawn or recycle replacement that died
        return True

    def retire_all(self, now: float, how: Retire) -> None:
        """Shutdown: empty the pool (drain, or kill at once).  FAST may follow GRACEFUL."""
        if self.retiring == Retire.FAST or self.retiring == how:
            return
        self.retiring = how
        self.pending = None
        for _, slot in self._queue:
            self._spawning.discard(slot)
        self._queue.clear()
        self._emit(Log("shutdown_begun", {"mode": how.value, "graceful_timeout": self.limits.graceful_timeout}))

    # ------------------------------------------------------------------ decisions

    def decide(self, now: float) -> list[Output]:
        """Everything that is due at `now`.  Call after feeding events; carry the actions out."""
        if self._done:
            return self._flush()
        if self.retiring:
            self._decide_retire(now)
            return self._flush()
        self._check_timeouts(now)
        self._advance_starting(now)
        self._start_pending(now)
        self._fill_slots(now)
        self._finish_generations(now)
        if self.limits.preload:
            self._manage_zygotes(now)
            self._release_preloaded(now)
        else:
            self._release_spawns()
        return self._flush()

    def next_deadline(self) -> float | None:
        """The earliest time at which `decide` may have something new to do."""
        times: list[float] = []
        for w in self.workers.values():
            if w.state == WorkerState.STARTING:
                times.append(w.spawned_at + self.limits.boot_timeout)
            elif w.state == WorkerState.DRAINING and w.deadline is not None:
                times.append(w.deadline)
            elif w.state in (WorkerState.READY, WorkerState.SERVING) and self.limits.worker_timeout:
                times.append(w.last_seen + self.limits.worker_timeout)
        times += [s.spawn_at for s in self.slots if s.spawn_at is not None]
        times += [z.started_at + self.limits.boot_timeout for z in self.zygotes.values()
                  if z.state == ZygoteState.STARTING and z.started_at is not None and not z.timed_out]
        if self._queue:
            times += [t for g, t in self._zygote_at.items() if g not in self.zygotes]
        return min(times) if times else None

    # ------------------------------------------------------------------ internals

    def _emit(self, output: Output) -> None:
        self._out.append(output)

    def _flush(self) -> list[Output]:
        out, self._out = self._out, []
        return out

    def _new_generation(self, now: float, reason: str, env: Mapping[str, str]) -> Generation:
        number = self._next_generation
        self._next_generation += 1
        previous = self.serving_generation()
        gen = Generation(number, reason, now, dict(env), rolling=self.limits.rolling,
                         previous=previous.number if previous else None)
        self.generations[number] = gen
        return gen

    def _spawn(self, generation: int, slot: int) -> None:
        """Queue a worker for `slot`; `_release_spawns` forks it once a boot place is free."""
        self._spawning.add(slot)
        self._queue.append((generation, slot))

    def _release_spawns(self) -> None:
        starting = sum(1 for w in self.workers.values() if w.state == WorkerState.STARTING)
        while self._queue and starting < self.limits.boot_concurrency:
            generation, slot = self._queue.pop(0)
            gen = self.generations.get(generation)
            self._emit(Spawn(generation, slot, gen.env if gen else {}))
            starting += 1

    def _release_preloaded(self, now: float) -> None:
        """--preload: a queued worker is forked by its generation's zygote once that is ready;
        the zygote is started on demand (at most one per generation)."""
        starting = sum(1 for w in self.workers.values() if w.state == WorkerState.STARTING)
        for generation, slot in list(self._queue):
            gen = self.generations.get(generation)
            z = self.zygotes.get(generation)
            if z is None:
                if now < self._zygote_at.get(generation, now):
                    continue  # backoff after a failed zygote
                z = self.zygotes[generation] = Zygote(generation, now)
                self._emit(StartZygote(generation, gen.env if gen else {}))
            if z.state != ZygoteState.READY or starting >= self.limits.boot_concurrency:
                continue
            self._queue.remove((generation, slot))
            self._emit(Spawn(generation, slot, gen.env if gen else {}, zygote=z.pid))
            starting += 1

    def _check_timeouts(self, now: float) -> None:
        for w in list(self.workers.values()):
            if w.state == WorkerState.STARTING and now >= w.spawned_at + self.limits.boot_timeout:
                gen = self.generations[w.generation]
                if gen.state == GenState.STARTING and not gen.first:
                    self._fail(now, gen, f"boot timeout: worker {w.slot} not ready after "
                                         f"{self.limits.boot_timeout:g}s")
                else:
                    self._kill(w, f"boot timeout ({self.limits.boot_timeout:g}s)")
            elif w.state == WorkerState.DRAINING and w.deadline is not None and now >= w.deadline:
                self._kill(w, f"graceful timeout ({self.limits.graceful_timeout:g}s)", dump=True)
            elif (w.state in (WorkerState.READY, WorkerState.SERVING) and self.limits.worker_timeout
                  and now >= w.last_seen + self.limits.worker_timeout):
                self._kill(w, f"no heartbeat for {self.limits.worker_timeout:g}s", dump=True)
        first = next((g for g in self.generations.values() if g.first and g.state == GenState.STARTING), None)
        if first and now >= first.started_at + self.limits.boot_timeout and not self._any_serving():
            self._exit_unbootable(first, f"no worker ready after {self.limits.boot_timeout:g}s")

    def _any_serving(self) -> bool:
        return any(s.serving is not None for s in self.slots)

    def _all_slots_on(self, generation: int) -> bool:
        return all(s.serving is not None and self.workers[s.serving].generation == generation
                   for s in self.slots)

    def _advance_starting(self, now: float) -> None:
        gen = self.starting_generation()
        if gen is None:
            return
        ready = self._workers_of(gen.number, WorkerState.READY)
        if gen.first or gen.rolling:
            for w in ready:
                self._swap_in(now, w)
            if self._all_slots_on(gen.number):
                self._mark_serving(now, gen)
            return
        if len(ready) == len(self.slots):
            # Drain every old worker first, then let the new ones accept: connections that
            # arrive in between wait in the listen queue (the socket never closes).
            for w in sorted(ready, key=lambda w: w.slot):
                old = self.slots[w.slot - 1].serving
                if old is not None:
                    self._drain(now, self.workers[old], "reload")
                    self.slots[w.slot - 1].serving = None
            for w in sorted(ready, key=lambda w: w.slot):
                self._swap_in(now, w)
            self._mark_serving(now, gen)

    def _swap_in(self, now: float, w: Worker) -> None:
        slot = self.slots[w.slot - 1]
        old = slot.serving
        if old is not None and old != w.pid:
            leaving = self.workers[old]
            self._drain(now, leaving, "recycle" if leaving.recycle else "reload")
        slot.serving, slot.generation = w.pid, w.generation
        slot.spawn_at = None
        self._stale.discard(slot.index)
        w.state = WorkerState.SERVING
        self._emit(Accept(w.pid))

    def _mark_serving(self, now: float, gen: Generation) -> None:
        gen.state, gen.ready_at = GenState.SERVING, now
        self.last_reload = gen
        self._emit(Log("generation_ready", {"generation": gen.number, "reason": gen.reason,
                                            "boot_seconds": round(now - gen.started_at, 3),
                                            "first": gen.first}))
        self._emit(GenerationServing(gen.number, gen.first))
        for old in self.generations.values():
            if (old.number != gen.number and old.state == GenState.SERVING
                    and not self._serving_workers(old.number)):
                old.state = GenState.DRAINING

    def _start_pending(self, now: float) -> None:
        """Start the queued reload once nothing else is booting, draining or dying, so at most
        two generations are ever alive: the serving one and the new one."""
        # A reload waits for a generation to have served (the first one), not for a worker serving
        # now: were every worker dead, their respawns would wait for the reload (`_fill_slots`)
        # and the reload for them, for ever.
        if self.pending is None or self.serving_generation() is None or self.starting_generation() is not None:
            return
        if any(w.state != WorkerState.SERVING for w in self.workers.values()):
            return
        if self.limits.max_memory and not self.limits.rolling and self._measuring is None:
            # Measure the serving generation first (the master reports at once), then decide.
            self._measuring = now
            self._emit(Measure(tuple(w.pid for w in self.serving_workers())
                               + tuple(z.pid for z in self.zygotes.values() if z.pid is not None)))
            return
        measured_at, self._measuring = self._measuring, None
        pending, self.pending = self.pending, None
        gen = self._new_generation(now, pending.reason, pending.env)
        if measured_at is not None:
            self._fit_budget(gen, measured_at)
        self._emit(Log("reload_started", {"generation": gen.number, "reason": gen.reason,
                                          "strategy": "rolling" if gen.rolling else "generation",
                                          "waited": round(now - pending.requested_at, 3)}))
        if not gen.rolling:  # rolling spawns one at a time in _roll_next
            for slot in self.slots:
                self._spawn(gen.number, slot.index)

    def _fit_budget(self, gen: Generation, measured_at: float) -> None:
        """--max-memory: a full new generation beside the serving one must fit, else roll.

        The serving generation's memory is the sum of its processes' PSS (shared pages counted
        once: with --preload most of a worker is its zygote's heap); a new generation of the
        same code needs about as much again.  Rolling keeps the overlap to one worker (and,
        with --preload, the new zygote)."""
        serving = self.serving_generation()
        if serving is None:
            return
        procs = [w.memory for w in self._serving_workers(serving.number)]
        zygote = self.zygotes.get(serving.number)
        if zygote is not None:
            procs.append(zygote.memory)
        fresh = [m for m in procs if m.at >= measured_at and (m.pss or m.rss)]
        if not fresh:
            return  # nothing could be measured: no basis for a fallback
        used = sum((m.pss or m.rss or 0) for m in fresh)
        estimate = used * len(procs) // len(fresh)  # the same code again, one per slot
        if used + estimate <= self.limits.max_memory:
            return
        gen.rolling = True
        workers = [w.memory for w in self._serving_workers(serving.number) if w.memory.at >= measured_at]
        one = max((m.uss or m.rss or 0) for m in workers) if workers else 0
        self._emit(Log("reload_strategy_fallback", {
            "generation": gen.number, "strategy": "rolling", "budget": self.limits.max_memory,
            "serving_bytes": used, "new_generation_bytes": estimate, "one_worker_bytes": one,
            "why": f"a full new generation (~{estimate >> 20} MiB) beside the serving one "
                   f"({used >> 20} MiB) would exceed --max-memory ({self.limits.max_memory >> 20} MiB)"},
            Level.WARNING))

    def _fill_slots(self, now: float) -> None:
        gen = self.starting_generation()
        if gen is not None and gen.rolling and not gen.first:
            self._roll_next(gen)
        # While a reload is coming, a respawn or recycle would load the new code into the old
        # generation: the new generation fills those slots instead (a failed reload leaves
        # them to be refilled afterwards).
        reloading = (gen is not None and not gen.first) or (gen is None and self.pending is not None)
        for slot in self.slots:
            if slot.serving is None:
                if reloading or self._slot_booting(slot):
                    continue
                if slot.index in self._stale:
                    slot.spawn_at = slot.spawn_at if slot.spawn_at is not None else now
                if slot.spawn_at is not None and now >= slot.spawn_at:
                    slot.spawn_at = None
                    self._spawn(slot.generation, slot.index)
                continue
            w = self.workers[slot.serving]
            if w.recycle and not reloading and not self._slot_booting(slot):
                self._spawn(w.generation, slot.index)

    def _roll_next(self, gen: Generation) -> None:
        """Rolling: one replacement at a time, never more than workers + 1 processes alive."""
        if self._spawning or self._workers_of(gen.number, *BOOTING):
            return
        if len(self.workers) > len(self.slots):
            return
        todo = [s for s in self.slots if s.serving is None or self.workers[s.serving].generation != gen.number]
        if todo:
            self._spawn(gen.number, todo[0].index)

    def _slot_booting(self, slot: Slot) -> bool:
        return slot.index in self._spawning or any(
            w.slot == slot.index and w.state in BOOTING for w in self.workers.values())

    def _serving_workers(self, generation: int) -> list[Worker]:
        return [self.workers[s.serving] for s in self.slots
                if s.serving is not None and self.workers[s.serving].generation == generation]

    def _workers_of(self, generation: int, *states: WorkerState) -> list[Worker]:
        return [w for w in self.workers.values() if w.generation == generation and w.state in states]

    def _finish_generations(self, now: float) -> None:
        """Recycle replacements and generation bookkeeping: serving -> draining -> stopped."""
        for w in [w for w in self.workers.values() if w.state == WorkerState.READY]:
            if self.generations[w.generation].state != GenState.STARTING:
                self._swap_in(now, w)  # a respawn or a recycle replacement: accept at once
        for gen in self.generations.values():
            alive = any(w.generation == gen.number for w in self.workers.values())
            if gen.state == GenState.SERVING and not self._serving_workers(gen.number):
                newer = self.serving_generation()
                if newer is not None and newer.number > gen.number:
                    gen.state = GenState.DRAINING
            if gen.state == GenState.DRAINING and not alive:
                gen.state, gen.finished_at = GenState.STOPPED, now
            self._log_outcome(now, gen)

    def _log_outcome(self, now: float, gen: Generation) -> None:
        """One reload_finished per reload, once its outcome is final."""
        if gen.first or gen.outcome_logged:
            return
        prev = self.generations.get(gen.previous) if gen.previous else None
        if gen.state in (GenState.FAILED, GenState.SUPERSEDED):
            outcome = gen.state.value
        elif gen.state == GenState.SERVING:
            if prev is not None and prev.state != GenState.STOPPED:
                return  # wait until the old generation has drained
            outcome = "succeeded"
        else:
            return
        gen.outcome_logged = True
        fields: dict[str, object] = {"generation": gen.number, "reason": gen.reason, "outcome": outcome,
                                     "duration": round(now - gen.started_at, 3),
                                     "drained_requests": prev.drained_requests if prev else 0}
        phases: dict[str, float] = {}
        if gen.ready_at is not None:
            fields["ready_after"] = phases["boot"] = round(gen.ready_at - gen.started_at, 3)
            if outcome == "succeeded":
                phases["drain"] = round(now - gen.ready_at, 3)
        if gen.error:
            fields["error"] = gen.error
        result = "ok" if outcome == "succeeded" else outcome
        self.reload_results[result] = self.reload_results.get(result, 0) + 1
        for phase, seconds in phases.items():
            self.reload_phases[phase].observe(seconds)
        self.reloads.append({"generation": gen.number, "trigger": gen.reason, "result": result,
                             "started_at": gen.started_at, "phases": phases, "error": gen.error})
        self._emit(Log("reload_finished", fields, Level.INFO if outcome == "succeeded" else Level.WARNING))

    def _replacement_died(self, now: float, gen: Generation, slot: Slot, w: Worker, status: str,
                          cause: str | None) -> None:
        """A worker of a booting generation exited before ready: the generation cannot boot.
        Whatever ended it (an import error, os._exit at import, a missing code directory, a
        signal), waiting for --boot-timeout would only repeat it: fail now, with the cause."""
        error = w.boot_error or f"worker {w.slot} exited before ready ({status}) with no import error reported"
        if cause:
            error = f"{error}: {cause}"
        if gen.first:
            if not self._any_serving():
                self._exit_unbootable(gen, error)
            else:  # the code boots (a worker serves): this one died of something else
                self._schedule_respawn(now, slot, w)
            return
        self._fail(now, gen, error)

    def _fail(self, now: float, gen: Generation, error: str) -> None:
        self._abandon(now, gen, GenState.FAILED, error)
        self._emit(Log("reload_failed", {"generation": gen.number, "reason": gen.reason, "error": error},
                       Level.ERROR))
        self._emit(ReloadFailed(gen.number, error))
        self.last_reload = gen

    def _abandon(self, now: float, gen: Generation, state: GenState, error: str) -> None:
        """Kill a generation's replacements.  They never accepted a connection, so SIGKILL is
        safe; workers already swapped in (rolling) keep serving."""
        gen.state, gen.error, gen.finished_at = state, error, now
        for w in self._workers_of(gen.number, *BOOTING):
            self._kill(w, state.value)
        for queued in [q for q in self._queue if q[0] == gen.number]:
            self._queue.remove(queued)
            self._spawning.discard(queued[1])

    def _exit_unbootable(self, gen: Generation, error: str) -> None:
        gen.state, gen.error = GenState.FAILED, error
        for w in list(self.workers.values()):
            self._kill(w, "first generation failed")
        for z in self.zygotes.values():
            self._stop_zygote(z, "first generation failed")
        self._done = True
        self._emit(Exit(3, error))

    def _schedule_respawn(self, now: float, slot: Slot, w: Worker) -> None:
        if self.retiring:
            return
        # A worker that took requests proved its code boots and serves: what killed it was most
        # likely a request (an endpoint that crashes), not a crash loop, so its slot comes back
        # at once and the backoff does not grow.  Otherwise one crashing endpoint would push
        # every slot into a long backoff: an outage for every other endpoint.
        proven = w.started > 0 or (w.ready_at is not None and now - w.ready_at >= STABLE_UPTIME)
        slot.failures = 1 if proven else slot.failures + 1
        delay = WORKER_RESPAWN.delay(slot.failures)
        slot.spawn_at = now + delay
        slot.generation = w.generation
        if delay:
            self._emit(Log("worker_backoff", {"worker": slot.index, "failures": slot.failures, "delay": delay},
                           Level.WARNING))

    def _drain(self, now: float, w: Worker, why: str) -> None:
        if w.state in LEAVING:
            return
        w.state, w.deadline = WorkerState.DRAINING, now + self.limits.graceful_timeout
        self._emit(Drain(w.pid, why))
        # Logged by the master as it tells the worker, i.e. when the drain starts: a worker busy
        # in a request on its only thread notices the signal only when that request ends.
        self._emit(Log("worker_draining", {"worker": w.slot, "generation": w.generation, "worker_pid": w.pid,
                                           "why": why, "graceful_timeout": self.limits.graceful_timeout}))

    def _kill(self, w: Worker, reason: str, dump: bool = False) -> None:
        if w.state == WorkerState.KILLED:
            return
        w.state, w.kill_reason = WorkerState.KILLED, reason
        self._emit(Kill(w.pid, reason, dump))
        self._emit(Log("worker_killed", {"worker": w.slot, "generation": w.generation, "worker_pid": w.pid,
                                         "reason": reason}, Level.WARNING))

    def _decide_retire(self, now: float) -> None:
        for w in list(self.workers.values()):
            if self.retiring == Retire.FAST:
                self._kill(w, "fast shutdown")
            elif w.state == WorkerState.SERVING:
                self._drain(now, w, "shutdown")
            elif w.state in BOOTING:
                self._kill(w, "shutdown before ready")
            elif w.state == WorkerState.DRAINING and w.deadline is not None and now >= w.deadline:
                self._kill(w, f"graceful timeout ({self.limits.graceful_timeout:g}s)", dump=True)
        for slot in self.slots:
            slot.serving, slot.spawn_at = None, None
        for z in self.zygotes.values():
            self._stop_zygote(z, "shutdown")
        if not self.workers and not any(z.pid is not None for z in self.zygotes.values()):
            self._done = True
            self._emit(PoolEmpty())


def _exit_reason(w: Worker) -> str:
    """Why a worker is gone, for supervise_worker_exits_total."""
    if w.state == WorkerState.DRAINING:
        return "recycled" if w.recycle else "retired"
    if w.state == WorkerState.KILLED:
        reason = w.kill_reason or ""
        return "timeout" if ("timeout" in reason or "heartbeat" in reason) else "killed"
    if w.state in BOOTING:
        return "boot_failed"
    return "crashed"
