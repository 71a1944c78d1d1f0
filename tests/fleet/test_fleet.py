"""The whole architecture, end to end, in the real Docker engine (docs/fleet.md).

A fleet (scripts/fleet.sh up): per datacenter a Consul server, one Consul client agent
per simulated VM, one supervise instance per VM registered with its own VM's agent, and
HAProxy finding the instances through Consul DNS SRV records.  Load goes through HAProxy
on a loopback port; HAProxy has no retries (`retries 0`, no redispatch, no retry-on), so
every failed request reaches the client and is counted.

The tests run in this order and share the fleet; each one leaves it whole again.  Waits
are handshakes (a log event, an HTTP answer, a DNS answer, HAProxy's runtime API) with
deadlines, never fixed sleeps.  Figures (timings, the SIGKILL failures) are printed in the
"fleet figures" section of the session summary.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.fleet.conftest import FIGURES, Fleet, fleet_tool, fleetlib
from tests.harness import wait_until

pytestmark = pytest.mark.timeout(600)

TTL = float(fleet_tool.CONSUL_TTL.rstrip("s"))


# --------------------------------------------------------------------------- helpers


def make_release(fleet: Fleet, tmp_path: Path, version: str, broken: bool = False) -> Path:
    """A copy of the fleet's app checkout with VERSION set (and, if broken, an import error)."""
    src = tmp_path / f"app-{version}{'-broken' if broken else ''}"
    shutil.copytree(Path(fleet.inv.work) / "app", src)
    (src / "version.py").write_text(f'"""Set by tests/fleet."""\n\nVERSION = {version!r}\n')
    if broken:
        with open(src / "fleetapp.py", "a") as f:
            f.write('\nraise RuntimeError("broken release: this module cannot be imported")\n')
    return src


def docker(*args: str, timeout: float = 60) -> str:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"docker {' '.join(args)}: {proc.stderr}"
    return proc.stdout.strip()


def generations(fleet: Fleet, dc: str = "prod") -> dict[str, int]:
    return {inst.name: fleet.health(inst)["generation"] for inst in fleet.dc(dc).instances}


def old_answers_after_reload(load: Any, old: str, finished: dict[str, float]) -> list[Any]:
    """Answers with the old version from requests that *started* after their instance's
    reload had finished (its old generation had exited): there must be none."""
    return [r for r in load.snapshot() if not r.failed and r.version == old and r.started > finished[r.instance]]


def went_back(load: Any, order: list[str]) -> int:
    """How often a client thread got an older version from an instance after a newer one.
    Through HAProxy this can happen during an instance's drain: HAProxy pools its server
    connections, and a request it sends on a pooled connection to an old worker just as
    that worker closes it idle is still answered (by the old code) rather than reset."""
    rank = {v: i for i, v in enumerate(order)}
    seen: dict[tuple[str, str], int] = {}
    count = 0
    for rec in sorted(load.snapshot(), key=lambda r: r.started):
        if not rec.failed and rec.version in rank:
            key = (rec.thread, rec.instance)
            if rank[rec.version] < seen.get(key, -1):
                count += 1
            seen[key] = max(seen.get(key, -1), rank[rec.version])
    return count


def event_times(fleet: Fleet, container: str, name: str, after: float) -> list[float]:
    return [e["_ts"] for e in fleet.events(container) if e.get("event") == name and e.get("_ts", 0) >= after]


# --------------------------------------------------------------------------- the fleet


def test_every_instance_registers_with_its_own_vm_agent_and_serves_through_haproxy(fleet):
    prod = fleet.dc("prod")
    ips = {i.ip for i in prod.instances}
    entries = fleetlib.service_health(prod.consul_http, fleet.inv.service, passing=True)
    assert {e["Node"]["Node"]: e["Service"]["ID"] for e in entries} == {i.vm: i.service_id for i in prod.instances}
    assert {e["Service"]["Address"] for e in entries} == ips  # --consul-address: the container's IP
    assert fleet.dns() == ips
    wait_until(lambda: fleet.lb_ips() == ips, 20, "HAProxy to route to every instance")
    with fleet.load() as load:
        for inst in prod.instances:
            load.wait_answer(lambda r, name=inst.name: r.instance == name, 20, f"an answer from {inst.name}")
    assert not load.failures(), load.summary()
    FIGURES["fleet"] = {"prod_instances": len(prod.instances), "dcs": sorted(fleet.inv.dcs)}


# --------------------------------------------------------------------------- deploys


def test_rolling_deploy_under_load_updates_every_instance_with_no_failed_request(fleet, tmp_path):
    prod = fleet.dc("prod")
    fleet.initial_release = fleetlib.Releases(prod.instances[0].code_dir).current()
    src = make_release(fleet, tmp_path, "2")
    with fleet.load() as load:
        load.wait_requests(60)
        t0 = time.time()
        code, summary, err = fleet.deploy("push", str(src))
        load.wait_requests(60)
    assert code == 0 and summary["ok"], err
    assert [r["instance"] for r in summary["instances"]] == [i.name for i in prod.instances]
    assert all(r["result"] == "ok" for r in summary["instances"]), summary
    assert not load.failures(), load.summary()
    for inst in prod.instances:
        me = fleet.whoami(inst.ip)
        assert (me["version"], me["release"]) == ("2", summary["release"]), me
        assert fleetlib.Releases(inst.code_dir).current() == summary["release"]
    # One instance at a time: each reload began after the previous instance's had finished.
    spans = []
    for inst in prod.instances:
        started = event_times(fleet, inst.container, "reload_started", t0)
        finished = event_times(fleet, inst.container, "reload_finished", t0)
        assert len(started) == 1 and len(finished) == 1, (inst.name, started, finished)
        spans.append((started[0], finished[0]))
    for (_, end), (begin, _) in zip(spans, spans[1:]):
        assert begin > end, spans
    finished = {inst.name: span[1] for inst, span in zip(prod.instances, spans)}
    assert not old_answers_after_reload(load, "1", finished)
    FIGURES["rolling_deploy"] = {"seconds": summary["seconds"], "requests": load.count(), "failed": 0,
                                 "per_instance_seconds": [r["passing_seconds"] for r in summary["instances"]],
                                 "old_after_new_during_drain": went_back(load, ["1", "2"])}


def test_broken_release_stops_at_the_first_instance_which_keeps_serving_the_old_code(fleet, tmp_path):
    prod = fleet.dc("prod")
    first, rest = prod.instances[0], prod.instances[1:]
    releases = {i.name: fleetlib.Releases(i.code_dir).current() for i in prod.instances}
    gens = generations(fleet)
    src = make_release(fleet, tmp_path, "3", broken=True)
    with fleet.load() as load:
        load.wait_requests(60)
        code, summary, err = fleet.deploy("push", str(src))
        load.wait_requests(60)
    assert code == 2 and not summary["ok"], (code, summary, err)
    assert summary["failed_at"] == first.name and "broken release" in summary["error"], summary
    assert {r["instance"]: r["result"] for r in summary["instances"]} == {
        first.name: "failed", **{i.name: "untouched" for i in rest}}
    assert "STOPPED at " + first.name in err
    # The first instance: the reload failed, the old generation serves the old code, `current`
    # points at the old release again, and Consul still lists it as passing (with a note).
    h = fleet.health(first)
    assert h["generation"] == gens[first.name] and h["last_reload"]["state"] == "failed", h
    assert fleet.whoami(first.ip)["version"] == "2"
    assert fleetlib.Releases(first.code_dir).current() == releases[first.name]
    assert first.service_id in fleet.passing()

    def note() -> str:  # the check's output, set by the next heartbeat (within TTL/3)
        checks = fleetlib.consul_get(prod.consul_http, f"/v1/health/checks/{fleet.inv.service}")
        output = next(c["Output"] for c in checks if c["ServiceID"] == first.service_id)
        return output if "failed" in output else ""

    note = wait_until(note, TTL, "the failed reload noted on the Consul check")
    # The others were not touched.
    for inst in rest:
        assert fleetlib.Releases(inst.code_dir).current() == releases[inst.name]
        assert fleet.health(inst)["generation"] == gens[inst.name]
    assert not load.failures(), load.summary()
    assert {r.version for r in load.snapshot()} == {"2"}
    FIGURES["broken_deploy"] = {"failed_at": summary["failed_at"], "requests": load.count(), "failed": 0,
                                "consul_note": note[:80]}


def test_rollback_under_load_returns_every_instance_to_the_previous_release(fleet):
    prod = fleet.dc("prod")
    with fleet.load() as load:
        load.wait_requests(60)
        t0 = time.time()
        code, summary, err = fleet.deploy("rollback")
        load.wait_requests(60)
    assert code == 0 and summary["ok"], err
    # It undid the last push that changed something (v2), not the failed one.
    assert summary["release"] == fleet.initial_release, (summary, fleet.initial_release)
    for inst in prod.instances:
        assert fleet.whoami(inst.ip)["version"] == "1"
        assert fleetlib.Releases(inst.code_dir).current() == fleet.initial_release
    assert not load.failures(), load.summary()
    finished = {i.name: event_times(fleet, i.container, "reload_finished", t0)[0] for i in prod.instances}
    assert not old_answers_after_reload(load, "2", finished)
    FIGURES["rollback"] = {"seconds": summary["seconds"], "requests": load.count(), "failed": 0,
                           "old_after_new_during_drain": went_back(load, ["2", "1"])}


def test_kv_change_reloads_every_instance_with_the_new_environment_under_load(fleet):
    prod = fleet.dc("prod")
    gens = generations(fleet)
    with fleet.load() as load:
        load.wait_requests(60)
        code, summary, err = fleet.deploy("config", "GREETING=hello after a KV change")
        load.wait_answer(lambda r: r.greeting == "hello after a KV change", 30, "the new greeting")
        load.wait_requests(60)
    assert code == 0 and summary["ok"], err
    for inst in prod.instances:
        assert fleet.whoami(inst.ip)["greeting"] == "hello after a KV change"
        assert fleet.health(inst)["generation"] == gens[inst.name] + 1  # exactly one reload each
    assert not load.failures(), load.summary()
    assert fleetlib.kv_get(prod.consul_http, fleet.inv.kv_prefix + "GREETING") == "hello after a KV change"
    # The same value again changes nothing.
    code, again, _ = fleet.deploy("config", "GREETING=hello after a KV change")
    assert code == 0 and again["changed"] == {}
    FIGURES["kv_change"] = {"seconds": summary["seconds"], "requests": load.count(), "failed": 0}


# --------------------------------------------------------------------------- docker stop


def test_docker_stop_leaves_consul_dns_and_haproxy_before_it_stops_serving(fleet):
    inst = fleet.instance(2)
    with fleet.watcher() as watch, fleet.load() as load:
        load.wait_answer(lambda r: r.instance == inst.name, 20, f"an answer from {inst.name}")
        t_stop = time.time()
        docker("stop", inst.container)
        t_exit = time.time()
        load.wait_requests(60)
    assert docker("inspect", "-f", "{{.State.ExitCode}}", inst.container) == "0"
    dns_gone, lb_gone = watch.dns_gone(inst.ip, t_stop), watch.lb_gone(inst.ip, t_stop)
    deregistered = event_times(fleet, inst.container, "consul_deregistered", t_stop)
    drain = event_times(fleet, inst.container, "shutdown_begun", t_stop)
    assert deregistered and drain and dns_gone and lb_gone, (deregistered, drain, dns_gone, lb_gone)
    # Out of DNS and out of HAProxy (as observed from outside, polling every 50 ms) before
    # supervise began to drain: nothing was sent to an instance that stopped accepting.
    assert deregistered[0] < dns_gone < drain[0], (deregistered[0] - t_stop, dns_gone - t_stop, drain[0] - t_stop)
    assert lb_gone < drain[0], (lb_gone - t_stop, drain[0] - t_stop)
    last_answer = max(r.finished for r in load.snapshot() if r.instance == inst.name)
    assert not load.failures(), load.summary()
    FIGURES["docker_stop"] = {
        "failed": 0, "requests": load.count(), "deregistered_after": round(deregistered[0] - t_stop, 3),
        "out_of_dns_after": round(dns_gone - t_stop, 3), "out_of_haproxy_after": round(lb_gone - t_stop, 3),
        "drain_began_after": round(drain[0] - t_stop, 3), "last_answer_after": round(last_answer - t_stop, 3),
        "container_exited_after": round(t_exit - t_stop, 3)}
    docker("start", inst.container)
    fleet.wait_serving(inst)


def _register_by_hand(fleet: Fleet, service_id: str, ip: str) -> None:
    """An agent-side registration with an HTTP check on /health, the way registrator or a
    static service definition does it: supervise itself does not withdraw anything."""
    agent = f"http://{fleet.instance(1).agent_ip}:8500"
    body = {"ID": service_id, "Name": fleet.inv.service, "Address": ip, "Port": 8000,
            "Check": {"HTTP": f"http://{ip}:8001/health", "Interval": "1s", "Timeout": "1s",
                      "DeregisterCriticalServiceAfter": "1m"}}
    status, answer = fleetlib.http_json(f"{agent}/v1/agent/service/register", method="PUT",
                                        body=json.dumps(body).encode())
    assert status == 200, answer


def _deregister_by_hand(fleet: Fleet, service_id: str) -> None:
    agent = f"http://{fleet.instance(1).agent_ip}:8500"
    fleetlib.http_json(f"{agent}/v1/agent/service/deregister/{service_id}", method="PUT")


def _stop_under_load(fleet: Fleet, name: str, instance: str) -> tuple[list[Any], int]:
    with fleet.load() as load:
        load.wait_answer(lambda r: r.instance == instance, 30, f"an answer from {instance}")
        load.wait_requests(30)
        docker("stop", name)
        load.wait_requests(60)
    return load.failures(), load.count()


def test_negative_control_docker_stop_without_consul_withdrawal_fails_requests(fleet):
    """The same `docker stop`, but the instance is withdrawn by an agent-side health check
    (supervise runs without Consul): it stops accepting before DNS and HAProxy notice."""
    ip = fleet_tool.address(fleet.inv.subnet, "prod", "extra", 0)
    env = {k: v for k, v in fleet_tool.instance_env(fleet.inv, "prod", 1).items() if not k.startswith("SUPERVISE_CONSUL")}
    env["FLEET_INSTANCE"] = "web-prod-static"
    name = fleet.start_extra("static", ip, env)
    try:
        wait_until(lambda: fleetlib.health(f"http://{ip}:8001/health")[0] == 200, 60, "the extra instance to boot")
        _register_by_hand(fleet, "web-prod-static", ip)
        wait_until(lambda: ip in fleet.lb_ips(), 30, "HAProxy to route to the extra instance")
        failures, total = _stop_under_load(fleet, name, "web-prod-static")
    finally:
        _deregister_by_hand(fleet, "web-prod-static")
        fleet.remove_extra(name)
    assert failures, "stopping an instance that Consul still lists should fail requests"
    FIGURES["negative_stop_without_withdrawal"] = {"failed": len(failures), "requests": total,
                                                   "kinds": sorted({(r.error or "")[:40] for r in failures})}
    wait_until(lambda: ip not in fleet.lb_ips(), 30, "HAProxy to drop the extra instance")


def test_negative_control_drain_delay_shorter_than_haproxy_dns_refresh_fails_requests(fleet):
    """supervise withdraws first but drains at once (--consul-drain-delay 0), while HAProxy
    re-resolves only every second: requests still arrive after the drain began.  The window
    is random (0 to 1 s), so up to three stops are tried; one with failures is enough."""
    ip = fleet_tool.address(fleet.inv.subnet, "prod", "extra", 1)
    env = fleet_tool.instance_env(fleet.inv, "prod", 1, SUPERVISE_CONSUL_SERVICE_ID="web-prod-nodrain",
                                  SUPERVISE_CONSUL_ADDRESS=ip, SUPERVISE_CONSUL_DRAIN_DELAY="0s",
                                  SUPERVISE_CONSUL_META="vm=vm1", FLEET_INSTANCE="web-prod-nodrain")
    name = fleet.start_extra("nodrain", ip, env)
    tries = []
    try:
        for _ in range(3):
            wait_until(lambda: ip in fleet.lb_ips(), 60, "HAProxy to route to the extra instance")
            failures, total = _stop_under_load(fleet, name, "web-prod-nodrain")
            tries.append(len(failures))
            if failures:
                break
            docker("start", name)
    finally:
        fleet.remove_extra(name)
    assert tries[-1] > 0, f"no failed request in {len(tries)} stops with a drain delay of 0: {tries}"
    FIGURES["negative_drain_delay_0"] = {"failed_per_stop": tries}


# --------------------------------------------------------------------------- crashes


def test_sigkill_fails_requests_until_consul_dns_drops_the_instance(fleet):
    """Measured, not hidden: `docker kill` (SIGKILL) leaves no chance to withdraw.  HAProxy
    sends the instance its share of requests until the TTL check lapses (--consul-ttl), DNS
    drops it and HAProxy's next resolution removes it; each of those fails (HAProxy has no
    retries).  The figures go to docs/fleet.md; what is asserted is the order of things: the
    failures exist, the check went critical by TTL expiry, and no request that started after
    HAProxy was seen without the instance failed."""
    prod = fleet.dc("prod")
    inst = fleet.instance(3)
    with fleet.watcher() as watch, fleet.load() as load:
        load.wait_answer(lambda r: r.instance == inst.name, 20, f"an answer from {inst.name}")
        load.wait_requests(40)
        t_kill = time.time()
        docker("kill", inst.container)
        dns_gone = watch.wait_dns_gone(inst.ip, t_kill, TTL + 10)
        lb_gone = watch.wait_lb_gone(inst.ip, t_kill, TTL + 12)
        # Every request sent to the dead instance has finished (failed) once every client
        # thread (each one request at a time) has started one more after HAProxy dropped it.
        threads = {r.thread for r in load.snapshot()}
        wait_until(lambda: {r.thread for r in load.snapshot() if r.started > lb_gone} >= threads, 30,
                   "the requests in flight when HAProxy dropped the instance to finish")
        load.wait_requests(60)
    failures = load.failures()
    critical = next(e for e in fleetlib.service_health(prod.consul_http, fleet.inv.service)
                    if e["Service"]["ID"] == inst.service_id)
    ttl_check = next(c for c in critical["Checks"] if c["ServiceID"] == inst.service_id)
    assert ttl_check["Status"] == "critical" and "TTL expired" in ttl_check["Output"], ttl_check
    assert failures, "a SIGKILLed instance still listed in Consul must cost requests: " + load.summary()
    assert all(r.started <= lb_gone for r in failures), [(r.started - t_kill, r.error) for r in failures]
    recs = load.snapshot()
    FIGURES["sigkill"] = {
        "ttl": fleet_tool.CONSUL_TTL, "deregister_after": fleet_tool.DEREGISTER_AFTER,
        "out_of_dns_after": round(dns_gone - t_kill, 2), "out_of_haproxy_after": round(lb_gone - t_kill, 2),
        "failed": len(failures), "requests": len(recs),
        "requests_during_window": sum(1 for r in recs if t_kill <= r.started <= lb_gone),
        "last_failure_after": round(max((r.finished for r in failures), default=t_kill) - t_kill, 2),
        "kinds": sorted({(r.error or "")[:40] for r in failures}),
        "clients": 6, "rate_per_client": 40}
    # docker start: the same service ID registers again, replacing the critical entry.
    docker("start", inst.container)
    fleet.wait_serving(inst)
    assert len([e for e in fleetlib.service_health(prod.consul_http, fleet.inv.service)
                if e["Service"]["ID"] == inst.service_id]) == 1


def test_restart_of_a_vm_agent_reregisters_its_instance_and_no_request_fails(fleet):
    inst = fleet.instance(1)
    with fleet.watcher() as watch, fleet.load() as load:
        load.wait_requests(40)
        t0 = time.time()
        docker("restart", inst.agent)  # SIGTERM: the agent leaves; its tmpfs state is lost
        t_up = time.time()
        gone = watch.wait_dns_gone(inst.ip, t0, 30)
        fleet.wait_serving(inst, 60)
        back = wait_until(lambda: next((t for t, ips in list(watch.dns_log) if t > gone and inst.ip in ips), None),
                          10, "the instance back in DNS")
        load.wait_requests(60)
    assert not load.failures(), load.summary()
    registered = [e for e in fleet.events(inst.container)
                  if e.get("event") in ("consul_registered", "consul_reregistered") and e.get("_ts", 0) >= t0]
    assert registered, "no registration after the agent restart"
    FIGURES["agent_restart"] = {"failed": 0, "requests": load.count(), "agent_restart_seconds": round(t_up - t0, 2),
                                "out_of_dns_after": round(gone - t0, 2), "back_in_dns_after": round(back - t0, 2),
                                "registered_again_after": round(registered[0]["_ts"] - t0, 2)}


# --------------------------------------------------------------------------- datacenters


def test_dev_and_prod_datacenters_are_separate_in_dns_and_kv(fleet):
    if "dev" not in fleet.inv.dcs:
        pytest.skip("the fleet runs without a dev datacenter")
    prod, dev = fleet.dc("prod"), fleet.dc("dev")
    prod_ips, dev_ips = {i.ip for i in prod.instances}, {i.ip for i in dev.instances}
    # The servers are WAN-joined: prod's DNS answers for dev when asked for dev ...
    assert set(fleetlib.consul_get(prod.consul_http, "/v1/catalog/datacenters")) == {"prod", "dev"}
    assert fleet.dns(f"{fleet.inv.service}.service.dev.consul") == dev_ips
    # ... but a dev instance is not in prod's own answer, and the reverse.
    assert fleet.dns() == prod_ips and not prod_ips & dev_ips
    assert fleet.dns(dc="dev") == dev_ips
    with fleet.load("dev") as load:
        load.wait_requests(30)
    assert set(load.instances_seen()) == {i.name for i in dev.instances}, load.summary()
    # --consul-dc: each instance reads the KV of its own datacenter ...
    assert fleet.whoami(dev.instances[0].ip)["greeting"] == "hello from dev"
    # ... and an instance on a dev VM with --consul-dc prod reads prod's KV over the WAN.
    ip = fleet_tool.address(fleet.inv.subnet, "dev", "extra", 0)
    env = fleet_tool.instance_env(fleet.inv, "dev", 1, SUPERVISE_CONSUL_DC="prod",
                                  SUPERVISE_CONSUL_SERVICE="web-probe", SUPERVISE_CONSUL_SERVICE_ID="web-probe",
                                  SUPERVISE_CONSUL_ADDRESS=ip, SUPERVISE_CONSUL_META="vm=vm1",
                                  FLEET_INSTANCE="web-probe")
    name = fleet.start_extra("probe", ip, env, dc="dev")
    try:
        wait_until(lambda: fleetlib.health(f"http://{ip}:8001/health")[0] == 200, 60, "the probe to boot")
        prod_greeting = fleetlib.kv_get(prod.consul_http, fleet.inv.kv_prefix + "GREETING")
        assert fleet.whoami(ip)["greeting"] == prod_greeting != "hello from dev"
    finally:
        fleet.remove_extra(name)
    # A KV change in dev reloads dev's instances only.
    prod_gens = generations(fleet)
    code, summary, err = fleet.deploy("config", "GREETING=hello from dev, again", dc="dev")
    assert code == 0 and summary["ok"], err
    assert fleet.whoami(dev.instances[0].ip)["greeting"] == "hello from dev, again"
    assert generations(fleet) == prod_gens
    assert fleetlib.kv_get(prod.consul_http, fleet.inv.kv_prefix + "GREETING") != "hello from dev, again"


# --------------------------------------------------------------------------- scale out


def test_scale_out_adds_a_vm_that_takes_traffic_without_failures(fleet):
    before = {i.ip for i in fleet.dc("prod").instances}
    with fleet.load() as load:
        load.wait_requests(40)
        proc = fleet.fleet("add-vm")
        assert proc.returncode == 0, proc.stderr
        fleet.reload_inventory()
        new = next(i for i in fleet.dc("prod").instances if i.ip not in before)
        load.wait_answer(lambda r: r.instance == new.name, 30, f"an answer from {new.name}")
        load.wait_requests(60)
    assert not load.failures(), load.summary()
    assert fleetlib.Releases(new.code_dir).current() == fleetlib.Releases(fleet.instance(1).code_dir).current()
    assert fleet.whoami(new.ip)["version"] == "1"
    assert fleet.lb_ips() == before | {new.ip}


# --------------------------------------------------------------------------- the safety net


def test_a_killed_instance_leaves_the_catalog_after_deregister_critical_service_after(fleet):
    """After a SIGKILL the instance leaves DNS when its TTL check goes critical but stays in
    the catalog, critical, until the agent's reaper removes it: --consul-deregister-after (1m,
    Consul's minimum) after the check went critical, the reaper running every 30 s.  Asserted:
    that order (critical, out of DNS, still in the catalog, then reaped); the times are
    figures.  Last, because it takes that long."""
    prod = fleet.dc("prod")
    inst = prod.instances[-1]

    def in_catalog() -> list[dict[str, Any]]:
        return [e for e in fleetlib.service_health(prod.consul_http, fleet.inv.service)
                if e["Service"]["ID"] == inst.service_id]

    def critical() -> bool:
        return any(c["Status"] == "critical" for e in in_catalog() for c in e["Checks"]
                   if c["ServiceID"] == inst.service_id)

    with fleet.load() as load:
        load.wait_answer(lambda r: r.instance == inst.name, 20, f"an answer from {inst.name}")
        t_kill = time.time()
        docker("kill", inst.container)
        wait_until(critical, TTL + 5, "the TTL check to go critical", interval=0.05)
        t_critical = time.time()
        wait_until(lambda: inst.ip not in fleet.dns(), 10, "Consul DNS to drop the critical instance")
        t_dns = time.time()
        assert critical(), "out of DNS, the killed instance stays in the catalog, critical, for a while"
        wait_until(lambda: not in_catalog(), 60 + 30 + 30, "the agent to reap the critical instance", interval=0.5)
        t_gone = time.time()
    FIGURES["sigkill_reaper"] = {"critical_after": round(t_critical - t_kill, 2),
                                 "out_of_dns_after": round(t_dns - t_kill, 2),
                                 "removed_from_catalog_after": round(t_gone - t_kill, 1),
                                 "removed_after_critical": round(t_gone - t_critical, 1)}
    docker("start", inst.container)
    fleet.wait_serving(inst)
