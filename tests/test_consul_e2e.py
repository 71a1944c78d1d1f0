"""supervise end to end against a real Consul agent (tests/consul_agent.py).

Every test runs the real `supervise` process (tests/harness.py) against a throwaway
`consul agent -dev` on loopback.  Nothing sleeps for a fixed time: tests wait on log events,
on what the agent answers, or on deadlines.

Times: the `_t` a harness event carries is when the test *read* the line.  Ordering claims
("gone from ?passing before the workers drain") use the event's own `timestamp` (wall clock,
written by the emitting process) against the wall-clock bounds of each agent poll, so a
claim is only accepted when it cannot be an artefact of reading the log late.

Catalog vs agent: `/v1/health/...` answers from the catalog, where a status change lands at
once but an output-only change (a note on a passing check) waits for the agent's
`check_update_interval` (5 min).  Check *outputs* are therefore read from the agent itself
(`/v1/agent/checks`); statuses from the catalog, which is what callers see.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.consul_agent import ConsulAgent, wait_until
from tests.harness import (Load, Supervise, assert_monotonic_versions, http_get, hup_reloads_under_load,
                           slow_started, write_app)

pytestmark = pytest.mark.consul

SERVICE = "web"
HOST = socket.gethostname()
TTL = 3.0  # heartbeats every second; short enough that a missed heartbeat shows within a test
BROKEN_IMPORT = 'raise RuntimeError("broken deploy")'
PREFIX = "web/config"


# --------------------------------------------------------------------------- helpers


def start(supervise: Any, app_dir: Path, agent: ConsulAgent, *extra: str, workers: int = 2,
          **kwargs: Any) -> Supervise:
    """supervise with Consul on `agent`.  `extra` comes last, so it overrides the defaults here."""
    return supervise("app", "--workers", str(workers), "--chdir", str(app_dir), "--no-watch",
                     "--consul", agent.addr, "--consul-service", SERVICE, "--consul-timeout", "2",
                     "--consul-ttl", f"{TTL:g}s", "--consul-drain-delay", "0.2", *extra, **kwargs)


def service_id(sv: Supervise) -> str:
    """The default service ID: NAME-HOSTNAME-PORT."""
    return f"{SERVICE}-{HOST}-{sv.port}"


def wall(event: dict[str, Any]) -> float:
    """Wall-clock time at which the emitting process wrote the event."""
    return datetime.fromisoformat(event["timestamp"]).timestamp()


def mono(event: dict[str, Any]) -> float:
    """The event's emission time on this process's monotonic clock (Load results use it)."""
    return wall(event) - (time.time() - time.monotonic())


def wait_passing(agent: ConsulAgent, sid: str, timeout: float = 15.0) -> list[dict[str, Any]]:
    return wait_until(lambda: [e for e in agent.passing(SERVICE) if e["Service"]["ID"] == sid],
                      timeout, f"{sid} passing in Consul")


def agent_check(agent: ConsulAgent, check_id: str) -> dict[str, Any] | None:
    """The agent's own view of a check (outputs are current here, see the module docstring)."""
    status, checks = agent.request("GET", "/v1/agent/checks")
    assert status == 200, checks
    return checks.get(check_id)


def events_after(sv: Supervise, event: str, after: float, **match: Any) -> list[dict[str, Any]]:
    return [e for e in sv.find(event, **match) if wall(e) >= after]


def index_of(sv: Supervise, event: str, **match: Any) -> int:
    """Position of the first such event in the log (one stdout pipe: the write order)."""
    for i, e in enumerate(list(sv.events)):
        if e.get("event") == event and all(e.get(k) == v for k, v in match.items()):
            return i
    raise AssertionError(f"no {event} {match} in the log")


@dataclass
class Sample:
    t0: float  # wall clock when the poll started
    t1: float  # wall clock when its answers were all in
    passing: list[str] | None = None  # service IDs listed by /v1/health/service/NAME?passing
    checks: list[dict[str, Any]] | None = None  # /v1/health/checks/NAME
    error: str | None = None

    def registered(self, sid: str) -> bool:
        return any(c.get("ServiceID") == sid for c in self.checks or ())

    def status(self, check_id: str) -> str | None:
        return next((c["Status"] for c in self.checks or () if c["CheckID"] == check_id), None)


class Sampler:
    """Polls ?passing and the service's checks every `interval` in a thread, until stopped."""

    def __init__(self, agent: ConsulAgent, interval: float = 0.05) -> None:
        self.agent = agent
        self.interval = interval
        self.samples: list[Sample] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> list[Sample]:
        self._stop.set()
        self._thread.join(10)
        return self.taken()

    def taken(self) -> list[Sample]:
        with self._lock:
            return list(self.samples)

    def _run(self) -> None:
        deadline = time.monotonic() + 600  # bounded even if a test forgets to stop us
        while not self._stop.is_set() and time.monotonic() < deadline:
            t0 = time.time()
            try:
                passing = [e["Service"]["ID"] for e in self.agent.passing(SERVICE)]
                checks = self.agent.checks(SERVICE)
                sample = Sample(t0, time.time(), passing, checks)
            except Exception as exc:  # noqa: BLE001 - recorded, the test decides
                sample = Sample(t0, time.time(), error=f"{type(exc).__name__}: {exc}")
            with self._lock:
                self.samples.append(sample)
            self._stop.wait(self.interval)  # the polling period, not a wait for an outcome


def assert_always_passing(samples: list[Sample], sid: str, minimum: int = 20) -> None:
    """Every sample: the agent answered, the instance is in ?passing, every check passes."""
    assert len(samples) >= minimum, f"only {len(samples)} samples"
    errors = [s.error for s in samples if s.error]
    assert not errors, f"{len(errors)} failed polls, first: {errors[0]}"
    empty = [s for s in samples if sid not in (s.passing or ())]
    assert not empty, f"{len(empty)}/{len(samples)} polls without {sid} in ?passing, first at {empty[0]}"
    bad = [(s.t0, c["CheckID"], c["Status"], c.get("Output", "")[:200])
           for s in samples for c in s.checks or () if c["Status"] != "passing"]
    assert not bad, f"non-passing checks seen: {bad[:5]}"


def sigkill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# --------------------------------------------------------------------------- registration


def test_registered_passing_only_after_the_first_generation_is_ready(supervise, app_dir, consul_agent):
    write_app(app_dir, "1", extra="time.sleep(1)")  # a slow import: boot takes over a second
    with Sampler(consul_agent) as sampler:
        wait_until(lambda: len(sampler.taken()) >= 3, 10, "the sampler to start")
        sv = start(supervise, app_dir, consul_agent, "--consul-tag", "blue", "--consul-meta", "team=core")
        sid = service_id(sv)
        entry = wait_passing(consul_agent, sid, timeout=30)[0]
        registered_seen = time.time()
        wait_until(lambda: any(s.t0 > registered_seen for s in sampler.taken()), 5, "one more sample")
    samples = sampler.stop()
    ready = sv.wait_for("generation_ready", first=True)
    assert ready["boot_seconds"] >= 1, ready
    # Not worker_spawned: the pool's Notify for it is only logged when the master loop next
    # wakes (here: when the worker reports ready), so its timestamp is not the fork's.
    helper = sv.wait_for("consul_helper_started")

    # Absent for the whole boot: every poll answered before the ready event was written saw nothing.
    before = [s for s in samples if s.t1 < wall(ready)]
    assert not [s for s in before if s.error], [s.error for s in before if s.error][:3]
    assert not [s for s in before if s.passing or s.checks], "registered before the first generation was ready"
    during_boot = [s for s in before if s.t0 > wall(helper)]
    assert len(during_boot) >= 5, f"only {len(during_boot)} polls during the boot"
    # The helper registers only after the master logged the generation ready (one stdout pipe).
    assert index_of(sv, "generation_ready", first=True) < index_of(sv, "consul_registered")
    # Passing from its first appearance in the catalog (registered with Status passing).
    appeared = [s for s in samples if s.registered(sid)]
    assert appeared and all(s.status(f"service:{sid}") == "passing" for s in appeared), \
        [(s.t0, s.checks) for s in appeared[:3]]
    assert len(sv.find("consul_registered")) == 1 and not sv.find("consul_reregistered")
    # What is advertised: the default ID, the bound port, tags and meta.
    service = entry["Service"]
    assert (service["ID"], service["Service"], service["Port"]) == (sid, SERVICE, sv.port)
    assert service["Tags"] == ["blue"] and service["Meta"] == {"team": "core"}
    check = next(c for c in entry["Checks"] if c["CheckID"] == f"service:{sid}")
    assert check["Status"] == "passing" and check.get("Type", "ttl") == "ttl"
    assert http_get(sv.port)[1] == "version=1"


# --------------------------------------------------------------------------- reloads


def test_ten_hups_under_load_keep_the_instance_passing(supervise, app_dir, consul_agent):
    sv = start(supervise, app_dir, consul_agent).ready()
    sid = service_id(sv)
    wait_passing(consul_agent, sid)
    with Sampler(consul_agent) as sampler:
        reloads_began = time.time()
        ka, nk, order = hup_reloads_under_load(sv, app_dir)
        # A heartbeat after the last reload carries its note: the registration lived through all ten.
        wait_until(lambda: "generation 11 serving" in (agent_check(consul_agent, f"service:{sid}") or {})
                   .get("Output", ""), 10, "the note of generation 11 in the check output")
        # Sample for longer than the TTL from the first reload on: had the reloads stopped the
        # heartbeats, the check would have lapsed to critical in view of the sampler.
        wait_until(lambda: sampler.taken()[-1].t0 > reloads_began + TTL + 0.5, 10, "a TTL of samples")
    samples = sampler.stop()
    assert_always_passing(samples, sid, minimum=50)
    for load in (ka, nk):
        assert load.count() > 300, load.summary()
        assert not load.failures(), load.summary()
        assert_monotonic_versions(load, order)
    # Reloads never touch the registration.
    assert len(sv.find("consul_registered")) == 1
    for event in ("consul_reregistered", "consul_deregistered", "consul_service_lost", "consul_unreachable",
                  "consul_error", "consul_heartbeat_withheld"):
        assert not sv.find(event), (event, sv.find(event))
    assert len(sv.find("reload_finished", reason="SIGHUP", outcome="succeeded")) == 10


def test_reload_into_broken_code_keeps_the_check_passing_and_the_old_code_serving(supervise, app_dir,
                                                                                   consul_agent):
    sv = start(supervise, app_dir, consul_agent).ready()
    sid = service_id(sv)
    wait_passing(consul_agent, sid)
    with Sampler(consul_agent) as sampler, Load(sv.port, clients=4) as load:
        load.wait_requests(50)
        write_app(app_dir, "2", extra=BROKEN_IMPORT)
        failed = sv.reload()
        assert failed["outcome"] == "failed" and "RuntimeError: broken deploy" in failed["error"], failed
        # The failure is reported in the check's output, the check stays passing.
        check = wait_until(lambda: (c := agent_check(consul_agent, f"service:{sid}"))
                           and "reload to generation 2 failed" in c["Output"] and c, 10, "the failure note")
        assert check["Status"] == "passing" and "broken deploy" in check["Output"], check
        # Keep sampling past the next heartbeats, and longer than a TTL since the reload began.
        noted = time.time()
        wait_until(lambda: sampler.taken()[-1].t0 > max(noted + TTL / 2, wall(failed) - failed["duration"] + TTL
                                                         + 0.5), 10, "a TTL of samples")
        load.wait_requests(50)
        assert http_get(sv.port)[1] == "version=1"
    samples = sampler.stop()
    assert_always_passing(samples, sid, minimum=30)
    assert not load.failures(), load.summary()
    assert {r.body for r in load.results} == {"version=1"}
    # The next good reload replaces the note.
    write_app(app_dir, "3")
    assert sv.reload()["outcome"] == "succeeded"
    wait_until(lambda: "generation 3 serving" in agent_check(consul_agent, f"service:{sid}")["Output"], 10,
               "the note replaced by the good reload")
    assert consul_agent.passing(SERVICE)[0]["Service"]["ID"] == sid
    assert len(sv.find("consul_registered")) == 1 and not sv.find("consul_reregistered")


# --------------------------------------------------------------------------- shutdown


@pytest.mark.parametrize("on_stop", ["deregister", "maintenance"])
def test_sigterm_withdraws_the_instance_before_the_workers_drain(supervise, app_dir, consul_agent, on_stop):
    sv = start(supervise, app_dir, consul_agent, "--threads", "4", "--graceful-timeout", "5",
               "--consul-drain-delay", "1", "--consul-on-stop", on_stop).ready()
    sid = service_id(sv)
    wait_passing(consul_agent, sid)
    slow: dict[str, Any] = {}

    def slow_request() -> None:
        try:
            slow["status"], slow["body"] = http_get(sv.port, "/slow?s=2.5", timeout=20)
        except Exception as exc:  # noqa: BLE001
            slow["error"] = repr(exc)

    with Sampler(consul_agent) as sampler, Load(sv.port, clients=4, timeout=10) as load:
        load.wait_requests(50)
        slow_thread = threading.Thread(target=slow_request)
        slow_thread.start()
        slow_started(app_dir)
        term = time.time()
        sv.signal(signal.SIGTERM)
        # The first worker_draining written after SIGTERM (the reload-free run has no earlier one).
        draining = wait_until(lambda: events_after(sv, "worker_draining", term), 10, "a worker draining")[0]
        load.stop()
    samples = sampler.stop()
    slow_thread.join(15)
    assert sv.wait(20) == 0, sv.stderr
    begun = sv.wait_for("shutdown_begun")
    withdrawn = sv.wait_for("consul_maintenance" if on_stop == "maintenance" else "consul_deregistered",
                            service_id=sid)
    delay = sv.wait_for("drain_delay")
    drain_start = min(wall(draining), wall(begun))

    # Out of ?passing before any worker stopped accepting, seen by a poll that had its answer
    # before the first drain event was even written.
    after_term = [s for s in samples if s.t0 >= term and not s.error]
    gone = [s for s in after_term if sid not in (s.passing or ())]
    assert gone, f"never left ?passing ({len(after_term)} polls after SIGTERM)"
    assert gone[0].t1 < drain_start, (gone[0].t1 - term, drain_start - term)
    assert drain_start - gone[0].t1 > 0.5, "no real gap between leaving ?passing and draining"
    if on_stop == "maintenance":
        maint = f"_service_maintenance:{sid}"
        in_maint = [s for s in after_term if s.status(maint) == "critical"]
        assert in_maint, f"no critical {maint} check seen; last checks: {after_term[-1].checks}"
        assert in_maint[0].t1 < drain_start
        assert in_maint[0].registered(sid), "maintenance must keep the instance in the catalog"
        # After exit the instance is still there, in maintenance (the TTL reaps it later).
        final = consul_agent.checks(SERVICE)
        assert any(c["CheckID"] == maint and c["Status"] == "critical" for c in final), final
    else:
        # Deregistered: gone from the catalog entirely, not merely failing.
        assert not gone[0].registered(sid), gone[0].checks
        assert consul_agent.checks(SERVICE) == []

    # Order in the log: stop requested -> withdrawn -> drain delay -> pool shutdown -> workers drain.
    assert (index_of(sv, "shutdown_requested") < index_of(sv, withdrawn["event"])
            < index_of(sv, "drain_delay") < index_of(sv, "shutdown_begun")), [e["event"] for e in sv.events[-30:]]
    assert delay["seconds"] == 1
    assert wall(begun) - wall(withdrawn) >= 0.9, "the drain delay was not waited"

    # The instance kept serving through the drain delay, and nothing failed before the drain.
    served_while_withdrawn = [r for r in load.results if r.status == 200 and r.started > mono(withdrawn)]
    assert len(served_while_withdrawn) >= 10, load.summary()
    early = [r for r in load.failures() if r.started < mono(draining)]
    assert not early, early[:3]
    # The request in flight at SIGTERM completed.
    assert slow == {"status": 200, "body": "version=1"}, slow
    assert sv.find("shutdown_finished")


def test_kill_9_turns_the_ttl_check_critical_within_the_ttl(supervise, app_dir, consul_agent):
    sv = start(supervise, app_dir, consul_agent).ready()
    sid = service_id(sv)
    wait_passing(consul_agent, sid)
    check_id = f"service:{sid}"
    try:
        killed = time.time()
        os.kill(sv.pid, signal.SIGKILL)  # the master only: the helper must not keep the check alive
        critical = wait_until(lambda: next((c for c in consul_agent.checks(SERVICE)
                                            if c["CheckID"] == check_id and c["Status"] == "critical"), None),
                              TTL + 5, "the TTL check to turn critical")
        took = time.time() - killed
    finally:
        sigkill_group(sv.pid)
    assert took <= TTL + 1.5, f"critical after {took:.2f}s (TTL {TTL:g}s)"
    assert took >= TTL * 2 / 3 - 0.5, f"critical after only {took:.2f}s: it was not the TTL lapsing"
    assert critical["Output"].startswith("TTL expired"), critical
    assert consul_agent.passing(SERVICE) == []
    assert not sv.find("consul_deregistered")  # nothing withdrew it: the TTL did


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_kill_9_instance_is_reaped_after_deregister_critical_after(supervise, app_dir, consul_agent):
    sv = start(supervise, app_dir, consul_agent, "--consul-deregister-after", "1m").ready()
    sid = service_id(sv)
    wait_passing(consul_agent, sid)
    try:
        os.killpg(sv.pid, signal.SIGKILL)  # the whole container dies
        wait_until(lambda: any(c["Status"] == "critical" for c in consul_agent.checks(SERVICE)), TTL + 5,
                   "the check to turn critical", interval=0.2)
        critical_at = time.monotonic()
        wait_until(lambda: consul_agent.checks(SERVICE) == [] and sid not in consul_agent.services(), 150,
                   "the agent to reap the critical instance", interval=1.0)
    finally:
        sigkill_group(sv.pid)
    took = time.monotonic() - critical_at
    assert 55 <= took <= 125, f"reaped {took:.0f}s after turning critical (deregister after 1m)"
    assert consul_agent.instances(SERVICE) == []


# --------------------------------------------------------------------------- agent faults


def test_agent_restart_with_lost_state_reregisters(supervise, app_dir, consul_agent):
    sv = start(supervise, app_dir, consul_agent).ready()
    sid = service_id(sv)
    wait_passing(consul_agent, sid)
    consul_agent.restart()  # SIGKILL, start again on the same ports: -dev keeps nothing
    up = time.monotonic()
    entry = wait_passing(consul_agent, sid, timeout=10)[0]
    took = time.monotonic() - up
    assert took < TTL + 3, f"passing again {took:.1f}s after the agent came back"
    assert entry["Service"]["Port"] == sv.port
    lost = sv.wait_for("consul_service_lost", service_id=sid)
    rereg = sv.wait_for("consul_reregistered", service_id=sid)
    assert index_of(sv, "consul_service_lost") < index_of(sv, "consul_reregistered"), (lost, rereg)
    assert http_get(sv.port)[1] == "version=1"
    assert sv.proc.poll() is None
    assert sv.stop() == 0
    assert sid not in consul_agent.services()


def test_wedged_master_loop_lets_the_ttl_check_lapse_then_recovers(supervise, app_dir, consul_agent):
    sv = start(supervise, app_dir, consul_agent).ready()
    sid = service_id(sv)
    check_id = f"service:{sid}"
    wait_passing(consul_agent, sid)
    frozen = time.time()
    os.kill(sv.pid, signal.SIGSTOP)  # the master only: workers and the Consul helper keep running
    try:
        critical = wait_until(lambda: next((c for c in consul_agent.checks(SERVICE)
                                            if c["CheckID"] == check_id and c["Status"] == "critical"), None),
                              TTL + 5, "the TTL check to lapse while the master is stopped")
        took = time.time() - frozen
        assert http_get(sv.port) == (200, "version=1")  # the workers still serve
    finally:
        os.kill(sv.pid, signal.SIGCONT)
    thawed = time.monotonic()
    wait_passing(consul_agent, sid, timeout=TTL + 2)
    recovered = time.monotonic() - thawed
    assert took <= TTL + 1.5, f"critical {took:.2f}s after the master stopped (TTL {TTL:g}s)"
    assert critical["Output"].startswith("TTL expired"), critical
    assert recovered < TTL / 3 + 1.5, f"passing again only {recovered:.2f}s after the master resumed"
    sv.wait_for("consul_heartbeat_resumed")
    assert index_of(sv, "consul_heartbeat_withheld") < index_of(sv, "consul_heartbeat_resumed")
    assert len(sv.find("consul_heartbeat_withheld")) == 1
    assert len(sv.find("consul_registered")) == 1 and not sv.find("consul_reregistered")


def test_crashed_consul_helper_is_restarted_and_the_check_stays_passing(supervise, app_dir, consul_agent):
    sv = start(supervise, app_dir, consul_agent).ready()
    sid = service_id(sv)
    wait_passing(consul_agent, sid)
    first = sv.wait_for("consul_helper_started")
    with Sampler(consul_agent) as sampler:
        wait_until(lambda: len(sampler.taken()) >= 3, 10, "the sampler to start")
        killed = time.time()
        os.kill(first["pid"], signal.SIGKILL)
        exited = sv.wait_for("helper_exited", helper="consul")
        second = sv.wait_for("consul_helper_started", count=2)
        sv.wait_for("consul_registered", count=2, timeout=10)
        # Sample for more than a TTL after the kill: a gap in heartbeats would show as critical.
        wait_until(lambda: sampler.taken()[-1].t0 > killed + TTL + 0.5, 10, "a TTL of samples")
    samples = sampler.stop()
    assert second["pid"] != first["pid"] and exited["restart_in"] <= 1, (first, second, exited)
    assert_always_passing(samples, sid, minimum=30)
    assert http_get(sv.port) == (200, "version=1")
    # The restarted helper is the one that withdraws the instance at shutdown.
    assert sv.stop() == 0
    sv.wait_for("consul_deregistered", service_id=sid)
    assert sid not in consul_agent.services()


def test_sigterm_while_the_consul_helper_restarts_still_withdraws_first(supervise, app_dir, consul_agent):
    sv = start(supervise, app_dir, consul_agent, "--consul-drain-delay", "1").ready()
    sid = service_id(sv)
    wait_passing(consul_agent, sid)
    # Crash the helper twice: its restart is then 1 s away, a window SIGTERM lands in for sure.
    for n in (1, 2):
        helper = sv.wait_for("consul_helper_started", count=n)
        sv.wait_for("consul_registered", count=n)
        os.kill(helper["pid"], signal.SIGKILL)
        exited = sv.wait_for("helper_exited", helper="consul", count=n)
    assert exited["restart_in"] >= 1, exited
    with Sampler(consul_agent) as sampler:
        term = time.time()
        sv.signal(signal.SIGTERM)
        assert sv.wait(20) == 0, sv.stderr
        ended = time.time()
        wait_until(lambda: sampler.taken()[-1].t0 > ended, 5, "a sample after the exit")
    samples = sampler.stop()
    draining = events_after(sv, "worker_draining", term)[0]
    gone = [s for s in samples if s.t0 >= term and not s.error and sid not in (s.passing or ())]
    assert gone and gone[0].t1 < wall(draining), (
        "still in ?passing when the workers drained; after exit: "
        f"{[(e['Service']['ID'], [c['Status'] for c in e['Checks']]) for e in consul_agent.passing(SERVICE)]}")
    assert sv.find("consul_deregistered", service_id=sid)


def test_sigterm_with_a_frozen_agent_exits_within_the_consul_timeout(supervise, app_dir, consul_agent):
    sv = start(supervise, app_dir, consul_agent, "--consul-timeout", "1").ready()
    sid = service_id(sv)
    wait_passing(consul_agent, sid)
    agent_pid = consul_agent._proc.pid  # noqa: SLF001 - the agent process itself, to freeze it
    os.kill(agent_pid, signal.SIGSTOP)  # connections are accepted by the kernel, never answered
    try:
        termed = time.monotonic()
        sv.signal(signal.SIGTERM)
        code = sv.wait(15)
        took = time.monotonic() - termed
    finally:
        os.kill(agent_pid, signal.SIGCONT)
    assert code == 0, sv.stderr
    # timeout 1 s + drain delay 0.2 s + an idle drain, with some slack: never a hang on Consul.
    assert took < 3.5, f"shutdown took {took:.2f}s with the agent frozen"
    failed = sv.wait_for("consul_deregister_failed", service_id=sid)
    assert "1s" in failed["error"] or "did not answer" in failed["error"], failed
    assert sv.find("shutdown_finished")


def test_consul_down_at_start_serves_warns_once_then_registers(supervise, app_dir, consul_binary, tmp_path):
    agent = ConsulAgent(consul_binary, log_dir=str(tmp_path))  # ports reserved, not started yet
    try:
        sv = start(supervise, app_dir, agent, "--consul-kv-prefix", PREFIX).ready()
        sid = service_id(sv)
        assert http_get(sv.port) == (200, "version=1")
        unavailable = sv.wait_for("consul_kv_unavailable")
        assert agent.addr in unavailable["error"], unavailable
        sv.wait_for("consul_unreachable", activity="service")
        sv.wait_for("consul_unreachable", activity="kv")
        assert http_get(sv.port) == (200, "version=1")
        agent.start()
        came_up = time.monotonic()
        wait_passing(agent, sid, timeout=30)
        took = time.monotonic() - came_up
        assert took < 15, f"registered only {took:.1f}s after the agent came up (backoff too long?)"
        sv.wait_for("consul_reachable", activity="service")
        sv.wait_for("consul_reachable", activity="kv", timeout=30)
        # One warning per activity for the whole outage (retries never log), one registration.
        for activity in ("service", "kv"):
            assert len(sv.find("consul_unreachable", activity=activity)) == 1, sv.find("consul_unreachable")
            assert len(sv.find("consul_reachable", activity=activity)) == 1
        assert len(sv.find("consul_kv_unavailable")) == 1
        assert len(sv.find("consul_registered")) == 1 and not sv.find("consul_reregistered")
        assert not sv.find("reload_finished"), "an empty KV must not reload (same as the start environment)"
        # The KV the start could not read is applied once it is there.
        agent.kv_put(f"{PREFIX}/GREETING", "late")
        finished = sv.wait_for("reload_finished", reason="consul kv change", timeout=20)
        assert finished["outcome"] == "succeeded", finished
        assert http_get(sv.port, "/env?k=GREETING") == (200, "late")
        assert sv.stop() == 0
    finally:
        agent.stop()


def test_kv_required_with_the_agent_down_exits_5_with_one_line(supervise, app_dir, consul_binary, tmp_path):
    agent = ConsulAgent(consul_binary, log_dir=str(tmp_path))  # free ports, never started
    sv = start(supervise, app_dir, agent, "--consul-kv-prefix", PREFIX, "--consul-kv-required")
    assert sv.wait(15) == 5
    lines = sv.stderr.strip().splitlines()
    assert len(lines) == 1, sv.stderr
    assert lines[0].startswith(f"supervise: error: cannot read Consul KV '{PREFIX}'"), lines[0]
    assert agent.addr in lines[0], lines[0]
    assert "Traceback" not in sv.stderr + "\n".join(sv.raw)
    assert not sv.find("worker_spawned")


# --------------------------------------------------------------------------- KV


def test_kv_environment_at_start_and_a_change_under_load_reloads_once(supervise, app_dir, consul_agent):
    consul_agent.kv_put(f"{PREFIX}/GREETING", "hello")
    consul_agent.kv_put(f"{PREFIX}/OTHER", "a")
    consul_agent.kv_put("web/elsewhere/OUTSIDE", "x")
    sv = start(supervise, app_dir, consul_agent, "--consul-kv-prefix", PREFIX).ready()
    sid = service_id(sv)
    assert sv.wait_for("consul_kv_loaded")["keys"] == ["GREETING", "OTHER"]
    # The first generation already has the KV environment.
    assert http_get(sv.port, "/env?k=GREETING") == (200, "hello")
    assert http_get(sv.port, "/env?k=OTHER") == (200, "a")
    assert http_get(sv.port, "/env?k=OUTSIDE") == (200, "<unset>")
    wait_passing(consul_agent, sid)
    with Load(sv.port, clients=6, path="/env?k=GREETING") as load:
        load.wait_requests(100)
        consul_agent.kv_put(f"{PREFIX}/GREETING", "world")
        first = sv.wait_for("reload_finished", reason="consul kv change", timeout=20)
        assert first["outcome"] == "succeeded", first
        load.wait_requests(100)
        assert http_get(sv.port, "/env?k=GREETING") == (200, "world")
        # No-ops: the same value again, a key outside the prefix.  Then a real change, whose
        # reload fences the check that the first change caused exactly one.
        consul_agent.kv_put(f"{PREFIX}/GREETING", "world")
        consul_agent.kv_put("web/elsewhere/OUTSIDE", "y")
        consul_agent.kv_put(f"{PREFIX}/OTHER", "b")
        second = sv.wait_for("reload_finished", reason="consul kv change", count=2, timeout=20)
        assert second["outcome"] == "succeeded", second
        load.wait_requests(50)
    assert not load.failures(), load.summary()
    assert load.count() > 300, load.summary()
    assert_monotonic_versions(load, ["hello", "world"])
    assert load.results[-1].body == "world"
    assert http_get(sv.port, "/env?k=OTHER") == (200, "b")
    assert http_get(sv.port, "/env?k=OUTSIDE") == (200, "<unset>")
    changed = sv.find("config_changed")
    assert [c["keys"] for c in changed] == [["GREETING"], ["OTHER"]], changed
    assert len(sv.find("reload_finished")) == 2, sv.find("reload_finished")
    assert len(sv.find("consul_kv_changed")) == 2
    # KV reloads do not touch the registration either.
    assert len(sv.find("consul_registered")) == 1 and not sv.find("consul_reregistered")
    assert consul_agent.passing(SERVICE)[0]["Service"]["ID"] == sid


# --------------------------------------------------------------------------- http check


def test_http_check_passes_through_the_health_endpoint(supervise, app_dir, consul_agent):
    sv = start(supervise, app_dir, consul_agent, "--consul-check", "http", "--consul-check-interval", "1s",
               health=True).ready()
    sid = service_id(sv)
    url = f"http://127.0.0.1:{sv.health_port}/health"
    # The agent itself polled the health endpoint (a fresh registration has no output yet).
    check = wait_until(lambda: (c := agent_check(consul_agent, f"service:{sid}"))
                       and f"HTTP GET {url}: 200" in c["Output"] and c, 15, "the agent's first poll of /health")
    assert check["Status"] == "passing" and check["Type"] == "http", check
    entry = wait_passing(consul_agent, sid)[0]
    catalog = next(c for c in entry["Checks"] if c["CheckID"] == f"service:{sid}")
    assert catalog["Status"] == "passing" and catalog["Type"] == "http", catalog
    assert sv.health()[0] == 200
    assert sv.find("consul_helper_started", check="http")
    assert sv.stop() == 0
    assert sid not in consul_agent.services()
