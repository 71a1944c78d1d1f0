"""supervise as a container's PID 1, end to end in a real Docker engine.

Each test starts the image built by scripts/image.sh with a private copy of
images/example/app bind-mounted read-only on /app, published on 127.0.0.1.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from tests.docker.helpers import (
    RELOAD_OK,
    InFlight,
    Load,
    caught_signals,
    event_is,
    exec_orphans,
    fast_healthcheck,
    probe_processes,
    set_version,
    wait_until,
    write_file,
)

pytestmark = [pytest.mark.docker, pytest.mark.timeout(300)]

NO_WATCH = {"SUPERVISE_NO_WATCH": "1", "SUPERVISE_WORKERS": "2"}


def assert_no_failures(report, minimum_ok: int = 50) -> None:
    print(f"[load] {report.summary()}")
    assert report.failures == [], f"failed requests: {report.summary()}\n{report.failures[:20]}"
    assert report.ok >= minimum_ok, f"too little load to mean anything: {report.summary()}"


def assert_reloaded(event: dict) -> None:
    assert event.get("event") == "reload_finished", f"reload did not finish: {event}"
    assert str(event.get("outcome", "")).lower() in RELOAD_OK, f"reload outcome: {event}"


def test_supervise_is_pid_1(start):
    service = start(env=NO_WATCH)
    code, out = service.exec(["cat", "/proc/1/cmdline"])
    assert code == 0, out
    argv = [a for a in out.split("\0") if a]
    # The master titles itself (setproctitle): `supervise: master app:application`.
    assert argv and argv[0].startswith("supervise: master "), argv
    assert "app:application" in " ".join(argv), argv
    assert {"SIGHUP", "SIGTERM", "SIGINT", "SIGQUIT", "SIGCHLD"} <= caught_signals(service)
    assert service.get("/")[0] == 200


def test_hup_under_load_zero_failures_then_new_code(start):
    service = start(env=NO_WATCH)
    assert service.get("/version") == (200, "1\n")
    with Load(service.port) as load:
        load.wait_for_requests(100)
        for i in range(1, 6):
            set_version(service.app_dir, f"hup-{i}")
            slow = InFlight(service, 0.5)  # a request the old generation must finish while draining
            began = time.monotonic()
            event = service.signal_reload()
            assert_reloaded(event)
            assert slow.result() == (200, "slept 0.5\n")
            print(f"[reload {i}] {event.get('outcome')} in {time.monotonic() - began:.2f}s")
            # New connections after reload_finished only meet the new generation.
            assert service.get("/version") == (200, f"hup-{i}\n")
            load.wait_for_body(f"hup-{i}")
            load.wait_for_requests(50)
    report = load.stop()
    assert_no_failures(report)
    assert not service.logs.find(event_is("reload_failed"))
    assert service.state()["Running"]


def test_code_change_on_volume_reloads_via_watcher(start):
    service = start(env={"SUPERVISE_WORKERS": "2"})
    assert service.get("/version") == (200, "1\n")
    with Load(service.port) as load:
        load.wait_for_requests(100)
        slow = InFlight(service, 0.5)
        mark = service.logs.mark()
        set_version(service.app_dir, "watched-2")
        event = service.wait_reload(mark, timeout=60)
        assert_reloaded(event)
        assert slow.result() == (200, "slept 0.5\n")
        assert service.get("/version") == (200, "watched-2\n")
        load.wait_for_body("watched-2")
        load.wait_for_requests(50)
    report = load.stop()
    assert_no_failures(report)


def test_docker_stop_finishes_inflight_request_and_exits_0(start):
    service = start(env=NO_WATCH)
    result: dict = {}

    def slow() -> None:
        try:
            result["response"] = service.get("/slow?s=3", timeout=20)
        except Exception as exc:  # noqa: BLE001 - asserted below
            result["error"] = exc
        result["at"] = time.monotonic()

    client_thread = threading.Thread(target=slow)
    client_thread.start()
    service.logs.wait_for(event_is("example_slow_begin"), timeout=10)  # the request is in a worker

    stop_info: dict = {}

    def stop() -> None:
        began = time.monotonic()
        service.container.stop(timeout=10)  # docker stop: SIGTERM, SIGKILL after 10 s
        stop_info["elapsed"] = time.monotonic() - began
        stop_info["at"] = time.monotonic()

    stopper = threading.Thread(target=stop)
    stopped_at = time.monotonic()
    stopper.start()
    # While draining, the health endpoint says so (Docker/Consul stop routing to us).
    health = wait_until(lambda: (lambda r: r if r[0] == 503 else None)(service.health()), 2.5,
                        "GET /health to answer 503 during shutdown", interval=0.05)
    assert json.loads(health[1]), health
    stopper.join(15)
    client_thread.join(15)
    assert "error" not in result, f"in-flight request failed: {result['error']!r}"
    assert result["response"] == (200, "slept 3\n")
    assert stop_info, "docker stop did not return"
    print(f"[stop] docker stop took {stop_info['elapsed']:.2f}s with a 3 s request in flight")
    assert stop_info["elapsed"] < 8, "shutdown should end soon after the last request, well before 10 s"
    assert result["at"] - stopped_at < 4.5
    state = service.state()
    assert state["Status"] == "exited" and state["ExitCode"] == 0 and not state["OOMKilled"], state
    service.logs.wait_for(event_is("shutdown_finished"), timeout=5)


def _spawn_orphans(service, n: int = 5, linger: float = 0.3) -> list[int]:
    status, body = service.get(f"/spawn-orphans?n={n}&linger={linger}")
    assert status == 200, body
    pids = json.loads(body)["orphans"]
    assert len(pids) == n and all(pids), body
    return pids


def test_pid1_reaps_orphaned_grandchildren(start):
    service = start(env=NO_WATCH)
    # Orphans of the app (re-parented to supervise) and of `docker exec`'d processes
    # (re-parented to PID 1 by the kernel: the exec'd process is outside supervise's tree).
    app_orphans = _spawn_orphans(service) + _spawn_orphans(service)
    exec_orphan_pids = exec_orphans(service)
    probe = probe_processes(service, app_orphans + exec_orphan_pids, "gone", timeout=10)
    assert probe["done"], f"orphans not reaped: {probe}"
    assert probe["zombies"] == {}, f"zombies inside the container: {probe}"


def test_negative_control_non_reaping_pid1_leaves_zombies_and_drops_signals(start):
    # The same image behind a PID 1 that neither reaps nor forwards signals:
    # sh starts supervise in the background, then execs sleep (PID 1 = sleep).
    service = start(env=NO_WATCH, entrypoint=["/bin/sh", "-c",
                                              "/opt/venv/bin/supervise app:application & exec sleep infinity"])
    code, out = service.exec(["cat", "/proc/1/cmdline"])
    assert out.split("\0")[0] == "sleep", out
    # PID 1 catches neither HUP nor TERM: `docker kill -s HUP` can never reach supervise.
    assert not {"SIGHUP", "SIGTERM"} & caught_signals(service), caught_signals(service)
    pids = exec_orphans(service)
    probe = probe_processes(service, pids, "zombie", timeout=10)
    assert probe["done"], f"expected the orphans to stay zombies under a non-reaping PID 1: {probe}"
    assert set(map(str, pids)) <= set(probe["zombies"]), probe
    assert all(z["ppid"] == 1 for z in probe["zombies"].values()), probe
    # supervise, not PID 1 here, is still a child subreaper: its own app's orphans are reaped.
    app_probe = probe_processes(service, _spawn_orphans(service), "gone", timeout=10)
    assert app_probe["done"], f"supervise did not adopt and reap its app's orphans: {app_probe}"
    # SIGTERM to a PID 1 without a handler is dropped: docker stop has to SIGKILL (137).
    began = time.monotonic()
    service.container.stop(timeout=2)
    assert time.monotonic() - began >= 1.5
    assert service.state()["ExitCode"] == 137


def test_broken_code_plus_hup_keeps_old_code_and_healthy(start):
    service = start(env=NO_WATCH, healthcheck=fast_healthcheck(interval=0.5, retries=2))
    wait_until(lambda: service.health_status() == "healthy", 30, "docker health status healthy")
    with Load(service.port) as load:
        load.wait_for_requests(50)
        write_file(service.app_dir / "version.py", "VERSION = (  # a syntax error\n")
        event = service.signal_reload()
        assert event.get("event") == "reload_failed" or \
            str(event.get("outcome", "")).lower() not in RELOAD_OK, f"a broken reload succeeded? {event}"
        assert service.get("/version") == (200, "1\n")
        status, body = service.health()
        health = json.loads(body)
        assert status == 200 and health["status"] == "ok", body
        assert (health.get("last_reload") or {}).get("state") == "failed", body
        # Two health checks that started after the failed reload, both passing.
        seen = {entry["Start"] for entry in service.state()["Health"]["Log"]}

        def fresh_checks():
            log = service.state()["Health"]["Log"]
            new = [entry for entry in log if entry["Start"] not in seen]
            return new if len(new) >= 2 else None

        new_checks = wait_until(fresh_checks, 20, "two health checks after the failed reload")
        assert all(entry["ExitCode"] == 0 for entry in new_checks), new_checks
        assert service.health_status() == "healthy"
        load.wait_for_requests(50)
        assert load.bodies.get("1")
    report = load.stop()
    assert_no_failures(report)
    assert set(report.bodies) == {"1"}, report.bodies
    # Fixing the code and reloading again works.
    set_version(service.app_dir, "fixed")
    assert_reloaded(service.signal_reload())
    assert service.get("/version") == (200, "fixed\n")


@pytest.mark.parametrize(
    "env, command, expected",
    [
        ({}, ["no_such_module:application"], 3),  # the app cannot boot
        ({"SUPERVISE_WORKERS": "0"}, ["app:application"], 2),  # bad configuration
    ],
    ids=["app-cannot-boot-3", "bad-config-2"],
)
def test_exit_codes(start, env, command, expected):
    service = start(env={**NO_WATCH, **env}, command=command, wait=False)
    result = service.container.wait(timeout=60)
    assert result["StatusCode"] == expected, f"{result}\n{service.container.logs().decode()[-2000:]}"
