"""Consul, the helper process: registration, TTL heartbeats, the KV watch and withdrawal.

The master never does blocking network I/O; it forks this helper and talks to it over a
`supervisor.channel.Channel` (messages in `supervisor.proto`):

  master -> helper
    Register(env)      the service is ready: register (replace-existing-checks) and keep it
                       registered; `env` is the KV environment the master runs with (the KV
                       watch's baseline; without it the first KV read is always reported)
    Alive              the master loop is alive; sent at least every ttl/3
    Note(text)         output of the TTL check (it stays passing); "" clears it
    Withdraw(serving)  deregister (or maintenance), answered with Withdrawn within the Consul
                       timeout whatever Consul does
  helper -> master
    Registered(service_id)   after every successful (re-)registration
    ConsulDown(error)        Consul became unusable (state change only)
    ConsulUp                 Consul usable again (state change only)
    KVChanged(env, index)    KV prefix content differs from the last sent
    Withdrawn(ok, error)

EOF on the channel means the master is gone: `helper_main` returns at once.  Every HTTP call
has a timeout (the Consul timeout; a blocking query adds its wait).
"""

from __future__ import annotations

import contextvars
import os
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import consul.base
import structlog

from supervisor import proto
from supervisor.channel import Channel
from supervisor.consul.client import Client, Unreachable, http_error, kv_query, log_skipped
from supervisor.consul.spec import ConsulError, ConsulSpec, KVContentError, one_line, service_registration, split_kv
from supervisor.lifecycle.backoff import CONSUL_RETRY

KV_WAIT = 60.0  # seconds a KV blocking query may be held by the agent
KV_MIN_INTERVAL = 1.0  # at least this long between the starts of two KV watch cycles


@dataclass
class _State:
    """What the master told us, shared by the helper's threads (guarded by `cond`)."""

    ttl: float
    cond: threading.Condition = field(default_factory=threading.Condition)
    ready: bool = False
    withdrawing: bool = False  # the master asked to withdraw: no more registrations
    closed: bool = False
    last_alive: float = float("-inf")
    note: str = ""
    beat_now: bool = False
    baseline_env: dict[str, str] | None = None

    def alive_recently(self, now: float) -> bool:
        return now - self.last_alive <= self.ttl / 2

    def finished(self) -> bool:
        return self.withdrawing or self.closed

    def sleep(self, seconds: float, wake: Callable[[], bool] = lambda: False) -> None:
        """Wait up to `seconds`; returns early on stop, EOF or `wake()`.  Call with `cond` held."""
        deadline = time.monotonic() + seconds
        while not (self.finished() or wake()):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.cond.wait(left)


class _Retry:
    """Consecutive failures of one activity, and the delay before its next try."""

    def __init__(self) -> None:
        self.failures = 0

    def next(self) -> float:
        self.failures += 1
        return CONSUL_RETRY.delay(self.failures)

    def reset(self) -> None:
        self.failures = 0


class _Link:
    """Consul usable or not, from the helper's point of view: events on state change only.

    Each activity ("service", "kv") reports success or failure; Consul is down while any of
    them fails, up again when all succeed.  Each activity's trouble is logged once.
    """

    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        self._lock = threading.Lock()
        self._failing: dict[str, str] = {}
        self._down = False
        self._log = structlog.get_logger()

    def failed(self, activity: str, error: ConsulError) -> None:
        message = one_line(error)
        with self._lock:
            if activity not in self._failing:
                event = "consul_unreachable" if isinstance(error, Unreachable) else "consul_error"
                self._log.warning(event, activity=activity, error=message)
            self._failing[activity] = message
            if not self._down:
                self._down = True
                self._channel.send(proto.ConsulDown(message))

    def succeeded(self, activity: str) -> None:
        with self._lock:
            if self._failing.pop(activity, None) is not None:
                self._log.info("consul_reachable", activity=activity)
            if self._down and not self._failing:
                self._down = False
                self._channel.send(proto.ConsulUp())


def _service_lost(resp: consul.base.Response) -> bool:
    """A TTL update answered "no such check": the agent lost its state (1.8.7: 500, newer: 404)."""
    body = resp.body if isinstance(resp.body, str) else str(resp.body)
    return resp.code == 404 or (resp.code == 500 and "does not have associated TTL" in body)


def _thread(target: Callable[[], None], name: str) -> None:
    """Start a daemon thread that runs in a copy of the current context, so the structlog
    context variables bound for this process (pid, role...) tag its log events too."""
    threading.Thread(target=contextvars.copy_context().run, args=(target,), name=name, daemon=True).start()


class Agent:
    """The Consul helper process's state: its main thread reads the master's messages, one
    thread keeps the service registered, one watches the KV prefix."""

    def __init__(self, chan: Channel, spec: ConsulSpec) -> None:
        self.chan = chan
        self.spec = spec
        self.registration = service_registration(spec)
        self.service_id: str = self.registration["ID"]
        self.check_id: str = self.registration["Check"]["CheckID"]
        self.kind = spec.check
        self.timeout = spec.timeout
        self.state = _State(ttl=spec.ttl)
        self.link = _Link(chan)
        self.service_lock = threading.Lock()  # one service mutation at a time: withdraw waits for it
        self.prefix = spec.kv_prefix
        self.log = structlog.get_logger()

    # ---------------------------------------------------------------- master side

    def run(self) -> None:
        _thread(self._service_loop, "consul-service")
        if self.prefix is not None:
            _thread(self._kv_loop, "consul-kv")
        poller = select.poll()
        poller.register(self.chan.sock, select.POLLIN)
        try:
            while not self.chan.closed:
                poller.poll()  # the helper's inbox: wait for the master's next message or EOF
                for received in self.chan.receive():
                    self._handle(received.message)
        finally:
            with self.state.cond:
                self.state.closed = True
                self.state.cond.notify_all()

    def _handle(self, message: proto.Message) -> None:
        if isinstance(message, proto.Withdraw):
            self._withdraw_now(serving=message.serving)
            return
        with self.state.cond:
            self.state.last_alive = time.monotonic()  # any message proves the master loop runs
            if isinstance(message, proto.Register) and not self.state.ready:
                self.state.ready = True
                if message.env is not None:
                    self.state.baseline_env = dict(message.env)
            elif isinstance(message, proto.Note):
                self.state.note = message.text
                self.state.beat_now = True
            self.state.cond.notify_all()

    def _withdraw_now(self, serving: bool) -> None:
        """Withdraw the instance, and answer within the Consul timeout whatever Consul does.
        `serving`: the master was serving, so withdraw even if this helper never got Register
        (it was restarted after a crash and had not re-registered yet)."""
        with self.state.cond:
            self.state.withdrawing = True
            was_ready = self.state.ready or serving
            self.state.cond.notify_all()
        result: dict[str, Any] = {}
        done = threading.Event()

        def withdraw() -> None:
            try:
                with self.service_lock:
                    result.update(self._withdraw() if was_ready else {"ok": True, "error": None})
            finally:
                done.set()

        _thread(withdraw, "consul-stop")
        if not done.wait(max(0.05, self.timeout - 0.05)):
            result = {"ok": False, "error": f"Consul did not answer within {self.timeout:g}s"}
            self.log.warning("consul_deregister_failed", service_id=self.service_id, error=result["error"])
        self.chan.send(proto.Withdrawn(bool(result.get("ok")), result.get("error")))

    def _withdraw(self) -> dict[str, Any]:
        client = Client(self.spec)
        maintenance = self.spec.on_stop == "maintenance"
        try:
            if maintenance:
                resp = client.agent_put(f"/v1/agent/service/maintenance/{self.service_id}",
                                        [("enable", "true"), ("reason", "supervise is shutting down")])
            else:
                resp = client.agent_put(f"/v1/agent/service/deregister/{self.service_id}")
            # 404: unknown service (newer Consul; 1.8.7 answers 200 to a deregister): it is gone.
            if resp.code not in (200, 404):
                raise http_error(resp, "maintenance" if maintenance else "deregister")
        except ConsulError as exc:
            self.log.warning("consul_deregister_failed", service_id=self.service_id, error=one_line(exc))
            return {"ok": False, "error": one_line(exc)}
        finally:
            client.http.close()
        self.log.info("consul_maintenance" if maintenance else "consul_deregistered", service_id=self.service_id)
        return {"ok": True, "error": None}

    # ---------------------------------------------------------------- service

    def _service_loop(self) -> None:
        client = Client(self.spec)
        backoff = _Retry()
        registrations = 0
        with self.state.cond:
            while not (self.state.ready or self.state.finished()):
                self.state.cond.wait()
        while True:
            with self.state.cond:
                # A TTL check is registered passing: only while the master loop is alive.
                while self.kind == "ttl" and not (self._alive() or self.state.finished()):
                    self.state.sleep(self.state.ttl / 3, wake=self._alive)
                if self.state.finished():
                    return
            try:
                self._register(client)
            except ConsulError as exc:
                self.link.failed("service", exc)
                with self.state.cond:
                    self.state.sleep(backoff.next())
                continue
            if self.state.finished():
                return
            registrations += 1
            backoff.reset()
            self.link.succeeded("service")
            self.log.info("consul_registered" if registrations == 1 else "consul_reregistered",
                          service_id=self.service_id, check=self.kind)
            self.chan.send(proto.Registered(self.service_id))
            self._keep_registered(client, backoff)
            # returns when the agent lost the service (re-register now) or on stop/EOF

    def _register(self, client: Client) -> None:
        with self.service_lock:
            if self.state.finished():
                return
            resp = client.agent_put("/v1/agent/service/register", [("replace-existing-checks", "true")],
                                    self.registration)
        if resp.code != 200:
            raise http_error(resp, "register")

    def _keep_registered(self, client: Client, backoff: _Retry) -> None:
        """Heartbeats (ttl) or presence checks (http) until the agent lost the service."""
        period = self.state.ttl / 3 if self.kind == "ttl" else self.spec.check_interval
        delay = period
        withheld = False
        while True:
            with self.state.cond:
                self.state.sleep(delay, wake=lambda: self.state.beat_now or (withheld and self._alive()))
                if self.state.finished():
                    return
                self.state.beat_now = False
                alive, note = self._alive(), self.state.note
            if self.kind == "ttl" and not alive:
                if not withheld:
                    self.log.warning("consul_heartbeat_withheld", reason="master loop silent",
                                     seconds=round(self.state.ttl / 2, 3))
                withheld, delay = True, period
                continue
            if withheld:
                self.log.info("consul_heartbeat_resumed")
                withheld = False
            try:
                lost = self._heartbeat(client, note) if self.kind == "ttl" else self._service_missing(client)
            except ConsulError as exc:
                self.link.failed("service", exc)
                delay = min(backoff.next(), period)
                continue
            if lost:
                self.log.warning("consul_service_lost", service_id=self.service_id,
                                 reason="the agent no longer knows the service (restarted?)")
                return
            backoff.reset()
            self.link.succeeded("service")
            delay = period

    def _alive(self) -> bool:
        return self.state.alive_recently(time.monotonic())

    def _heartbeat(self, client: Client, note: str) -> bool:
        """PUT check/pass; True when the agent does not know the check any more."""
        params = [("note", note)] if note else []
        with self.service_lock:
            if self.state.finished():
                return False
            resp = client.agent_put(f"/v1/agent/check/pass/{self.check_id}", params)
        if resp.code == 200:
            return False
        if _service_lost(resp):
            return True
        raise http_error(resp, "TTL heartbeat")

    def _service_missing(self, client: Client) -> bool:
        resp = client.agent_get(f"/v1/agent/service/{self.service_id}")
        if resp.code == 200:
            return False
        if resp.code == 404:
            return True
        raise http_error(resp, "service lookup")

    # ---------------------------------------------------------------- KV

    def _kv_loop(self) -> None:
        """Watch the KV prefix; send `kv` when its content differs from the last sent env.

        Each cycle is a plain read (index 0: never block on it) followed by a blocking read on
        the index it returned.  Starting every cycle at 0 is the "index went backwards: reset
        to 0" rule made unconditional: a blocking query on an index from before an agent
        restart would otherwise hang for the whole wait.  Cycles start at least
        KV_MIN_INTERVAL apart; errors back off 250 ms doubling to 60 s.
        """
        assert self.prefix is not None
        client = Client(self.spec)
        backoff = _Retry()
        with self.state.cond:
            while not (self.state.ready or self.state.finished()):
                self.state.cond.wait()
            watch = _KVWatch(self.prefix, self.state.baseline_env)
        last_start = float("-inf")
        while True:
            with self.state.cond:
                self.state.sleep(last_start + KV_MIN_INTERVAL - time.monotonic())
                if self.state.finished():
                    return
            last_start = time.monotonic()
            try:
                index, items = kv_query(client, self.prefix)
                self._kv_deliver(watch, index, items)
                if index > 0 and not self.state.finished():
                    new_index, items = kv_query(client, self.prefix, index, KV_WAIT)
                    if new_index != index:
                        self._kv_deliver(watch, new_index, items)
            except ConsulError as exc:
                self.link.failed("kv", exc)
                with self.state.cond:
                    self.state.sleep(backoff.next())
                continue
            backoff.reset()

    def _kv_deliver(self, watch: "_KVWatch", index: int, items: Any) -> None:
        self.link.succeeded("kv")
        if self.state.finished():
            return
        env = watch.update(items, self.log)
        if env is not None:
            self.log.info("consul_kv_changed", keys=len(env), index=index)
            self.chan.send(proto.KVChanged(env, index))


class _KVWatch:
    """The env last sent to the master, and the last invalid-content error (logged once)."""

    def __init__(self, prefix: str, baseline: dict[str, str] | None) -> None:
        self.prefix = prefix
        self.last_env = baseline
        self.invalid = ""

    def update(self, items: Any, log: Any) -> dict[str, str] | None:
        """The new env when it differs from the last one sent, else None."""
        try:
            env, skipped = split_kv(self.prefix, items)
        except KVContentError as exc:
            if str(exc) != self.invalid:
                log.warning("consul_kv_invalid", error=one_line(exc))
            self.invalid = str(exc)
            return None
        self.invalid = ""
        if env == self.last_env:
            return None
        log_skipped(skipped)
        self.last_env = env
        return env


def helper_main(sock: socket.socket, spec: ConsulSpec) -> None:
    """Body of the Consul helper process (forked by the master; may use threads, never forks).

    Returns when the master closes its end of `sock`; the caller then `os._exit`s (the
    helper's threads are daemons)."""
    # Inherited from the master through fork: tag our events as this process's.
    structlog.contextvars.bind_contextvars(pid=os.getpid(), role="consul")
    agent = Agent(Channel(sock, queue_sends=False), spec)
    structlog.get_logger().info("consul_helper_started", service_id=agent.service_id, service=spec.service,
                                check=spec.check)
    agent.run()
