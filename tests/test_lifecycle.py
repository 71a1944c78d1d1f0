"""Signals, shutdown, crashes and respawn backoff, with real processes."""

from __future__ import annotations

import os
import signal
import socket
import time
from datetime import datetime

import psutil

from tests.harness import http_get, slow_in_background, slow_started, wait_until, write_app


def test_sigterm_lets_a_slow_request_finish_then_exits_zero(supervise, app_dir):
    sv = supervise("app", "-w", "2", "--chdir", str(app_dir), "--no-watch", "--graceful-timeout", "6").ready()
    thread, result = slow_in_background(sv.port, 2)
    slow_started(app_dir)
    started = time.monotonic()
    sv.signal(signal.SIGTERM)
    assert sv.wait(10) == 0
    thread.join(5)
    assert result == {"status": 200, "body": "version=1"}
    assert 1.5 < time.monotonic() - started < 6
    assert sv.find("shutdown_finished")
    # the listening socket is closed: nothing accepts any more
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", sv.port)) != 0


def test_keepalive_client_gets_connection_close_on_its_last_response(supervise, app_dir):
    sv = supervise("app", "-w", "1", "--chdir", str(app_dir), "--no-watch").ready()
    with socket.create_connection(("127.0.0.1", sv.port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        first = s.recv(65536)
        assert b"Connection: close" not in first
        s.sendall(b"GET /slow?s=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        slow_started(app_dir)
        sv.signal(signal.SIGTERM)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        assert data.startswith(b"HTTP/1.1 200") and b"Connection: close" in data
    assert sv.wait(10) == 0


def test_graceful_timeout_kills_a_request_that_is_too_slow(supervise, app_dir):
    sv = supervise("app", "-w", "1", "--chdir", str(app_dir), "--no-watch", "--graceful-timeout", "1").ready()
    thread, result = slow_in_background(sv.port, 20)
    slow_started(app_dir)
    sv.signal(signal.SIGTERM)
    assert sv.wait(10) == 0
    thread.join(5)
    assert "error" in result
    assert "graceful timeout" in sv.find("worker_killed")[0]["reason"]


def test_sigquit_is_a_fast_shutdown(supervise, app_dir):
    sv = supervise("app", "-w", "2", "--chdir", str(app_dir), "--no-watch", "--graceful-timeout", "20").ready()
    thread, _ = slow_in_background(sv.port, 20)
    slow_started(app_dir)
    started = time.monotonic()
    sv.signal(signal.SIGQUIT)
    assert sv.wait(10) == 0
    assert time.monotonic() - started < 3
    thread.join(5)


def test_second_sigterm_during_shutdown_is_fast(supervise, app_dir):
    sv = supervise("app", "-w", "1", "--chdir", str(app_dir), "--no-watch", "--graceful-timeout", "20").ready()
    thread, _ = slow_in_background(sv.port, 20)
    slow_started(app_dir)
    started = time.monotonic()
    sv.signal(signal.SIGTERM)
    sv.wait_for("shutdown_begun")
    sv.signal(signal.SIGTERM)
    assert sv.wait(10) == 0
    assert time.monotonic() - started < 3
    assert sv.find("fast_shutdown")
    thread.join(5)


def test_long_graceful_timeout_warns_about_docker_stop(supervise, app_dir):
    sv = supervise("app", "-w", "1", "--chdir", str(app_dir), "--no-watch", "--graceful-timeout", "30").ready()
    assert sv.find("graceful_timeout_too_long")
    assert not supervise("app", "-w", "1", "--chdir", str(app_dir), "--no-watch").ready().find(
        "graceful_timeout_too_long")


def test_stray_hup_and_int_to_a_worker_do_not_kill_it(supervise, app_dir):
    sv = supervise("app", "-w", "1", "--chdir", str(app_dir), "--no-watch").ready()
    pid = int(http_get(sv.port, "/pid")[1])
    os.kill(pid, signal.SIGHUP)  # what `pkill -HUP python` does to every worker
    os.kill(pid, signal.SIGINT)
    for _ in range(20):  # the worker keeps serving, and is the same process
        assert http_get(sv.port, "/pid")[1] == str(pid)
    assert not sv.find("worker_exited")
    # negative control: the dispositions really are "ignore" (a default one would have killed it)
    ignored = int(next(l for l in open(f"/proc/{pid}/status") if l.startswith("SigIgn:")).split()[1], 16)
    assert ignored & (1 << (signal.SIGHUP - 1)) and ignored & (1 << (signal.SIGINT - 1))


def test_killed_worker_is_replaced(supervise, app_dir):
    sv = supervise("app", "-w", "2", "--chdir", str(app_dir), "--no-watch").ready()
    victim = sv.find("worker_ready")[0]["worker_pid"]
    os.kill(victim, signal.SIGKILL)
    exited = sv.wait_for("worker_exited", worker_pid=victim)
    assert exited["status"] == "signal 9 (SIGKILL)" and exited["level"] == "warning"
    sv.wait_for("worker_ready", count=3)
    assert len(psutil.Process(sv.pid).children()) == 2
    assert http_get(sv.port)[0] == 200


def test_crash_looping_worker_backs_off(supervise, app_dir):
    # Every worker dies 50 ms after it is ready: a crash loop.
    write_app(app_dir, extra="import threading; threading.Timer(0.05, os._exit, (1,)).start()")
    sv = supervise("app", "-w", "1", "--chdir", str(app_dir), "--no-watch")
    sv.wait_for("worker_spawned", count=5, timeout=20)
    spawns = [datetime.fromisoformat(e["timestamp"]).timestamp() for e in sv.find("worker_spawned")]
    gaps = [b - a for a, b in zip(spawns, spawns[1:])]
    # 0 s, then 0.5, 1, 2 s between respawns (plus boot time)
    assert gaps[1] >= 0.45 and gaps[2] >= 0.95 and gaps[3] >= 1.9, gaps
    assert gaps[2] > gaps[1] and gaps[3] > gaps[2]
    assert [e["delay"] for e in sv.find("worker_backoff")][:3] == [0.5, 1.0, 2.0]


def test_workers_exit_when_the_master_dies(supervise, app_dir):
    sv = supervise("app", "-w", "2", "--chdir", str(app_dir), "--no-watch").ready()
    workers = [psutil.Process(e["worker_pid"]) for e in sv.find("worker_ready")]
    os.kill(sv.pid, signal.SIGKILL)
    wait_until(lambda: not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers),
               timeout=10, message="workers to exit after the master died")
