"""The master's health endpoint: 503 while booting, 200 while a generation serves, 503 once
shutdown begins; JSON state."""

from __future__ import annotations

import json
import signal
import threading

from tests.harness import http_get, slow_started, wait_until, write_app


def _health(port: int) -> tuple[int, dict]:
    status, body = http_get(port, "/health", timeout=5)
    return status, json.loads(body)


def test_health_follows_the_life_cycle(supervise, app_dir):
    write_app(app_dir, extra="time.sleep(1.0)")  # a slow import: the first generation boots for 1 s
    sv = supervise("app", "-w", "2", "--chdir", str(app_dir), "--no-watch", "--graceful-timeout", "6",
                   health=True)
    status, body = wait_until(lambda: _health(sv.health_port), timeout=10, message="health endpoint")
    assert status == 503 and body["status"] == "starting"
    sv.ready()
    status, body = _health(sv.health_port)
    assert status == 200 and body["status"] == "ok" and body["generation"] == 1
    assert {w["generation"] for w in body["workers"]} == {1} and len(body["workers"]) == 2
    assert all(w["rss"] > 0 and w["state"] == "serving" for w in body["workers"])
    assert http_get(sv.health_port, "/nope")[0] == 404

    write_app(app_dir, "2", extra='raise RuntimeError("bad deploy")')
    sv.reload()
    status, body = _health(sv.health_port)
    assert status == 200, "a failed reload leaves the service healthy"
    assert body["last_reload"]["state"] == "failed" and "bad deploy" in body["last_reload"]["error"]

    slow = threading.Thread(target=lambda: http_get(sv.port, "/slow?s=2"))
    slow.start()
    slow_started(app_dir)
    sv.signal(signal.SIGTERM)
    sv.wait_for("shutdown_begun")
    status, body = _health(sv.health_port)  # the master still answers while workers drain
    assert status == 503 and body["status"] == "stopping"
    slow.join(10)
    assert sv.wait(10) == 0


def test_memory_readings_are_read_at_most_once_per_second_per_process():
    """/health and /metrics with --preload read smaps per worker: a client polling them in a
    loop must cost the master one read per process per second, not one per request."""
    from supervisor.master.loop import MemoryReadings

    reads: list[int] = []
    now = [100.0]
    readings = MemoryReadings(lambda pid: reads.append(pid) or (pid, 0, 0, 0), lambda: now[0])
    for _ in range(1000):
        assert readings(7) == (7, 0, 0, 0)
    assert reads == [7]
    readings(8)
    now[0] += 1.0
    readings(7)
    assert reads == [7, 8, 7]  # a second later it is read again
    # The table stays bounded when pids come and go.
    for pid in range(10_000, 10_000 + 3 * MemoryReadings.LIMIT):
        now[0] += 0.5
        readings(pid)
    assert len(readings.kept) <= MemoryReadings.LIMIT
