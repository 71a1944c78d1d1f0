"""One client, one signal or one bad setting must never take the service down.

Each case was a full or partial outage.  Each test replays it against a real supervise and
checks the service stays up; each negative control replays it with the old behaviour put
back from outside (tests/inject.py, or the product's own opt-out setting) and checks the
test sees the outage.  `make soak` replays them all together, under load (tests/soak.py).
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.harness import (Load, Supervise, http_get, slow_in_background, slow_started, wait_until,
                           write_app)

pytestmark = pytest.mark.timeout(120)


def served_promptly(port: int, n: int = 20, timeout: float = 2.0) -> list[str]:
    """n sequential GET / on fresh connections; the failures (an outage shows as timeouts)."""
    failures = []
    for _ in range(n):
        try:
            status, _ = http_get(port, "/", timeout=timeout)
            if status != 200:
                failures.append(f"status {status}")
        except OSError as exc:
            failures.append(f"{type(exc).__name__}: {exc}")
    return failures


def connect(port: int, timeout: float = 30.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def read_to_eof(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# --------------------------------------------------------------------------- 1. idle health client


def _idle_health_clients_then_checks(sv: Supervise) -> None:
    idle = connect(sv.health_port)
    half = connect(sv.health_port)
    half.sendall(b"GET /hea")
    for s in (idle, half):  # the server closes them at its idle timeout
        assert read_to_eof(s) == b""
        s.close()
    for _ in range(3):  # new connections reuse the closed descriptors
        assert sv.health()[0] == 200
    sv.signal(signal.SIGHUP)
    sv.wait_for("reload_finished")
    assert sv.health()[0] == 200


def test_1_idle_health_connections_never_crash_the_master(supervise, app_dir):
    sv = supervise("app", "-w", "1", "--chdir", str(app_dir), "--no-watch", health=True).ready()
    _idle_health_clients_then_checks(sv)
    assert sv.proc.poll() is None and not sv.find("internal_error")


def test_1_negative_control_a_leaked_registration_kills_the_master(supervise, app_dir):
    sv = supervise("app", "-w", "1", "--chdir", str(app_dir), "--no-watch", health=True,
                   inject=["health-leak"]).ready()
    with pytest.raises((AssertionError, OSError)):
        _idle_health_clients_then_checks(sv)
    assert sv.wait(10) == 1 and "already registered" in sv.find("internal_error")[0]["error"]


# --------------------------------------------------------------------------- 2. slow request bodies


def _slow_bodies(port: int, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = connect(port)
        s.sendall(b"POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
        socks.append(s)
    return socks


def test_2_slow_request_bodies_cost_only_themselves(supervise, app_dir):
    sv = supervise("app", "-w", "2", "--chdir", str(app_dir), "--no-watch", "--body-timeout", "3").ready()
    slow = _slow_bodies(sv.port, 8)
    assert served_promptly(sv.port) == []
    # the slow clients get a 408 at the body timeout, and a log line naming them
    for s in slow:
        assert read_to_eof(s).startswith(b"HTTP/1.1 408 ")
        s.close()
    sv.wait_for("client_timeout", phase="body", count=8)
    timeouts = sv.find("client_timeout", phase="body")
    assert len(timeouts) == 8 and all(t["client"].startswith("127.0.0.1:") for t in timeouts)
    # a body that does arrive whole reaches the app
    with connect(sv.port) as s:
        s.sendall(b"POST /body HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhe")
        s.sendall(b"llo")
        assert read_to_eof(s).endswith(b"\r\n\r\n5")


def test_2_negative_control_streaming_bodies_let_slow_clients_hold_the_workers(supervise, app_dir):
    sv = supervise("app", "-w", "2", "--chdir", str(app_dir), "--no-watch", "--request-buffering", "0",
                   "--body-timeout", "10").ready()
    slow = _slow_bodies(sv.port, 8)
    assert served_promptly(sv.port, n=5), "with streaming bodies the workers wait on the slow clients"
    for s in slow:
        s.close()


# --------------------------------------------------------------------------- 3. slow readers


def _readers_that_do_not_read(port: int) -> list[socket.socket]:
    big = connect(port)
    big.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    big.sendall(b"GET /big?mb=20 HTTP/1.1\r\nHost: x\r\n\r\n")
    pipelined = []
    for _ in range(2):
        s = connect(port)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(b"GET /big?mb=1 HTTP/1.1\r\nHost: x\r\n\r\n" * 20)
        pipelined.append(s)
    return [big, *pipelined]


def test_3_slow_readers_cost_only_themselves(supervise, app_dir):
    sv = supervise("app", "-w", "2", "--chdir", str(app_dir), "--no-watch", "--write-timeout", "3").ready()
    readers = _readers_that_do_not_read(sv.port)
    assert served_promptly(sv.port) == []
    # they are dropped once their response made no progress for the write timeout
    sv.wait_for("client_timeout", phase="write", count=3, timeout=20)
    for s, expected in zip(readers, (20 << 20, 20 << 20, 20 << 20)):
        received = 0
        try:
            while chunk := s.recv(1 << 20):
                received += len(chunk)
        except OSError:
            pass  # reset: what the server still held for it is gone
        assert received < expected, "the response was cut, not completed"
        s.close()


def test_3_negative_control_blocking_writes_let_slow_readers_hold_the_workers(supervise, app_dir):
    sv = supervise("app", "-w", "2", "--chdir", str(app_dir), "--no-watch", "--write-timeout", "10",
                   inject=["blocking-writes"]).ready()
    readers = _readers_that_do_not_read(sv.port)
    assert served_promptly(sv.port, n=5), "with blocking writes slow readers stop the workers"
    for s in readers:
        s.close()


# --------------------------------------------------------------------------- 4. absurd worker counts


def test_4_an_absurd_worker_count_is_refused_in_one_line(supervise, app_dir):
    sv = supervise("app", "--workers", "100000", "--chdir", str(app_dir), "--no-watch")
    assert sv.wait(10) == 2
    assert sv.stderr.count("\n") == 1 and "--workers 100000 is more than this machine can run" in sv.stderr
    assert not sv.find("worker_spawned")


BOOT_BOUND = max(8, 4 * len(os.sched_getaffinity(0)))  # supervisor.master.loop.plan_from


def _fork_storm(supervise: Any, app_dir: Path, inject: list[str]) -> int:
    """60 workers whose import hangs: SIGTERM after the first fork.  Returns how many workers
    were forked in all (the stop comes in the first turn after the signal)."""
    write_app(app_dir, extra="time.sleep(30)")
    sv = supervise("app", "--workers", "60", "--max-workers", "60", "--chdir", str(app_dir), "--no-watch",
                   inject=inject)
    sv.wait_for("worker_spawned")
    sv.signal(signal.SIGTERM)
    assert sv.wait(20) == 0
    return len(sv.find("worker_spawned"))


def test_4_a_fork_storm_never_delays_a_stop(supervise, app_dir):
    assert _fork_storm(supervise, app_dir, []) <= BOOT_BOUND


def test_4_negative_control_unbounded_boots_fork_the_whole_pool_before_the_stop(supervise, app_dir):
    assert _fork_storm(supervise, app_dir, ["unbounded-boots"]) == 60


# --------------------------------------------------------------------------- 5. health tells the truth


def _crash_storm(sv: Supervise, crashes: int = 20) -> tuple[Load, list[tuple[int, dict]]]:
    samples: list[tuple[int, dict]] = []
    with Load(sv.port, clients=2, keepalive=False, path="/crash", timeout=5) as crash, \
            Load(sv.port, clients=2, keepalive=False, timeout=5) as good:
        crash.wait_requests(crashes, timeout=60)
        while len(samples) < 10:
            samples.append(sv.health())
        good.wait_requests(10, timeout=60)
    return good, samples


def _longest_gap(load: Load) -> float:
    ok = sorted(r.finished for r in load.results if r.status == 200)
    return max((b - a for a, b in zip(ok, ok[1:])), default=float("inf"))


def test_5_a_crashing_endpoint_is_no_outage_and_health_never_lies(supervise, app_dir):
    sv = supervise("app", "-w", "2", "--chdir", str(app_dir), "--no-watch", health=True).ready()
    good, samples = _crash_storm(sv)
    assert not sv.find("worker_backoff"), "workers that served come back at once"
    assert _longest_gap(good) < 1.0, _longest_gap(good)
    for status, body in samples:  # 200 only while some worker can take a request
        assert (status == 200) == (body["available_workers"] > 0 and body["status"] == "ok"), body
        if not any(w["state"] == "serving" for w in body["workers"]):
            assert status == 503, body


def test_5_negative_control_an_escalating_backoff_is_an_outage(supervise, app_dir):
    sv = supervise("app", "-w", "2", "--chdir", str(app_dir), "--no-watch", health=True,
                   inject=["escalating-backoff"]).ready()
    good, _ = _crash_storm(sv, crashes=10)
    assert sv.find("worker_backoff") and _longest_gap(good) > 1.0


def test_5_health_is_503_while_the_only_worker_is_stuck_in_a_request(supervise, app_dir):
    sv = supervise("app", "-w", "1", "--chdir", str(app_dir), "--no-watch", health=True).ready()
    slow, result = slow_in_background(sv.port, 6)
    slow_started(app_dir)
    status, body = wait_until(lambda: (h := sv.health())[0] == 503 and h, timeout=10, message="health 503")
    assert body["status"] == "unavailable" and body["available_workers"] == 0
    slow.join(15)
    assert result["status"] == 200
    wait_until(lambda: sv.health()[0] == 200, timeout=5, message="health back to 200")


def test_5_negative_control_a_free_thread_keeps_health_200(supervise, app_dir):
    sv = supervise("app", "-w", "1", "--threads", "2", "--chdir", str(app_dir), "--no-watch", health=True).ready()
    slow, _ = slow_in_background(sv.port, 5)
    slow_started(app_dir)
    deadline = time.monotonic() + 4  # health sampled through the time the one-thread case turns 503
    while time.monotonic() < deadline:
        status, body = sv.health()
        assert status == 200 and body["available_workers"] == 1, body
    slow.join(10)


# --------------------------------------------------------------------------- 6. out of descriptors


def _exhaust_descriptors(sv: Supervise, n: int = 400) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = connect(sv.port)
        socks.append(s)
    return socks


def test_6_out_of_descriptors_the_worker_pauses_and_recovers(supervise, app_dir):
    sv = supervise("app", "-w", "1", "--chdir", str(app_dir), "--no-watch", "--keepalive-timeout", "60",
                   prefix=["prlimit", "--nofile=256:256", "--"]).ready()
    worker = psutil.Process(sv.find("worker_ready")[0]["worker_pid"])
    socks = _exhaust_descriptors(sv)
    first = sv.wait_for("accept_failed", timeout=20)
    cpu_before = sum(worker.cpu_times()[:2])
    second = sv.wait_for("accept_failed", count=2, timeout=20)
    cpu = sum(worker.cpu_times()[:2]) - cpu_before
    assert cpu < 0.5 * (second["_t"] - first["_t"]), f"the worker spun: {cpu:.2f}s of CPU"
    assert len(sv.find("accept_failed")) <= 3 and second["count"] >= 1
    for s in socks:
        s.close()
    assert wait_until(lambda: http_get(sv.port, "/", timeout=2)[0] == 200, timeout=20, message="serving again")


def test_6_negative_control_retrying_accept_at_once_spins(supervise, app_dir):
    sv = supervise("app", "-w", "1", "--chdir", str(app_dir), "--no-watch", "--keepalive-timeout", "60",
                   prefix=["prlimit", "--nofile=256:256", "--"], inject=["accept-spin"]).ready()
    socks = _exhaust_descriptors(sv)
    wait_until(lambda: len(sv.find("accept_failed")) > 1000, timeout=10, message="an accept_failed flood")
    sv.kill()
    for s in socks:
        s.close()


# --------------------------------------------------------------------------- 7. orphaned workers


def _orphan_after_master_kill(supervise: Any, app_dir: Path, inject: list[str], hang: str) -> tuple[Supervise, int]:
    if hang == "import":
        write_app(app_dir, extra="time.sleep(600)")
    sv = supervise("app", "-w", "1", "--chdir", str(app_dir), "--no-watch", "--graceful-timeout", "2",
                   inject=inject)
    worker = sv.wait_for("worker_spawned")["worker_pid"]
    if hang == "request":
        sv.ready()
        slow_in_background(sv.port, 600)
        slow_started(app_dir)
    os.kill(sv.pid, signal.SIGKILL)
    sv.wait(10)
    return sv, worker


@pytest.mark.parametrize("hang", ["request", "import"])
def test_7_workers_never_outlive_a_killed_master_with_the_port(supervise, app_dir, hang):
    sv, worker = _orphan_after_master_kill(supervise, app_dir, [], hang)
    wait_until(lambda: gone(worker), timeout=6, message="the orphaned worker to exit")
    assert port_is_free(sv.port)
    write_app(app_dir, "2")
    restarted = supervise("app", "-w", "1", "--chdir", str(app_dir), "--no-watch", port=sv.port).ready()
    assert restarted.get()[1] == "version=2"


@pytest.mark.parametrize("hang", ["request", "import"])
def test_7_negative_control_without_the_lifeline_the_orphan_keeps_the_port(supervise, app_dir, hang):
    sv, worker = _orphan_after_master_kill(supervise, app_dir, ["no-lifeline"], hang)
    try:
        with pytest.raises(AssertionError):
            wait_until(lambda: gone(worker), timeout=6, message="the orphaned worker to exit")
        assert not port_is_free(sv.port)
    finally:
        os.kill(worker, signal.SIGKILL)


# --------------------------------------------------------------------------- 8. the app's daemons


def test_8_a_daemon_forked_by_the_app_does_not_outlive_a_clean_stop(supervise, app_dir):
    sv = supervise("app", "-w", "1", "--chdir", str(app_dir), "--no-watch").ready()
    daemon = int(sv.get("/daemon")[1])
    assert psutil.pid_exists(daemon)
    assert sv.stop() == 0
    assert gone(daemon) and port_is_free(sv.port)
    assert sv.find("descendants_terminated")[0]["count"] >= 1


def test_8_negative_control_without_the_final_sweep_the_daemon_keeps_the_port(supervise, app_dir):
    sv = supervise("app", "-w", "1", "--chdir", str(app_dir), "--no-watch", inject=["no-descendant-sweep"]).ready()
    daemon = int(sv.get("/daemon")[1])
    try:
        assert sv.stop() == 0
        assert not gone(daemon) and not port_is_free(sv.port)
    finally:
        os.kill(daemon, signal.SIGKILL)


# --------------------------------------------------------------------------- 9. a paused master


def _pause_master(sv: Supervise, app_dir: Path, seconds: float) -> dict[str, Any]:
    slow, result = slow_in_background(sv.port, seconds + 2)
    slow_started(app_dir)
    sv.signal(signal.SIGSTOP)
    resume_at = time.monotonic() + seconds
    # The fault itself lasts `seconds` (longer than --worker-timeout): a deadline, not an event.
    wait_until(lambda: time.monotonic() >= resume_at, timeout=seconds + 5, message="the pause to last")
    sv.signal(signal.SIGCONT)
    slow.join(seconds + 10)
    return result


def test_9_pausing_the_master_does_not_kill_healthy_workers(supervise, app_dir):
    sv = supervise("app", "-w", "2", "--chdir", str(app_dir), "--no-watch", "--worker-timeout", "3").ready()
    result = _pause_master(sv, app_dir, 5)
    assert result.get("status") == 200, result
    sv.wait_for("master_was_paused")
    assert not sv.find("worker_killed")
    assert served_promptly(sv.port, n=5) == []


def test_9_negative_control_without_the_grace_the_workers_are_killed(supervise, app_dir):
    sv = supervise("app", "-w", "2", "--chdir", str(app_dir), "--no-watch", "--worker-timeout", "3",
                   inject=["no-pause-grace"]).ready()
    result = _pause_master(sv, app_dir, 5)
    assert "error" in result
    assert "no heartbeat" in sv.wait_for("worker_killed")["reason"]


# --------------------------------------------------------------------------- 10. stray signals


KILLERS = ["SIGALRM", "SIGPROF", "SIGVTALRM", "SIGXCPU", "SIGUSR1", "SIGIO"]


def test_10_no_signal_kills_the_master_and_sigpwr_stops_it_gracefully(supervise, app_dir):
    sv = supervise("app", "-w", "1", "--chdir", str(app_dir), "--no-watch").ready()
    for name in KILLERS:
        sv.signal(getattr(signal, name))
        sv.wait_for("signal_ignored", signal=name)
    sv.signal(signal.SIGRTMIN + 3)
    sv.wait_for("signal_ignored", signal="SIGRTMIN+3")
    assert sv.get()[0] == 200
    slow, result = slow_in_background(sv.port, 1)
    slow_started(app_dir)
    sv.signal(signal.SIGPWR)
    assert sv.wait(10) == 0
    slow.join(5)
    assert result == {"status": 200, "body": "version=1"}


def test_10_negative_control_default_actions_kill_the_master(supervise, app_dir):
    sv = supervise("app", "-w", "1", "--chdir", str(app_dir), "--no-watch", inject=["default-signals"]).ready()
    sv.signal(signal.SIGALRM)
    assert sv.wait(10) == -signal.SIGALRM


# --------------------------------------------------------------------------- 11. keep-alive while busy


def _request_on_an_idle_connection_while_the_worker_is_busy(sv: Supervise, app_dir: Path) -> bytes:
    with connect(sv.port, timeout=15) as keep:
        keep.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert keep.recv(65536).startswith(b"HTTP/1.1 200")
        slow, _ = slow_in_background(sv.port, 3)  # the loop is busy with it for 3 s
        slow_started(app_dir)
        keep.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        slow.join(10)
        try:
            return read_to_eof(keep)
        except OSError:
            return b""


def test_11_a_request_that_arrives_while_the_worker_is_busy_is_answered(supervise, app_dir):
    sv = supervise("app", "-w", "1", "--chdir", str(app_dir), "--no-watch", "--keepalive-timeout", "1").ready()
    response = _request_on_an_idle_connection_while_the_worker_is_busy(sv, app_dir)
    assert response.startswith(b"HTTP/1.1 200") and response.endswith(b"version=1")


def test_11_negative_control_closing_on_the_idle_timeout_drops_it(supervise, app_dir):
    sv = supervise("app", "-w", "1", "--chdir", str(app_dir), "--no-watch", "--keepalive-timeout", "1",
                   inject=["idle-no-peek"]).ready()
    assert _request_on_an_idle_connection_while_the_worker_is_busy(sv, app_dir) == b""
