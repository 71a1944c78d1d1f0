"""Steady load through the fleet's HAProxy, and a watcher of Consul DNS and HAProxy's view.

`LbLoad` is tests/harness.Load adapted to a load balancer: keep-alive and
connection-per-request clients at a steady pace, every request recorded with its start
and end (wall clock, to compare with the containers' log timestamps), which instance
answered and with which version.  Any error or non-200 answer is a failure: there is no
retry anywhere (HAProxy has `retries 0`, the clients retry nothing).

`Watcher` polls Consul DNS (SRV) and HAProxy's runtime API every 50 ms and records when an
address leaves or joins each of them.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

from tests.harness import wait_until


@dataclass
class Rec:
    started: float      # time.time()
    finished: float
    thread: str
    status: int | None
    instance: str | None
    version: str | None
    release: str | None
    greeting: str | None
    error: str | None

    @property
    def failed(self) -> bool:
        return self.error is not None or self.status != 200


class LbLoad:
    def __init__(self, port: int, path: str = "/whoami", keepalive: int = 3, fresh: int = 3,
                 rate: float = 40.0, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
        """`rate`: requests per second per client thread (steady, so the fleet keeps CPU)."""
        self.host, self.port, self.path, self.timeout = host, port, path, timeout
        self.interval = 1.0 / rate
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.records: list[Rec] = []
        self._threads = [threading.Thread(target=self._run, args=(f"ka{i}", True), daemon=True) for i in range(keepalive)]
        self._threads += [threading.Thread(target=self._run, args=(f"fresh{i}", False), daemon=True) for i in range(fresh)]

    def __enter__(self) -> "LbLoad":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout + 5)

    def _run(self, name: str, keepalive: bool) -> None:
        conn: http.client.HTTPConnection | None = None
        deadline = time.monotonic() + 900  # bounded even if a test forgets to stop us
        next_at = time.monotonic()
        while not self._stop.is_set() and time.monotonic() < deadline:
            started = time.time()
            status = body = error = None
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
                conn.request("GET", self.path, headers={} if keepalive else {"Connection": "close"})
                resp = conn.getresponse()
                status, body = resp.status, resp.read().decode("utf-8", "replace")
                if not keepalive or resp.will_close:
                    conn.close()
                    conn = None
            except Exception as exc:  # noqa: BLE001 - every failure counts
                error = f"{type(exc).__name__}: {exc}"
                if conn is not None:
                    conn.close()
                conn = None
            info: dict[str, Any] = {}
            if status == 200 and body:
                try:
                    info = json.loads(body)
                except ValueError:
                    info = {}
            rec = Rec(started, time.time(), name, status, info.get("instance"), info.get("version"),
                      info.get("release"), info.get("greeting"),
                      error or (None if status == 200 else f"HTTP {status}: {(body or '')[:120]}"))
            with self._lock:
                self.records.append(rec)
            next_at = max(next_at + self.interval, time.monotonic())
            self._stop.wait(max(0.0, next_at - time.monotonic()))  # pacing, interrupted by stop()

    # ------------------------------------------------------------------ queries
    def snapshot(self) -> list[Rec]:
        with self._lock:
            return list(self.records)

    def count(self) -> int:
        with self._lock:
            return len(self.records)

    def failures(self) -> list[Rec]:
        return [r for r in self.snapshot() if r.failed]

    def wait_requests(self, n: int, timeout: float = 30) -> None:
        target = self.count() + n
        wait_until(lambda: self.count() >= target, timeout, f"{n} more requests through the load balancer")

    def wait_answer(self, match: Callable[[Rec], bool], timeout: float = 30, what: str = "an answer") -> Rec:
        """The first successful answer from now on that `match` accepts."""
        start = self.count()
        return wait_until(lambda: next((r for r in self.snapshot()[start:] if not r.failed and match(r)), None),
                          timeout, what)

    def instances_seen(self, since: float = 0.0) -> Counter:
        return Counter(r.instance for r in self.snapshot() if not r.failed and r.started >= since)

    def summary(self) -> str:
        recs = self.snapshot()
        failed = [r for r in recs if r.failed]
        kinds = Counter((r.error or "")[:60] for r in failed)
        span = (recs[-1].finished - recs[0].started) if recs else 0.0
        return (f"{len(recs)} requests in {span:.1f}s, {len(failed)} failed {dict(kinds)}, "
                f"by instance {dict(Counter(r.instance for r in recs if not r.failed))}")


class Watcher:
    """Polls Consul DNS and HAProxy's runtime API; records (time, addresses) for each."""

    def __init__(self, dns: tuple[str, int], name: str, lb_servers: Callable[[], dict[str, str]],
                 srv_lookup: Callable[..., list[Any]], interval: float = 0.05) -> None:
        self.dns, self.name, self._lb, self._srv, self.interval = dns, name, lb_servers, srv_lookup, interval
        self.dns_log: list[tuple[float, frozenset[str]]] = []
        self.lb_log: list[tuple[float, frozenset[str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Watcher":
        self._thread.start()
        wait_until(lambda: self.dns_log and self.lb_log, 10, "the first DNS and HAProxy observations")
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        # Each observation is stamped when its answer has arrived: "by this time the set was
        # this", so an address first seen missing at t had left at or before t.
        while not self._stop.is_set():
            try:
                ips = frozenset(r.ip for r in self._srv(*self.dns, self.name, timeout=0.5))
                self.dns_log.append((time.time(), ips))
            except (OSError, ValueError):
                pass
            try:
                servers = frozenset(self._lb())
                self.lb_log.append((time.time(), servers))
            except (OSError, ValueError):
                pass
            self._stop.wait(self.interval)

    @staticmethod
    def _first(log: list[tuple[float, frozenset[str]]], pred: Callable[[frozenset[str]], bool], after: float) -> float | None:
        return next((t for t, ips in list(log) if t >= after and pred(ips)), None)

    def dns_gone(self, ip: str, after: float) -> float | None:
        return self._first(self.dns_log, lambda ips: ip not in ips, after)

    def lb_gone(self, ip: str, after: float) -> float | None:
        return self._first(self.lb_log, lambda ips: ip not in ips, after)

    def wait_dns_gone(self, ip: str, after: float, timeout: float) -> float:
        return wait_until(lambda: self.dns_gone(ip, after), timeout, f"{ip} to leave Consul DNS")

    def wait_lb_gone(self, ip: str, after: float, timeout: float) -> float:
        return wait_until(lambda: self.lb_gone(ip, after), timeout, f"HAProxy to drop {ip}")
