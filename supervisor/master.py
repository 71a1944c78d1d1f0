"""The master: one loop, one inbox.

Everything the master reacts to arrives through one selector: signals (through
`signal.set_wakeup_fd`), worker channels, helper channels (code watcher, Consul)
and the health endpoint.  Child exits are collected with waitpid(-1) on every
turn.  Decisions about workers are taken by `Pool` (pure); this module only
carries them out and wires the inputs.  The master never serves a request and
never imports application code.
"""

from __future__ import annotations

import os
import select
import selectors
import signal
import socket
import time
from dataclasses import dataclass
from typing import Any, Mapping

import psutil

from supervisor import http, logs, pool as pools, reaper
from supervisor.channel import Channel
from supervisor import channel as channels
from supervisor.health import HealthServer
from supervisor.helpers import Helper
from supervisor.pool import Accept, Drain, Exit, Kill, Notify, Pool, Spawn
from supervisor.worker import WorkerSpec
from supervisor import worker as workers

HANDLED_SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD,
                   signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH, signal.SIGTTIN, signal.SIGTTOU)
RSS_INTERVAL = 5.0
EXIT_GRACE = 2.0  # how long the exiting master waits for killed children before leaving


@dataclass
class Stopping:
    """Shutdown before the pool drains: 503 at once, Consul deregistration, drain delay."""

    phase: str  # "deregister" | "delay" | "drain"
    until: float | None


class Master:
    def __init__(self, config: Any, listeners: list[socket.socket], health: socket.socket | None,
                 env: Mapping[str, str], advertise_port: int, health_url: str | None) -> None:
        self.config = config
        self.listeners = listeners
        self.env = dict(env)
        self.log = logs.get()
        self.started = time.monotonic()
        self.pool = Pool(pools.Limits(
            workers=config.workers, boot_timeout=config.boot_timeout,
            graceful_timeout=config.graceful_timeout, worker_timeout=config.worker_timeout,
            rolling=config.reload_strategy == "rolling", max_requests=config.max_requests,
            max_requests_jitter=config.max_requests_jitter,
            retire_early=os.environ.get("SUPERVISE_TEST_RETIRE_EARLY") == "1"))
        self.sel = selectors.DefaultSelector()
        self.chans: dict[int, Channel] = {}  # worker pid -> channel
        self.stopping: Stopping | None = None
        self.next_rss = time.monotonic() + RSS_INTERVAL
        self.next_alive: float | None = None
        self.health = HealthServer(health, self._snapshot) if health is not None else None
        self.watcher: Helper | None = None
        self.debouncer: Any = None
        self.consul: Helper | None = None
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._setup_helpers(advertise_port, health_url)

    # ------------------------------------------------------------------ setup
    def _setup_helpers(self, advertise_port: int, health_url: str | None) -> None:
        config = self.config
        from supervisor import watch

        spec = watch.spec_from_config(config)
        if spec is not None:
            self.debouncer = watch.Debouncer(config.watch_debounce)
            self.watcher = Helper("watcher", lambda sock: watch.helper_main(sock, spec),
                                  on_message=self._on_watcher)
        if config.consul:
            from supervisor import consul

            self.consul = Helper("consul",
                                 lambda sock: consul.helper_main(sock, config, advertise_port, health_url),
                                 on_message=self._on_consul)

    def _install_signals(self) -> None:
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, _wake_only)
            signal.siginterrupt(sig, False)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, self._on_signals)

    # ------------------------------------------------------------------ loop
    def run(self) -> Exit:
        self._install_signals()
        if self.health is not None:
            self.sel.register(self.health.listener, selectors.EVENT_READ, self._on_health_accept)
        now = time.monotonic()
        for helper in self._helpers():
            self._start_helper(helper, now)
        self.pool.start(now, self.env)
        while True:
            now = time.monotonic()
            self._reap(now)
            self._timers(now)
            actions = self.pool.decide(now)
            while actions:  # carrying actions out (a Spawn) can feed the pool new events
                for action in actions:
                    if isinstance(action, Exit):
                        return self._exit(action)
                    self._carry_out(action, now)
                actions = self.pool.decide(now)
            for key, _ in self.sel.select(self._timeout(now)):
                key.data(key.fileobj)

    def _timeout(self, now: float) -> float:
        deadlines = [self.pool.next_deadline(), self.next_rss if self.config.max_rss else None,
                     self.next_alive, self.stopping.until if self.stopping else None,
                     self.debouncer.deadline() if self.debouncer else None,
                     self.health.next_deadline() if self.health else None]
        deadlines += [h.restart_at for h in self._helpers()]
        due = min((d for d in deadlines if d is not None), default=now + 60.0)
        return max(0.0, due - now)

    def _timers(self, now: float) -> None:
        if self.debouncer is not None:
            batch = self.debouncer.take(now)
            if batch is not None:
                self.log.info("code_changed", paths=list(batch.paths_sample), count=batch.count)
                self.pool.reload(now, "code change", self.env, supersede=False)
        if self.config.max_rss and now >= self.next_rss:
            self.next_rss = now + RSS_INTERVAL
            self._check_rss(now)
        if self.next_alive is not None and now >= self.next_alive and self.consul is not None:
            self.consul.send(cmd="alive")
            self.next_alive = now + self.config.consul_ttl / 3
        if self.stopping is not None and self.stopping.until is not None and now >= self.stopping.until:
            self._advance_stop(now)
        if self.health is not None:
            self.health.expire(now)
        for helper in self._helpers():
            if helper.restart_at is not None and now >= helper.restart_at and not self.pool.stopping:
                self._start_helper(helper, now)

    # ------------------------------------------------------------------ actions
    def _carry_out(self, action: Any, now: float) -> None:
        if isinstance(action, Spawn):
            self._spawn(action, now)
        elif isinstance(action, Accept):
            chan = self.chans.get(action.pid)
            if chan is not None:
                chan.send(cmd="accept")
        elif isinstance(action, Drain):
            _signal(action.pid, signal.SIGTERM)
        elif isinstance(action, Kill):
            _signal(action.pid, signal.SIGKILL)
        elif isinstance(action, Notify):
            self._notify(action, now)

    def _spawn(self, action: Spawn, now: float) -> None:
        config = self.config
        gen = self.pool.generations.get(action.generation)
        spec = WorkerSpec(
            target=config.app, chdir=config.chdir, generation=action.generation, slot=action.slot,
            env={**(gen.env if gen else self.env), **dict(config.env)}, threads=config.threads,
            keepalive_timeout=config.keepalive_timeout,
            limits=http.Limits(config.limit_request_line, config.limit_request_headers,
                               config.limit_request_body),
            access_log=config.access_log, log_level=config.log_level, log_format=config.log_format,
            master_pid=os.getpid())
        parent, child = channels.pair()
        try:
            pid = os.fork()
        except OSError as exc:
            parent.close()
            child.close()
            self.pool.spawn_failed(now, action.generation, action.slot, str(exc))
            return
        if pid == 0:
            parent.close()
            workers.run(spec, self.listeners, child)  # never returns
        child.close()
        chan = Channel(parent)
        self.chans[pid] = chan
        self.sel.register(parent, selectors.EVENT_READ, lambda _, pid=pid: self._on_worker(pid))
        self.pool.spawned(now, action.generation, action.slot, pid)

    def _notify(self, note: Notify, now: float) -> None:
        fields = dict(note.fields)
        level = str(fields.pop("level", "info"))
        getattr(self.log, level)(note.event, **fields)
        if self.consul is None:
            return
        if note.event == "generation_ready" and fields.get("first"):
            self._consul_ready(now)
        elif note.event == "reload_failed":
            self.consul.send(cmd="note", text=f"reload to generation {fields['generation']} failed: "
                                              f"{fields['error']}; generation still serving")
        elif note.event == "generation_ready":
            self.consul.send(cmd="note", text=f"generation {fields['generation']} serving")

    # ------------------------------------------------------------------ inputs
    def _on_signals(self, _: Any) -> None:
        try:
            data = os.read(self._wake_r, 1024)
        except BlockingIOError:
            return
        now = time.monotonic()
        for signum in data:
            if signum == signal.SIGHUP:
                self.log.info("reload_requested", signal="SIGHUP")
                self.pool.reload(now, "SIGHUP", self.env, supersede=True)
            elif signum in (signal.SIGTERM, signal.SIGINT):
                name = signal.Signals(signum).name
                if self.stopping is None:
                    self._begin_stop(now, name)
                else:
                    self._fast_stop(now, name, "second stop signal")
            elif signum == signal.SIGQUIT:
                self._fast_stop(now, "SIGQUIT", "fast shutdown requested")
            elif signum != signal.SIGCHLD:
                self.log.info("signal_ignored", signal=signal.Signals(signum).name)

    def _on_worker(self, pid: int) -> None:
        chan = self.chans.get(pid)
        if chan is None or chan.closed:
            return
        now = time.monotonic()
        for message in chan.receive():
            kind = message.get("t")
            if kind == "hb":
                self.pool.heartbeat(now, pid, int(message.get("r", 0)), int(message.get("d", 0)))
            elif kind == "ready":
                self.pool.ready(now, pid)
            elif kind == "boot_error":
                self.pool.boot_error(now, pid, str(message.get("error", "")))
            elif kind == "handoff" and chan.fds:
                self._forward(pid, chan.fds.popleft())
        if chan.closed:
            self.sel.unregister(chan.sock)
            # keep the closed channel until the exit is reaped (its last messages are read)

    def _forward(self, sender: int, fd: int) -> None:
        """A draining worker accepted a connection too late: pass it to a worker of a newer
        generation (or back to the sender, which still serves, when there is none)."""
        target = self.pool.handoff_target(sender) or sender
        chan = self.chans.get(target)
        sent = chan is not None and chan.send_fd(fd, cmd="conn")
        os.close(fd)
        self.log.info("connection_forwarded", from_pid=sender, to_pid=target, sent=sent)

    def _reap(self, now: float) -> None:
        for pid, status in reaper.reap():
            chan = self.chans.get(pid)
            if chan is not None:
                self._on_worker(pid)  # what it wrote just before exiting: its last request count
                if not chan.closed:
                    self.sel.unregister(chan.sock)
                del self.chans[pid]
                chan.sock.close()
            if self.pool.exited(now, pid, status):
                continue
            helper = next((h for h in self._helpers() if h.pid == pid), None)
            if helper is not None:
                self._helper_exited(helper, now, status)
            else:
                self.log.debug("orphan_reaped", child_pid=pid, status=status)

    def _on_health_accept(self, _: Any) -> None:
        assert self.health is not None
        sock = self.health.accept(time.monotonic())
        if sock is not None:
            self.sel.register(sock, selectors.EVENT_READ, self._on_health_client)

    def _on_health_client(self, sock: socket.socket) -> None:
        assert self.health is not None
        fd = sock.fileno()
        self.health.readable(fd)
        if fd not in self.health.clients:
            try:
                self.sel.unregister(sock)
            except (KeyError, ValueError):
                pass

    # ------------------------------------------------------------------ helpers
    def _helpers(self) -> list[Helper]:
        return [h for h in (self.watcher, self.consul) if h is not None]

    def _start_helper(self, helper: Helper, now: float) -> None:
        helper.start(now)
        assert helper.chan is not None
        self.sel.register(helper.chan.sock, selectors.EVENT_READ, lambda _, h=helper: self._on_helper(h))
        self.log.debug("helper_started", helper=helper.name, helper_pid=helper.pid)
        if helper is self.consul and self.pool.serving_generation() and self.stopping is None:
            self._consul_ready(now)  # a restarted Consul helper must register again

    def _consul_ready(self, now: float) -> None:
        """The service is ready: register (the helper retries until Consul answers)."""
        assert self.consul is not None
        self.consul.send(cmd="ready", env=self.env)
        self.next_alive = now

    def _on_helper(self, helper: Helper) -> None:
        chan = helper.chan
        if chan is None:
            return
        for message in chan.receive():
            helper.on_message(message)
        if chan.closed:
            self.sel.unregister(chan.sock)

    def _helper_exited(self, helper: Helper, now: float, status: str) -> None:
        if helper.chan is not None and not helper.chan.closed:
            self.sel.unregister(helper.chan.sock)
        if self.pool.stopping:
            helper.pid = None
            return
        delay = helper.exited(now)
        self.log.warning("helper_exited", helper=helper.name, status=status, restart_in=delay)

    def _on_watcher(self, message: dict[str, Any]) -> None:
        now = time.monotonic()
        event = message.get("event")
        if event == "changed" and self.debouncer is not None:
            self.debouncer.add(now, message.get("paths", []))
        elif event == "watching":
            fallback = message.get("mode") == "polling" and message.get("reason") != "--watch-poll"
            getattr(self.log, "warning" if fallback else "info")(
                "watching", mode=message.get("mode"), paths=message.get("paths"),
                touch_files=message.get("touch_files"), reason=message.get("reason"))
        elif event == "retarget":
            self.log.info("code_retargeted", path=message.get("path"), target=message.get("target"))
        elif event in ("warning", "error"):
            self.log.warning("watcher_" + str(event), message=message.get("message"))

    def _on_consul(self, message: dict[str, Any]) -> None:
        now = time.monotonic()
        event = message.get("event")
        if event == "kv":
            env = {str(k): str(v) for k, v in dict(message.get("env", {})).items()}
            if env != self.env:
                changed = sorted(set(env.items()) ^ set(self.env.items()))
                self.env = env
                self.log.info("config_changed", keys=sorted({k for k, _ in changed}))
                self.pool.reload(now, "consul kv change", self.env, supersede=True)
        elif event == "stopped" and self.stopping is not None and self.stopping.phase == "deregister":
            self._advance_stop(now)

    # ------------------------------------------------------------------ shutdown
    def _begin_stop(self, now: float, why: str) -> None:
        self.log.info("shutdown_requested", signal=why)
        self.next_alive = None
        if self.consul is not None and self.pool.serving_generation():
            self.stopping = Stopping("deregister", now + self.config.consul_timeout + 0.5)
            if self.consul.chan is None:  # crashed and waiting for its restart: withdrawing comes first
                self._start_helper(self.consul, now)
            self.consul.send(cmd="stop", withdraw=True)
        else:
            self.stopping = Stopping("drain", None)
            self.pool.shutdown(now, fast=False)

    def _fast_stop(self, now: float, signame: str, why: str) -> None:
        """Kill the workers now: no Consul withdrawal, no drain."""
        self.log.warning("fast_shutdown", signal=signame, why=why)
        self.stopping = Stopping("drain", None)
        self.next_alive = None
        self.pool.shutdown(now, fast=True)

    def _advance_stop(self, now: float) -> None:
        assert self.stopping is not None
        if self.stopping.phase == "deregister":
            delay = self.config.consul_drain_delay
            self.log.info("drain_delay", seconds=delay)
            self.stopping = Stopping("delay", now + delay)
        elif self.stopping.phase == "delay":
            self.stopping = Stopping("drain", None)
            self.pool.shutdown(now, fast=False)

    def _exit(self, action: Exit) -> Exit:
        for helper in self._helpers():
            helper.stop()
        deadline = time.monotonic() + EXIT_GRACE
        while _has_children() and time.monotonic() < deadline:
            # Wait for SIGCHLD (it arrives through the wakeup fd), then reap.
            select.select([self._wake_r], [], [], max(0.0, deadline - time.monotonic()))
            try:
                os.read(self._wake_r, 1024)
            except BlockingIOError:
                pass
            for _ in reaper.reap():
                pass
        for sock in self.listeners:
            _unlink_unix(sock)
            sock.close()
        if self.health is not None:
            self.health.close()
        if action.code == 0:
            self.log.info("shutdown_finished", uptime=round(time.monotonic() - self.started, 3))
        return action

    # ------------------------------------------------------------------ state
    def _check_rss(self, now: float) -> None:
        for w in list(self.pool.workers.values()):
            if w.state != "serving":
                continue
            rss = _rss(w.pid)
            if rss is not None and rss > self.config.max_rss:
                self.pool.recycle(now, w.pid, f"max-rss ({rss // 1048576} MiB)")

    def _snapshot(self) -> tuple[bool, dict[str, Any]]:
        now = time.monotonic()
        serving = self.pool.serving_generation()
        healthy = serving is not None and self.stopping is None
        last = self.pool.last_reload
        body: dict[str, Any] = {
            "status": "stopping" if self.stopping else ("ok" if serving else "starting"),
            "pid": os.getpid(), "uptime": round(now - self.started, 3),
            "generation": serving.number if serving else None,
            "generations": [{"number": g.number, "state": g.state, "reason": g.reason,
                             "age": round(now - g.started_at, 3)}
                            for g in self.pool.generations.values() if g.state in ("starting", "serving",
                                                                                   "draining")],
            "workers": [{"pid": w.pid, "worker": w.slot, "generation": w.generation, "state": w.state,
                         "requests": w.requests, "rss": _rss(w.pid)}
                        for w in sorted(self.pool.workers.values(), key=lambda w: (w.generation, w.slot))],
            "last_reload": None if last is None or last.first else {
                "generation": last.number, "state": last.state, "reason": last.reason,
                "error": last.error, "seconds_ago": round(now - last.started_at, 3)},
        }
        return healthy, body


def _wake_only(signum: int, frame: Any) -> None:
    """Signal handlers only wake the loop (through the wakeup fd); the loop does the work."""


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _rss(pid: int) -> int | None:
    try:
        return psutil.Process(pid).memory_info().rss
    except (psutil.Error, OSError):
        return None


def _has_children() -> bool:
    try:
        return bool(psutil.Process().children())
    except psutil.Error:
        return False


def _unlink_unix(sock: socket.socket) -> None:
    if sock.family == socket.AF_UNIX:
        try:
            os.unlink(sock.getsockname())
        except OSError:
            pass
