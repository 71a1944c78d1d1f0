"""Operations, end to end with real processes: Prometheus metrics across reloads and crashes,
hung-request tracebacks (--request-timeout, and the heartbeat's kill), the control CLI, live
scaling under load, and socket activation."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import (
    ROOT, SUPERVISE, Load, Supervise, free_port, http_get, raw_request, wait_until, write_app,
)

HANG_APP = '''
import threading, time

def hang_forever_in_app():
    time.sleep(60)

def application(environ, start_response):
    if environ["PATH_INFO"] == "/hang":
        hang_forever_in_app()
    body = b"ok"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [body]
'''


def scrape(sv: Supervise) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of GET /metrics, read by prometheus_client's own parser."""
    assert sv.health_port is not None
    status, text = http_get(sv.health_port, "/metrics")
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def counters(samples: dict) -> dict:
    return {k: v for k, v in samples.items()
            if k[0].endswith(("_total", "_count", "_bucket", "_sum")) and not k[0].startswith("process_")}


def control(*args: str, health_port: int | None = None, pid_file: Path | None = None,
            timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("SUPERVISE_HEALTH_BIND", None)
    extra = []
    if health_port is not None:
        extra += ["--health-bind", f"127.0.0.1:{health_port}"]
    if pid_file is not None:
        extra += ["--pid-file", str(pid_file)]
    return subprocess.run([*SUPERVISE, *args, *extra], env=env, capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------- metrics


def test_metrics_survive_reloads_and_crashes_and_never_go_down(tmp_path: Path) -> None:
    write_app(tmp_path)
    sv = Supervise(["app", "--chdir", str(tmp_path), "-w", "2", "--no-watch"], health=True)
    try:
        sv.ready()
        for _ in range(30):
            assert sv.get("/")[0] == 200
        wait_until(lambda: value(scrape(sv), "supervise_http_requests_total", code="200", method="GET") >= 30,
                   message="30 requests counted (heartbeats carry them)")
        first = scrape(sv)
        assert value(first, "supervise_generation") == 1
        assert value(first, "supervise_workers", state="serving") == 2
        assert value(first, "supervise_workers_target") == 2
        assert value(first, "supervise_http_request_duration_seconds_count") >= 30
        assert ("supervise_listen_queue", (("listener", f"127.0.0.1:{sv.port}"),)) in first
        assert value(first, "process_resident_memory_bytes") > 0 and ("process_cpu_seconds_total", ()) in first
        # What the workers serving now counted: a naive per-worker sum (the negative control) drops
        # once they retire; the master's totals must not.
        live_sum_before = sum(w["requests"] for w in sv.health()[1]["workers"])
        assert live_sum_before >= 30

        write_app(tmp_path, "2")
        assert sv.reload()["outcome"] == "succeeded"
        after_reload = scrape(sv)
        assert value(after_reload, "supervise_generation") == 2
        assert value(after_reload, "supervise_reloads_total", result="ok") == 1
        assert value(after_reload, "supervise_reload_duration_seconds_count", phase="boot") == 1
        assert value(after_reload, "supervise_reload_duration_seconds_count", phase="drain") == 1
        assert value(after_reload, "supervise_worker_exits_total", reason="retired") == 2
        assert sum(w["requests"] for w in sv.health()[1]["workers"]) < live_sum_before, "negative control"
        reloads = sv.health()[1]["reloads"]
        assert len(reloads) == 1 and reloads[0]["trigger"] == "SIGHUP" and reloads[0]["result"] == "ok"
        assert set(reloads[0]["phases"]) == {"boot", "drain"}

        assert raw_request(sv.port, b"GET /crash HTTP/1.1\r\nHost: x\r\n\r\n") == b""  # it kills its worker
        sv.wait_for("worker_exited", status="exit 7")
        sv.wait_for("worker_ready", count=5)  # 2 + 2 for the reload, + the crashed one's replacement
        after_crash = scrape(sv)
        assert value(after_crash, "supervise_worker_exits_total", reason="crashed") == 1
        for earlier in (first, after_reload):
            for key, before in counters(earlier).items():
                assert after_crash.get(key, 0.0) >= before, f"{key} went down: {before} -> {after_crash.get(key)}"
    finally:
        sv.stop()


def test_no_metrics_turns_the_endpoint_off(tmp_path: Path) -> None:
    write_app(tmp_path)
    sv = Supervise(["app", "--chdir", str(tmp_path), "-w", "1", "--no-watch", "--no-metrics"], health=True)
    try:
        sv.ready()
        assert sv.health_port is not None
        assert http_get(sv.health_port, "/metrics")[0] == 404
        assert http_get(sv.health_port, "/health")[0] == 200
    finally:
        sv.stop()


# --------------------------------------------------------------------------- hung requests


@pytest.mark.parametrize("threads", [1, 2])
def test_a_hung_request_gets_a_504_a_traceback_naming_the_app_function_and_a_replacement(
        tmp_path: Path, threads: int) -> None:
    (tmp_path / "hang.py").write_text(HANG_APP)
    sv = Supervise(["hang", "--chdir", str(tmp_path), "-w", "1", "--threads", str(threads), "--no-watch",
                    "--request-timeout", "1", "--graceful-timeout", "3"])
    try:
        sv.ready()
        first = sv.find("worker_ready")[0]["worker_pid"]
        started = time.monotonic()
        status, _ = http_get(sv.port, "/hang", timeout=20)
        assert status == 504 and time.monotonic() - started < 10
        event = sv.wait_for("request_timeout")
        assert event["method"] == "GET" and event["path"] == "/hang" and event["seconds"] >= 1.0
        assert "hang_forever_in_app" in event["stacks"] and "(the request that timed out)" in event["stacks"]
        sv.wait_for("worker_recycle", worker_pid=first)
        replacement = sv.wait_for("worker_ready", count=2)["worker_pid"]
        assert replacement != first
        assert sv.get("/")[0] == 200
        sv.wait_for("worker_killed", worker_pid=first)  # its request never returns: the drain's timeout ends it
    finally:
        sv.stop()


def test_negative_control_without_request_timeout_a_hung_request_just_hangs(tmp_path: Path) -> None:
    (tmp_path / "hang.py").write_text(HANG_APP)
    sv = Supervise(["hang", "--chdir", str(tmp_path), "-w", "1", "--threads", "2", "--no-watch"])
    try:
        sv.ready()
        with pytest.raises(TimeoutError):
            http_get(sv.port, "/hang", timeout=3)
        assert not sv.find("request_timeout") and not sv.find("worker_recycle")
    finally:
        sv.stop()


def test_the_heartbeat_timeout_logs_the_stuck_workers_stack_before_the_kill(tmp_path: Path) -> None:
    # With --threads 1 the app runs on the loop's thread: a request that hangs stops the heartbeat.
    (tmp_path / "hang.py").write_text(HANG_APP)
    sv = Supervise(["hang", "--chdir", str(tmp_path), "-w", "1", "--no-watch", "--worker-timeout", "2"])
    try:
        sv.ready()
        pid = sv.find("worker_ready")[0]["worker_pid"]
        conn = socket.create_connection(("127.0.0.1", sv.port))
        conn.sendall(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
        stack = sv.wait_for("worker_stack", timeout=20, worker_pid=pid)
        assert "hang_forever_in_app" in stack["stacks"] and "heartbeat" in stack["reason"]
        kill = sv.wait_for("worker_killed", worker_pid=pid)
        assert stack["_t"] <= kill["_t"] + 1.0
        conn.close()
        sv.wait_for("worker_ready", count=2)
        assert sv.get("/")[0] == 200
    finally:
        sv.stop()


# --------------------------------------------------------------------------- control CLI


def test_control_cli_reload_status_workers_and_stop(tmp_path: Path) -> None:
    write_app(tmp_path)
    pid_file = tmp_path / "supervise.pid"
    sv = Supervise(["app", "--chdir", str(tmp_path), "-w", "2", "--no-watch", "--pid-file", str(pid_file)],
                   health=True)
    try:
        sv.ready()
        assert pid_file.read_text().strip() == str(sv.pid)
        status = control("status", health_port=sv.health_port)
        assert status.returncode == 0 and "generation 1 serving" in status.stdout, status
        raw = json.loads(control("status", "--json", health_port=sv.health_port).stdout)
        assert raw["pid"] == sv.pid and raw["workers_target"] == 2

        write_app(tmp_path, "2")
        done = control("reload", health_port=sv.health_port)
        assert done.returncode == 0 and "generation 2 serves" in done.stdout, done
        assert sv.get("/") == (200, "version=2")  # the reload had finished when the command returned

        write_app(tmp_path, "3", extra="raise RuntimeError('broken deploy')")
        failed = control("reload", health_port=sv.health_port)
        assert failed.returncode == 1 and "broken deploy" in failed.stdout, failed
        assert sv.get("/") == (200, "version=2")

        write_app(tmp_path, "2")  # new workers load the code on disk: a good one again
        scaled = control("workers", "3", "--timeout", "30", health_port=sv.health_port)
        assert scaled.returncode == 0 and "3 workers serve" in scaled.stdout, scaled
        assert control("workers", "999", health_port=sv.health_port).returncode == 2

        stopped = control("stop", pid_file=pid_file)
        assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped
        assert sv.wait() == 0
        assert not pid_file.exists(), "the pid file is removed at exit"
    finally:
        sv.stop()


def test_control_cli_never_signals_a_process_that_is_not_supervise(tmp_path: Path) -> None:
    bystander = subprocess.Popen(["sleep", "60"])
    stale = tmp_path / "stale.pid"
    stale.write_text(f"{bystander.pid}\n")
    try:
        result = control("reload", "--no-wait", pid_file=stale)
        assert result.returncode == 6 and "is not supervise" in result.stderr, result
        assert bystander.poll() is None, "the bystander was not signalled"
        # Negative control: what the command refused is what would have happened.
        os.kill(bystander.pid, signal.SIGHUP)
        assert bystander.wait(5) == -signal.SIGHUP
    finally:
        bystander.kill()
        bystander.wait()


def test_control_cli_without_a_master_is_one_line_and_exit_6() -> None:
    result = control("status", health_port=free_port())
    assert result.returncode == 6 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


# --------------------------------------------------------------------------- live scaling


SLOWISH = '''
import time
def application(environ, start_response):
    time.sleep(0.02)
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]
'''


def _scale_under_load(tmp_path: Path, inject: tuple[str, ...] = ()) -> tuple[list[Load], Supervise]:
    """2 -> 4 -> 2 workers by signals while clients send requests: new connections (spread
    over every worker, the added ones too) and keep-alive ones (which stay on the first two)."""
    (tmp_path / "slowish.py").write_text(SLOWISH)
    sv = Supervise(["slowish", "--chdir", str(tmp_path), "-w", "2", "--no-watch"], health=True, inject=inject)
    sv.ready()
    fresh, kept = Load(sv.port, clients=8, keepalive=False), Load(sv.port, clients=4, keepalive=True)
    with fresh, kept:
        fresh.wait_requests(100)
        for target in (3, 4):
            sv.signal(signal.SIGTTIN)
            sv.wait_for("workers_scaled", to=target)
        wait_until(lambda: sum(1 for w in sv.health()[1]["workers"] if w["state"] == "serving") == 4,
                   message="4 workers serving")
        wait_until(lambda: all(w["requests"] > 0 for w in sv.health()[1]["workers"]),
                   message="the added workers serve requests")
        for target in (3, 2):
            sv.signal(signal.SIGTTOU)
            sv.wait_for("workers_scaled", to=target)
            fresh.wait_requests(100)
        sv.wait_for("worker_exited", count=2)
        fresh.wait_requests(100)
        kept.wait_requests(20)
    return [fresh, kept], sv


def test_live_scaling_up_and_down_under_load_fails_no_request_and_survives_a_reload(tmp_path: Path) -> None:
    loads, sv = _scale_under_load(tmp_path)
    try:
        for load in loads:
            assert not load.failures(), load.summary()
        assert sv.health()[1]["workers_target"] == 2
        sv.signal(signal.SIGTTIN)
        sv.wait_for("workers_scaled", to=3)
        assert sv.reload()["outcome"] == "succeeded"
        health = sv.health()[1]
        assert health["workers_target"] == 3
        assert sum(1 for w in health["workers"] if w["state"] == "serving" and w["generation"] == 2) == 3
        assert value(scrape(sv), "supervise_workers_target") == 3
    finally:
        sv.stop()


def test_negative_control_scaling_down_by_killing_fails_requests(tmp_path: Path) -> None:
    loads, sv = _scale_under_load(tmp_path, inject=("scale-down-kills",))
    try:
        assert loads[0].failures(), "killing instead of draining must show as failed requests"
    finally:
        sv.stop()


# --------------------------------------------------------------------------- socket activation


def _listener() -> tuple[socket.socket, int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock, sock.getsockname()[1]


def _as_systemd(fd: int, pid_expr: str = "$$") -> list[str]:
    """Start supervise the way systemd does: the socket at fd 3, LISTEN_FDS=1, LISTEN_PID=its pid."""
    return ["bash", "-c", f'export LISTEN_FDS=1 LISTEN_PID={pid_expr}; exec "$@" 3<&{fd} {fd}<&-', "bash"]


def test_socket_activation_serves_on_the_socket_passed_in_the_listen_fds_way(tmp_path: Path) -> None:
    write_app(tmp_path)
    sock, port = _listener()
    sv = Supervise(["app", "--chdir", str(tmp_path), "-w", "2", "--no-watch"], port=port,
                   prefix=_as_systemd(sock.fileno()), pass_fds=(sock.fileno(),))
    sock.close()  # only supervise holds it now
    try:
        sv.ready()
        assert sv.find("socket_activation")[0]["fds"] == [3]
        assert sv.find("bound")[0]["address"] == f"127.0.0.1:{port}"
        assert http_get(port, "/") == (200, "version=1")
        assert http_get(port, "/env?k=LISTEN_FDS") == (200, "<unset>"), "the app does not see systemd's variables"
        write_app(tmp_path, "2")
        assert sv.reload()["outcome"] == "succeeded"
        assert http_get(port, "/") == (200, "version=2")
    finally:
        sv.stop()


def test_negative_control_listen_fds_for_another_pid_are_not_taken(tmp_path: Path) -> None:
    write_app(tmp_path)
    sock, port = _listener()
    own = free_port()
    sv = Supervise(["app", "--chdir", str(tmp_path), "-w", "1", "--no-watch", "--bind", f"127.0.0.1:{own}"],
                   prefix=_as_systemd(sock.fileno(), pid_expr="1"), pass_fds=(sock.fileno(),))
    try:
        sv.ready()
        assert not sv.find("socket_activation")
        assert http_get(own, "/")[0] == 200
        with pytest.raises(TimeoutError):  # nobody accepts on the passed socket
            http_get(port, "/", timeout=2)
    finally:
        sock.close()
        sv.stop()


def test_bind_fd_serves_an_inherited_socket_and_refuses_what_is_not_one(tmp_path: Path) -> None:
    write_app(tmp_path)
    sock, port = _listener()
    fd = sock.fileno()
    sv = Supervise(["app", "--chdir", str(tmp_path), "-w", "1", "--no-watch", "--bind", f"fd://{fd}"],
                   port=port, pass_fds=(fd,))
    try:
        sv.ready()
        assert http_get(port, "/") == (200, "version=1")
    finally:
        sock.close()
        sv.stop()
    read_end, write_end = os.pipe()
    try:
        for target, why in ((f"fd://{read_end}", "not a socket"), ("fd://250", "not an open descriptor")):
            run = subprocess.run([*SUPERVISE, "app", "--chdir", str(tmp_path), "--bind", target, "--no-watch"],
                                 env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                                 timeout=30, pass_fds=(read_end,))
            assert run.returncode == 4 and why in run.stderr and "Traceback" not in run.stderr, run.stderr
    finally:
        os.close(read_end)
        os.close(write_end)


# --------------------------------------------------------------------------- stop delay (no Consul)


def test_stop_delay_keeps_serving_with_health_503_then_drains(supervise, app_dir):
    """Without Consul, --stop-delay is the time a Kubernetes Service or a health-polling load
    balancer gets to stop sending traffic: /health says 503 at once, requests still succeed, and
    only then do the workers drain.  (The control, no delay draining at once, is the fake-clock
    test test_without_consul_and_no_stop_delay_the_drain_starts_at_once.)"""
    sv = supervise("app", "--workers", "2", "--chdir", str(app_dir), "--no-watch", "--stop-delay", "3s",
                   health=True).ready()
    with Load(sv.port, clients=4, timeout=2.0) as load:
        load.wait_requests(50)
        sv.signal(signal.SIGTERM)
        sv.wait_for("drain_delay", seconds=3.0)
        wait_until(lambda: http_get(sv.health_port, "/health")[0] == 503, message="health 503")
        assert not sv.find("worker_draining"), "nothing drains during the stop delay"
        load.wait_requests(50)  # still served while health says 503
        load.stop()  # before the delay ends: nothing is left to send traffic after it
        assert not sv.find("worker_draining")
    assert not load.failures(), load.summary()
    sv.wait_for("worker_draining", timeout=10)
    assert sv.proc.wait(20) == 0
