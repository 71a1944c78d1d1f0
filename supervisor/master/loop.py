"""The master process: one loop, one inbox, and the effects the lifecycle decides.

Everything the master reacts to arrives through one selector: signals (through
`signal.set_wakeup_fd`), the channels of workers and helpers, and the health endpoint.
Child exits are collected with waitpid(-1) on every turn.  Each input becomes a typed event
for the pure `Lifecycle`; its actions are carried out here: fork, signal, send, log.  The
selector's timeout is the lifecycle's next deadline.  The master never serves a request and
never imports application code.
"""

from __future__ import annotations

import os
import random
import select
import selectors
import signal
import socket
import time
from dataclasses import replace
from typing import Any, Callable, Mapping

import psutil

from supervisor import logs, proc, proto
from supervisor.channel import Channel
from supervisor import channel as channels
from supervisor.lifecycle.actions import (
    Accept, Action, Drain, Exit, Forward, Kill, Log, Measure, Spawn, StartHelper, StartZygote, Tell,
)
from supervisor.lifecycle.core import CONSUL, WATCHER, Lifecycle, Plan, drive
from supervisor.lifecycle.events import (
    Event, Exited, HelperStarted, HelperStartFailed, Measured, Said, SendFailed, Signalled, Spawned, SpawnFailed,
    ZygoteStarted,
)
from supervisor.lifecycle.pool import PoolLimits
from supervisor.lifecycle.shutdown import ShutdownTimes
from supervisor.lifecycle import view
from supervisor.master.health import HealthServer
from supervisor.master.helpers import HelperMain, fork_helper, stop_helper
from supervisor.master.metrics import Metrics
from supervisor.settings import Config, usable_cpus, version
from supervisor.worker import main as worker
from supervisor.worker import zygote as zygotes
from supervisor.worker.spec import ASGI_SPEC, RequestLimits, WorkerSpec

VERSION = version()
EXIT_GRACE = 2.0  # how long the exiting master waits for killed children before leaving
STACK_WAIT = 0.5  # how long a stuck worker gets to write its stacks before SIGKILL
DESCENDANT_GRACE = 1.0  # then: TERM to what the app left behind, KILL after this long
WITHDRAW_MARGIN = 0.5  # on top of the Consul timeout: the helper answers within it
UNCLAIMED_KEPT = 64  # --preload: reaped pids remembered for a zygote's late Forked


def plan_from(config: Config, watcher: bool) -> Plan:
    return Plan(
        pool=PoolLimits(
            workers=config.workers, boot_timeout=config.boot_timeout, graceful_timeout=config.graceful_timeout,
            worker_timeout=config.worker_timeout, rolling=config.reload_strategy == "rolling",
            max_requests=config.max_requests, max_requests_jitter=config.max_requests_jitter,
            boot_concurrency=max(8, 4 * usable_cpus()), max_workers=config.max_workers,
            preload=config.preload, max_memory=config.max_memory),
        shutdown=ShutdownTimes(withdraw_timeout=config.consul_timeout + WITHDRAW_MARGIN,
                               drain_delay=config.consul_drain_delay,
                               stop_delay=config.stop_delay),
        watcher=watcher, debounce=config.watch_debounce,
        consul_ttl=config.consul_ttl if config.consul else None, max_rss=config.max_rss,
        threads=config.threads)


class Master:
    def __init__(self, config: Config, listeners: list[socket.socket], health: socket.socket | None,
                 env: Mapping[str, str], helpers: Mapping[str, HelperMain]) -> None:
        self.config = config
        self.listeners = listeners
        self.log = logs.get()
        self.started = time.monotonic()
        self.helper_mains = dict(helpers)
        self.core = Lifecycle(plan_from(config, WATCHER in helpers), env, random.Random())
        self.sel = selectors.DefaultSelector()
        self.chans: dict[int, Channel] = {}  # child pid -> the master's end of its channel
        self.lifeline = proc.Lifeline()
        self.dumps: dict[int, int] = {}  # worker pid -> read end of its stack-dump pipe
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # --preload: workers a zygote was asked to fork, by (zygote pid, slot): their generation
        # and the master's ends of their channel and stack-dump pipe, until `Forked` names them.
        self.forking: dict[tuple[int, int], tuple[int, socket.socket, int]] = {}
        self.unclaimed: dict[int, str] = {}  # reaped pids nobody claimed yet (a zygote's Forked may follow)
        # Memory per worker for /health and /metrics reads smaps: at most once a second per
        # process, however often the endpoint is asked (a polling loop must not starve the master).
        self.memory = MemoryReadings(_memory, time.monotonic) if config.preload or config.max_memory else None
        metrics = None if config.no_metrics else Metrics(self.core, listeners, _rss, self.memory).render
        self.health = (HealthServer(health, self.sel, self._snapshot, time.monotonic, metrics)
                       if health is not None else None)

    # ------------------------------------------------------------------ loop
    def run(self) -> Exit:
        for sig in proc.MASTER_SIGNALS:
            try:
                signal.signal(sig, _wake_only)
                signal.siginterrupt(sig, False)
            except (OSError, ValueError):
                pass  # reserved where we run (a debugger, valgrind): it keeps its owner's meaning
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, lambda mask: self._on_signals())
        self.core.start(time.monotonic())
        while True:
            now = time.monotonic()
            self._reap(now)
            if self.health is not None:
                self.health.expire(now)
            exit = drive(self.core, now, self._carry_out)
            if exit is not None:
                return self._exit(exit)
            for key, mask in self.sel.select(self._timeout(now)):
                key.data(mask)

    def _timeout(self, now: float) -> float:
        deadlines = [self.core.next_deadline(), self.health.next_deadline() if self.health else None]
        due = min((d for d in deadlines if d is not None), default=now + 60.0)
        return max(0.0, due - now)

    def _handle(self, event: Event) -> None:
        self.core.handle(event, time.monotonic())

    # ------------------------------------------------------------------ actions
    def _carry_out(self, action: Action) -> None:
        if isinstance(action, Log):
            getattr(self.log, action.level.value)(action.event, **action.fields)
        elif isinstance(action, Spawn) and action.zygote is not None:
            self._fork_via_zygote(action)
        elif isinstance(action, Spawn):
            self._spawn(action)
        elif isinstance(action, StartZygote):
            self._start_zygote(action)
        elif isinstance(action, Accept):
            self._tell(action.pid, proto.StartAccepting())
        elif isinstance(action, Drain):
            self._tell(action.pid, proto.Draining(action.why), quiet=True)  # the signal is what drains
            proc.send_signal(action.pid, signal.SIGTERM)
        elif isinstance(action, Kill):
            if action.dump and action.pid in self.dumps:
                self._log_stacks(action.pid, action.reason)
            proc.send_signal(action.pid, signal.SIGKILL)
        elif isinstance(action, Tell):
            self._tell(action.pid, action.message)
        elif isinstance(action, Forward):
            self._forward(action)
        elif isinstance(action, StartHelper):
            self._start_helper(action.name)
        elif isinstance(action, Measure):
            for pid in action.pids:
                if self.config.preload or self.config.max_memory:
                    self._handle(Measured(pid, *_memory(pid)))
                else:
                    self._handle(Measured(pid, _rss(pid)))

    def _spawn(self, action: Spawn) -> None:
        spec = self._worker_spec(action.generation, action.slot, action.env)
        parent, child = channels.pair()
        dump_r, dump_w = os.pipe2(os.O_CLOEXEC)
        try:
            pid = os.fork()
        except OSError as exc:
            for fd in (dump_r, dump_w):
                os.close(fd)
            parent.close()
            child.close()
            self._handle(SpawnFailed(action.generation, action.slot, str(exc)))
            return
        if pid == 0:
            parent.close()
            worker.run(replace(spec, dump_fd=dump_w), self.listeners, child)  # never returns
        child.close()
        os.close(dump_w)
        os.set_blocking(dump_r, False)
        self.dumps[pid] = dump_r
        self._watch_child(pid, Channel(parent, queue_sends=True))
        self._handle(Spawned(action.generation, action.slot, pid))

    def _worker_spec(self, generation: int, slot: int, env: Mapping[str, str]) -> WorkerSpec:
        config = self.config
        return WorkerSpec(
            target=config.app, chdir=config.chdir, generation=generation, slot=slot,
            env={**env, **dict(config.env)}, threads=config.threads,
            keepalive_timeout=config.keepalive_timeout, header_timeout=config.header_timeout,
            body_timeout=config.body_timeout, write_timeout=config.write_timeout,
            request_buffering=config.request_buffering, body_spool_size=config.body_spool_size,
            worker_connections=config.worker_connections,
            limits=RequestLimits(config.limit_request_line, config.limit_request_headers,
                                 config.limit_request_body, config.limit_request_fields,
                                 config.limit_request_field_size, config.limit_request_trailer),
            access_log=config.access_log, log_level=config.log_level, log_format=config.log_format,
            master_pid=os.getpid(), lifeline_fd=self.lifeline.read_fd, graceful_timeout=config.graceful_timeout,
            forwarded_allow_ips=config.forwarded_allow_ips, proxy_protocol=config.proxy_protocol,
            request_timeout=config.request_timeout, access_log_format=config.access_log_format,
            request_id=not config.no_request_id, metrics=not config.no_metrics,
            **{name: getattr(config, name) for name in ASGI_SPEC})

    # ------------------------------------------------------------------ zygotes (--preload)
    def _start_zygote(self, action: StartZygote) -> None:
        spec = self._worker_spec(action.generation, 0, action.env)
        parent, child = channels.pair()
        try:
            pid = os.fork()
        except OSError as exc:
            parent.close()
            child.close()
            self._handle(ZygoteStarted(action.generation, None, str(exc)))
            return
        if pid == 0:
            parent.close()
            zygotes.run(spec, self.listeners, child)  # never returns
        child.close()
        self._watch_child(pid, Channel(parent, queue_sends=True))
        self._handle(ZygoteStarted(action.generation, pid))

    def _fork_via_zygote(self, action: Spawn) -> None:
        """Ask the generation's zygote to fork the worker: it gets the worker's ends of its
        channel and stack-dump pipe, and answers `Forked` with the pid."""
        assert action.zygote is not None
        parent, child = channels.pair()
        dump_r, dump_w = os.pipe2(os.O_CLOEXEC)
        sent = (self._tell(action.zygote, proto.ForkPipe(), dump_w, quiet=True)
                and self._tell(action.zygote, proto.Fork(action.slot), child.fileno(), quiet=True))
        os.close(dump_w)
        child.close()
        if not sent or (action.zygote, action.slot) in self.forking:
            parent.close()
            os.close(dump_r)
            self._handle(SpawnFailed(action.generation, action.slot, "the zygote is gone"))
            return
        self.forking[(action.zygote, action.slot)] = (action.generation, parent, dump_r)

    def _forked(self, zygote: int, message: proto.Forked) -> None:
        entry = self.forking.pop((zygote, message.slot), None)
        if entry is None:
            return
        generation, parent, dump_r = entry
        if message.pid <= 0:
            parent.close()
            os.close(dump_r)
            self._handle(SpawnFailed(generation, message.slot, message.error or "fork failed in the zygote"))
            return
        os.set_blocking(dump_r, False)
        self.dumps[message.pid] = dump_r
        self._watch_child(message.pid, Channel(parent, queue_sends=True))
        self._handle(Spawned(generation, message.slot, message.pid))
        status = self.unclaimed.pop(message.pid, None)
        if status is not None:  # it already exited (and was reaped) before the zygote named it
            self._child_gone(message.pid, status, time.monotonic())

    def _zygote_gone(self, pid: int) -> None:
        """A zygote exited: the workers it was asked for and never named will not come."""
        for key in [k for k in self.forking if k[0] == pid]:
            generation, parent, dump_r = self.forking.pop(key)
            parent.close()
            os.close(dump_r)
            self._handle(SpawnFailed(generation, key[1], "the zygote exited before it forked the worker"))

    def _log_stacks(self, pid: int, reason: str) -> None:
        """A stuck worker is about to be killed: ask it for every thread's stack (faulthandler
        answers from its signal handler, whatever the app is doing) and log them."""
        fd = self.dumps[pid]
        proc.send_signal(pid, signal.SIGUSR2)
        text = b""
        deadline = time.monotonic() + STACK_WAIT
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([fd], [], [], left if not text else min(left, 0.02))
            if not ready:
                if text:
                    break  # it has stopped writing
                continue
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:
                break
            text += chunk
        self.log.error("worker_stack", worker_pid=pid, reason=reason,
                       stacks=text.decode("utf-8", "replace") or "(no answer: the worker is stuck outside Python)")

    def _start_helper(self, name: str) -> None:
        try:
            pid, chan = fork_helper(self.helper_mains[name], name)
        except OSError as exc:
            self._handle(HelperStartFailed(name, str(exc)))
            return
        self._watch_child(pid, chan)
        self._handle(HelperStarted(name, pid))

    def _tell(self, pid: int, message: proto.Message, fd: int | None = None, quiet: bool = False) -> bool:
        """Send to a child; a failure is an event (the child is unreachable) unless `quiet`."""
        chan = self.chans.get(pid)
        sent = chan is not None and not chan.closed and chan.send(message, fd)
        if chan is not None and chan.pending:
            self.sel.modify(chan.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, self._on_child_cb(pid))
        if not sent and not quiet:
            self._handle(SendFailed(pid))
        return sent

    def _forward(self, action: Forward) -> None:
        """A draining worker accepted a connection too late: pass it on (or close it)."""
        sent = action.to is not None and self._tell(action.to, proto.Adopt(), action.fd)
        os.close(action.fd)
        self.log.info("connection_forwarded", from_pid=action.sender, to_pid=action.to, sent=sent)

    # ------------------------------------------------------------------ inputs
    def _on_signals(self) -> None:
        try:
            data = os.read(self._wake_r, 1024)
        except BlockingIOError:
            return
        for signum in data:
            self._handle(Signalled(proc.signal_name(signum)))

    def _watch_child(self, pid: int, chan: Channel) -> None:
        self.chans[pid] = chan
        self.sel.register(chan.sock, selectors.EVENT_READ, self._on_child_cb(pid))

    def _on_child_cb(self, pid: int) -> Callable[[int], None]:
        return lambda mask: self._on_child(pid, mask)

    def _on_child(self, pid: int, mask: int) -> None:
        chan = self.chans.get(pid)
        if chan is None or chan.closed:
            return
        if mask & selectors.EVENT_WRITE:
            if not chan.flush():
                self._handle(SendFailed(pid))
            elif not chan.pending:
                self.sel.modify(chan.sock, selectors.EVENT_READ, self._on_child_cb(pid))
        if mask & selectors.EVENT_READ:
            for received in chan.receive():
                if isinstance(received.message, proto.Forked):
                    self._forked(pid, received.message)
                else:
                    self._handle(Said(pid, received.message, received.fd))
        if chan.closed:
            # Keep the closed channel until the exit is reaped (its last messages were read).
            self.sel.unregister(chan.sock)

    def _reap(self, now: float) -> None:
        for pid, status in proc.reap():
            if self.config.preload and pid not in self.chans:
                # Perhaps a worker that died before its zygote's Forked was read: keep a few.
                self.unclaimed[pid] = status
                while len(self.unclaimed) > UNCLAIMED_KEPT:
                    del self.unclaimed[next(iter(self.unclaimed))]
            self._child_gone(pid, status, now)

    def _child_gone(self, pid: int, status: str, now: float) -> None:
        dump = self.dumps.pop(pid, None)
        if dump is not None:
            os.close(dump)
        chan = self.chans.get(pid)
        if chan is not None:
            self._on_child(pid, selectors.EVENT_READ)  # what it wrote just before exiting
            if not chan.closed:
                self.sel.unregister(chan.sock)
            del self.chans[pid]
            chan.close()
        if self.forking:
            self._zygote_gone(pid)
        self.core.handle(Exited(pid, status, _code_dir_problem(self.config.chdir)), now)

    # ------------------------------------------------------------------ exit
    def _exit(self, action: Exit) -> Exit:
        for name in (WATCHER, CONSUL):
            helper = self.core.helpers.get(name)
            if helper is not None and helper.pid is not None and helper.pid in self.chans:
                stop_helper(helper.pid, self.chans[helper.pid])
        deadline = time.monotonic() + EXIT_GRACE
        while _has_children() and time.monotonic() < deadline:
            # Wait for SIGCHLD (it arrives through the wakeup fd), then reap.
            select.select([self._wake_r], [], [], max(0.0, deadline - time.monotonic()))
            try:
                os.read(self._wake_r, 1024)
            except BlockingIOError:
                pass
            for _ in proc.reap():
                pass
        left = proc.terminate_descendants(DESCENDANT_GRACE)
        if left:
            self.log.info("descendants_terminated", count=left)
        for sock in self.listeners:
            sock.close()  # the unix socket files the master bound are removed by its caller
        if self.health is not None:
            self.health.close()
        if action.code == 0:
            self.log.info("shutdown_finished", uptime=round(time.monotonic() - self.started, 3))
        return action

    def _snapshot(self) -> tuple[bool, dict[str, Any]]:
        healthy, body = view.health(self.core, time.monotonic(), self.started, os.getpid(), _rss, self.memory)
        return healthy, {"version": VERSION, **body}


def _wake_only(signum: int, frame: Any) -> None:
    """Signal handlers only wake the loop (through the wakeup fd); the loop does the work."""


def _rss(pid: int) -> int | None:
    try:
        return psutil.Process(pid).memory_info().rss
    except (psutil.Error, OSError):
        return None


def _memory(pid: int) -> tuple[int | None, int | None, int | None, int | None]:
    """(rss, uss, pss, shared) of a process; Nones when it cannot be read.  Shared: the resident
    pages it shares with other processes (a preloaded worker's with its zygote and siblings)."""
    try:
        info = psutil.Process(pid).memory_full_info()
    except (psutil.Error, OSError):
        return None, None, None, None
    return info.rss, info.uss, getattr(info, "pss", None), max(0, info.rss - info.uss)  # shared: not its own


class MemoryReadings:
    """`read(pid)`, kept for `ttl` seconds: the endpoints' answers may be that old.  Bounded:
    readings of processes that are gone age out when the table grows."""

    LIMIT = 1024

    def __init__(self, read: Callable[[int], Any], clock: Callable[[], float], ttl: float = 1.0) -> None:
        self.read, self.clock, self.ttl = read, clock, ttl
        self.kept: dict[int, tuple[float, Any]] = {}

    def __call__(self, pid: int) -> Any:
        now = self.clock()
        kept = self.kept.get(pid)
        if kept is not None and now - kept[0] < self.ttl:
            return kept[1]
        value = self.read(pid)
        if len(self.kept) >= self.LIMIT:
            self.kept = {p: k for p, k in self.kept.items() if now - k[0] < self.ttl}
        self.kept[pid] = (now, value)
        return value


def _code_dir_problem(path: str | None) -> str | None:
    """What keeps a worker from entering the code directory (it dies before it can say so)."""
    if not path:
        return None
    try:
        if not os.path.isdir(os.path.realpath(path)):
            return f"the code directory {path} is not a directory" if os.path.exists(path) else \
                f"the code directory {path} does not exist"
        if not os.access(path, os.R_OK | os.X_OK):
            return f"the code directory {path} cannot be read (permission denied)"
    except OSError as exc:
        return f"the code directory {path} cannot be read ({exc.strerror})"
    return None


def _has_children() -> bool:
    try:
        return bool(psutil.Process().children())
    except psutil.Error:
        return False
