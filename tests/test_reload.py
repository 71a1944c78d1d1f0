"""Graceful reload by generations, under real load, with real signals."""

from __future__ import annotations

import signal
import socket
import threading
import time
from pathlib import Path

import psutil

from tests.harness import (Load, assert_monotonic_versions, http_get, hup_reloads_under_load, slow_in_background,
                           slow_started, wait_until, write_app)

BROKEN_IMPORT = 'raise RuntimeError("broken deploy")'


def test_ten_hups_under_load_zero_failures_and_versions_only_move_forward(supervise, app_dir):
    sv = supervise("app", "--workers", "2", "--chdir", str(app_dir), "--no-watch").ready()
    ka, nk, order = hup_reloads_under_load(sv, app_dir)
    for load in (ka, nk):
        assert load.count() > 500
        assert not load.failures(), load.summary()
        assert_monotonic_versions(load, order)
        assert all(r.body == "version=11" for r in load.results[-20:])
    assert sv.stop() == 0


def test_slow_request_in_flight_during_hup_completes_with_old_code(supervise, app_dir):
    sv = supervise("app", "--workers", "2", "--chdir", str(app_dir), "--no-watch").ready()
    slow, result = slow_in_background(sv.port, 3)
    slow_started(app_dir)
    write_app(app_dir, "2")
    sv.signal(signal.SIGHUP)
    sv.wait_for("generation_ready", count=2)
    log = "\n".join(sv.raw[-40:])
    assert http_get(sv.port)[1] == "version=2", log
    slow.join(10)
    assert result == {"status": 200, "body": "version=1"}, (result, log)
    finished = sv.wait_for("reload_finished")
    assert finished["outcome"] == "succeeded" and finished["drained_requests"] >= 1, (finished, log)


def _broken_reload_then_fix(sv, app_dir, load: Load) -> None:
    load.wait_requests(50)
    write_app(app_dir, "2", extra=BROKEN_IMPORT)
    failed = sv.reload()
    assert failed["outcome"] == "failed" and "RuntimeError: broken deploy" in failed["error"]
    assert sv.find("reload_failed")
    load.wait_requests(50, timeout=10)
    assert http_get(sv.port, timeout=5)[1] == "version=1"
    write_app(app_dir, "3")
    assert sv.reload()["outcome"] == "succeeded"
    load.wait_requests(50)


def test_reload_into_code_that_raises_at_import_keeps_old_code_serving(supervise, app_dir):
    sv = supervise("app", "--workers", "2", "--chdir", str(app_dir), "--no-watch").ready()
    with Load(sv.port, clients=6) as load:
        _broken_reload_then_fix(sv, app_dir, load)
    assert not load.failures(), load.summary()
    assert_monotonic_versions(load, ["version=1", "version=3"])
    assert load.results[-1].body == "version=3"
    assert sv.proc.poll() is None


def test_negative_control_retiring_old_generation_early_is_detected(supervise, app_dir):
    """Same scenario with the old generation retired at reload start (gunicorn's order):
    the test must see failures, proving it would catch that behaviour."""
    sv = supervise("app", "--workers", "2", "--chdir", str(app_dir), "--no-watch",
                   inject=["retire-early"]).ready()
    with Load(sv.port, clients=4, timeout=2.0) as load:
        load.wait_requests(50)
        write_app(app_dir, "2", extra=BROKEN_IMPORT)
        sv.reload()
        wait_until(lambda: load.failures(), timeout=10, message="failures with early retirement")
    assert load.failures()


def test_reload_whose_workers_hang_at_import_fails_at_boot_timeout(supervise, app_dir):
    sv = supervise("app", "--workers", "2", "--chdir", str(app_dir), "--no-watch",
                   "--boot-timeout", "2").ready()
    with Load(sv.port, clients=4) as load:
        load.wait_requests(50)
        write_app(app_dir, "2", extra="time.sleep(60)")
        failed = sv.reload(timeout=10)
        assert failed["outcome"] == "failed" and "boot timeout" in failed["error"]
        load.wait_requests(50)
        assert http_get(sv.port)[1] == "version=1"
    assert not load.failures(), load.summary()


def test_hup_storm_at_most_two_generations_alive_and_one_remains(supervise, app_dir):
    sv = supervise("app", "--workers", "2", "--chdir", str(app_dir), "--no-watch", health=True).ready()
    seen: list[set[int]] = []
    stop = threading.Event()

    def sample() -> None:
        deadline = time.monotonic() + 60  # bounded even if the test fails before setting `stop`
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                status, body = sv.health()
            except OSError:
                continue  # a health request may fail while the loop is busy: sample again
            seen.append({w["generation"] for w in body["workers"]})

    sampler = threading.Thread(target=sample, daemon=True)
    with Load(sv.port, clients=4) as load:
        sampler.start()
        load.wait_requests(30)
        for _ in range(20):
            sv.signal(signal.SIGHUP)
            time.sleep(0.05)  # the storm itself: 20 HUPs spread over one second
        wait_until(lambda: _settled(sv), timeout=30, message="storm to settle")
        stop.set()
        sampler.join(5)
        load.wait_requests(30)
    assert seen and max(len(s) for s in seen) <= 2, max(seen, key=len)
    final = sv.health()[1]
    assert len({w["generation"] for w in final["workers"]}) == 1
    assert not load.failures(), load.summary()


def _settled(sv) -> bool:
    body = sv.health()[1]
    return (len({w["generation"] for w in body["workers"]}) == 1
            and all(g["state"] == "serving" for g in body["generations"])
            and body["generation"] == max(w["generation"] for w in body["workers"])
            and len(sv.find("reload_requested")) == 20
            and len(sv.find("reload_finished")) >= 1
            and sv.find("reload_finished")[-1]["generation"] == body["generation"])


def test_sigterm_in_the_middle_of_a_reload_exits_zero_and_finishes_requests(supervise, app_dir):
    sv = supervise("app", "--workers", "2", "--chdir", str(app_dir), "--no-watch").ready()
    slow, result = slow_in_background(sv.port, 2)
    slow_started(app_dir)
    write_app(app_dir, "2", extra="time.sleep(5)")  # the new generation is still booting...
    sv.signal(signal.SIGHUP)
    sv.wait_for("reload_started")
    sv.signal(signal.SIGTERM)  # ...when the stop comes
    assert sv.wait(15) == 0
    slow.join(10)
    assert result == {"status": 200, "body": "version=1"}
    killed = sv.find("worker_killed", generation=2)
    assert killed and all(k["reason"] == "shutdown before ready" for k in killed)


def test_rolling_reload_zero_failures_never_more_than_workers_plus_one(supervise, app_dir):
    sv = supervise("app", "--workers", "3", "--chdir", str(app_dir), "--no-watch",
                   "--reload-strategy", "rolling").ready()
    master = psutil.Process(sv.pid)
    most = 0
    with Load(sv.port, clients=6) as load:
        load.wait_requests(50)
        for n in (2, 3):
            write_app(app_dir, str(n))
            before = len(sv.find("reload_finished"))
            sv.signal(signal.SIGHUP)
            deadline = time.monotonic() + 20
            while len(sv.find("reload_finished")) <= before:  # sample while the reload runs
                most = max(most, _alive_children(master))
                assert sv.proc.poll() is None
                assert time.monotonic() < deadline, "the rolling reload did not finish in 20 s"
            assert sv.find("reload_finished")[-1]["outcome"] == "succeeded"
        load.wait_requests(50)
    assert most <= 4, most
    assert not load.failures(), load.summary()
    assert http_get(sv.port)[1] == "version=3"


def test_max_requests_recycles_without_failures(supervise, app_dir):
    sv = supervise("app", "--workers", "2", "--chdir", str(app_dir), "--no-watch",
                   "--max-requests", "100", "--max-requests-jitter", "20").ready()
    with Load(sv.port, clients=4) as load:
        wait_until(lambda: len(sv.find("worker_recycle")) >= 3, timeout=30, message="3 recycles")
        load.wait_requests(100)
    assert not load.failures(), load.summary()
    assert "max-requests" in sv.find("worker_recycle")[0]["reason"]


def test_max_rss_recycles_without_failures(supervise, app_dir):
    sv = supervise("app", "--workers", "1", "--chdir", str(app_dir), "--no-watch", "--max-rss", "1M").ready()
    with Load(sv.port, clients=3) as load:
        sv.wait_for("worker_recycle", timeout=15)
        sv.wait_for("worker_exited", timeout=15)
        load.wait_requests(50)
    assert not load.failures(), load.summary()
    assert "max-rss" in sv.find("worker_recycle")[0]["reason"]


def test_worker_that_stops_heartbeating_is_killed_and_replaced(supervise, app_dir):
    sv = supervise("app", "--workers", "1", "--chdir", str(app_dir), "--no-watch",
                   "--worker-timeout", "1.5").ready()
    stuck = threading.Thread(target=lambda: _ignore_errors(lambda: http_get(sv.port, "/slow?s=10", timeout=15)))
    stuck.start()
    killed = sv.wait_for("worker_killed", timeout=10)
    assert "no heartbeat" in killed["reason"]
    sv.wait_for("worker_ready", count=2, timeout=10)
    assert http_get(sv.port)[0] == 200
    stuck.join(15)


def _alive_children(proc: psutil.Process) -> int:
    alive = 0
    for child in proc.children():
        try:
            alive += child.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            pass
    return alive


def _ignore_errors(fn) -> None:
    try:
        fn()
    except Exception:
        pass


def test_same_size_edit_within_the_same_second_is_not_served_from_stale_bytecode(supervise, app_dir):
    """CPython's .pyc check uses whole-second mtimes: without the worker's precise cache key,
    a one-character fix deployed in the same second as the last import would serve old code."""
    sv = supervise("app", "--workers", "1", "--chdir", str(app_dir), "--no-watch").ready()
    for n in range(2, 6):  # each edit keeps the file size and lands within the same second
        write_app(app_dir, str(n))
        assert sv.reload()["outcome"] == "succeeded"
        assert http_get(sv.port)[1] == f"version={n}"


def _late_connection(supervise, app_dir, gate, inject):
    """A generation-1 worker takes a connection, and the master's SIGTERM arrives before its
    accept() returns (tests/inject.py: handoff-gate).  Returns the client's response and the log."""
    sv = supervise("app", "-w", "1", "--chdir", str(app_dir), "--no-watch", inject=inject,
                   env={"SUPERVISE_TEST_GATE": str(gate)}).ready()
    assert sv.get()[1] == "version=1"  # before the gate opens, served as usual
    gate.write_text("")
    with socket.create_connection(("127.0.0.1", sv.port), timeout=20) as client:
        client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        wait_until(lambda: Path(f"{gate}.held").exists(), message="a generation-1 worker holding the connection")
        write_app(app_dir, "2")
        assert sv.reload()["outcome"] == "succeeded"
        response = b""
        while chunk := client.recv(65536):
            response += chunk
    return sv, response


def test_a_connection_accepted_after_the_drain_is_handed_to_the_new_generation(supervise, app_dir, tmp_path):
    sv, response = _late_connection(supervise, app_dir, tmp_path / "gate", ["handoff-gate"])
    assert response.startswith(b"HTTP/1.1 200") and response.endswith(b"version=2"), response
    held_by = int((tmp_path / "gate.held").read_text())
    assert sv.find("connection_handed_off", pid=held_by, sent=True)
    new_worker = sv.find("worker_ready", generation=2)[0]["worker_pid"]
    assert sv.find("connection_forwarded", from_pid=held_by, to_pid=new_worker, sent=True)


def test_negative_control_a_draining_worker_serving_its_late_connection_is_detected(supervise, app_dir, tmp_path):
    sv, response = _late_connection(supervise, app_dir, tmp_path / "gate", ["handoff-gate", "serve-late"])
    assert response.endswith(b"version=1"), "without the hand-off the client gets the old code"
    assert not sv.find("connection_forwarded")
