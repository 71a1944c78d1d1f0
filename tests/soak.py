"""`make soak`: every hostile client and careless operator of tests/test_hostile.py at once,
against one running supervise, while well-behaved clients measure the service.

    python -m tests.soak [--duration SECONDS] [--workers N]

Loopback only, bounded in time.  The well-behaved clients are closed-loop HTTP/1.1 clients,
half with keep-alive, half with a new connection per request.  Like every real client (RFC 9112
section 9.3.1), a keep-alive client retries an idempotent request once when a connection it
reused was closed before any byte of the response: that happens when a request to the crashing
endpoint takes down the worker holding that idle connection.  Those retries are counted and
reported; any other error, any status but 200, a response slower than the client timeout, or a
version that goes back after a reload is a failure.  Exit status 1 on any failure.

At the same time, for the whole duration:
  * idle and half-request connections to the health port, and health checks;
  * slow request bodies (3 of 100 bytes sent);
  * slow readers (a 20 MiB response and 20 pipelined 1 MiB responses, never read);
  * bursts of idle connections that run the workers out of descriptors (RLIMIT_NOFILE 512);
  * a request that crashes its worker (os._exit), every few seconds;
  * a request that holds a worker's loop (--threads 1) longer than the keep-alive timeout;
  * stray signals to the master (ALRM, PROF, VTALRM, XCPU, USR1, IO, a real-time signal, WINCH);
  * the master paused (SIGSTOP) for longer than --worker-timeout, then continued;
  * a reload (SIGHUP, new code) every few seconds;
  * an absurd --workers given to a second supervise, which must refuse it;
then a graceful stop, after which no process of supervise's (nor the daemon the app forked)
may hold the port.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import psutil

from tests.harness import Supervise, http_get, write_app

CLIENT_TIMEOUT = 15.0


class Client(threading.Thread):
    """A well-behaved closed-loop client."""

    def __init__(self, port: int, keepalive: bool, stop: threading.Event, order: list[str]) -> None:
        super().__init__(daemon=True)
        self.port, self.keepalive, self.stop_event, self.order = port, keepalive, stop, order
        self.ok = 0
        self.retries = 0
        self.failures: list[str] = []
        self.latencies: list[float] = []
        self.versions: list[str] = []
        self.when: list[float] = []  # when each failure happened (monotonic)

    def run(self) -> None:
        conn: http.client.HTTPConnection | None = None
        reused = False
        while not self.stop_event.is_set():
            started = time.monotonic()
            try:
                if conn is None:
                    conn, reused = http.client.HTTPConnection("127.0.0.1", self.port, timeout=CLIENT_TIMEOUT), False
                conn.request("GET", "/", headers={} if self.keepalive else {"Connection": "close"})
                resp = conn.getresponse()
                body = resp.read().decode()
                if resp.status != 200:
                    self.failures.append(f"status {resp.status}")
                    self.when.append(time.monotonic())
                else:
                    self.ok += 1
                    self.versions.append(body)
                self.latencies.append(time.monotonic() - started)
                if resp.will_close or not self.keepalive:
                    conn.close()
                    conn = None
                else:
                    reused = True
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                assert conn is not None
                conn.close()
                conn = None
                if reused:  # the idle connection we reused was closed under us: retry once
                    self.retries += 1
                    continue
                self.failures.append(f"{type(exc).__name__}: {exc} (keepalive={self.keepalive})")
                self.when.append(time.monotonic())
            except Exception as exc:  # noqa: BLE001 - every other failure counts
                if conn is not None:
                    conn.close()
                conn = None
                self.failures.append(f"{type(exc).__name__}: {exc} (keepalive={self.keepalive})")
                self.when.append(time.monotonic())
        if conn is not None:
            conn.close()


class Hostile(threading.Thread):
    """One hostile actor, repeating its act until the stop."""

    def __init__(self, name: str, act: Callable[[threading.Event], None], stop: threading.Event) -> None:
        super().__init__(daemon=True, name=name)
        self.act, self.stop_event = act, stop
        self.rounds = 0
        self.errors: Counter[str] = Counter()

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.act(self.stop_event)
            except Exception as exc:  # noqa: BLE001 - a hostile client's own troubles are its own
                self.errors[type(exc).__name__] += 1
            self.rounds += 1


def _connect(port: int, timeout: float = 20.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def _read_all(sock: socket.socket) -> int:
    n = 0
    try:
        while chunk := sock.recv(1 << 20):
            n += len(chunk)
    except OSError:
        pass
    return n


def idle_health(sv: Supervise) -> Callable[[threading.Event], None]:
    def act(stop: threading.Event) -> None:
        idle, half = _connect(sv.health_port), _connect(sv.health_port)
        half.sendall(b"GET /hea")
        for _ in range(5):
            http_get(sv.health_port, "/health", timeout=5)
        for s in (idle, half):
            _read_all(s)  # closed by the server at its idle timeout
            s.close()
    return act


def slow_bodies(sv: Supervise) -> Callable[[threading.Event], None]:
    def act(stop: threading.Event) -> None:
        socks = [_connect(sv.port) for _ in range(6)]
        for s in socks:
            s.sendall(b"POST /body HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
        for s in socks:
            _read_all(s)  # a 408 at the body timeout
            s.close()
    return act


def slow_readers(sv: Supervise) -> Callable[[threading.Event], None]:
    def act(stop: threading.Event) -> None:
        socks = []
        for request in (b"GET /big?mb=20 HTTP/1.1\r\nHost: x\r\n\r\n",
                        b"GET /big?mb=1 HTTP/1.1\r\nHost: x\r\n\r\n" * 20):
            s = _connect(sv.port)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.sendall(request)
            socks.append(s)
        stop.wait(5)  # never read: the server drops them at its write timeout
        for s in socks:
            s.close()
    return act


def descriptor_burst(sv: Supervise) -> Callable[[threading.Event], None]:
    def act(stop: threading.Event) -> None:
        socks = []
        for _ in range(700):  # more than the workers' descriptors
            try:
                socks.append(_connect(sv.port, timeout=5))
            except OSError:
                break
        stop.wait(3)
        for s in socks:
            s.close()
        stop.wait(3)
    return act


def crashes(sv: Supervise) -> Callable[[threading.Event], None]:
    def act(stop: threading.Event) -> None:
        try:
            http_get(sv.port, "/crash", timeout=5)
        except OSError:
            pass  # the crash request's own connection dies with its worker
        stop.wait(3)
    return act


def busy_loop(sv: Supervise) -> Callable[[threading.Event], None]:
    def act(stop: threading.Event) -> None:
        http_get(sv.port, "/slow?s=2", timeout=CLIENT_TIMEOUT)  # longer than the keep-alive timeout
        stop.wait(2)
    return act


STRAY = ["SIGALRM", "SIGPROF", "SIGVTALRM", "SIGXCPU", "SIGUSR1", "SIGIO", "SIGWINCH"]


def stray_signals(sv: Supervise) -> Callable[[threading.Event], None]:
    def act(stop: threading.Event) -> None:
        for name in STRAY:
            sv.signal(getattr(signal, name))
        sv.signal(signal.SIGRTMIN + 3)
        stop.wait(0.5)
    return act


def pauses(sv: Supervise, seconds: float) -> Callable[[threading.Event], None]:
    def act(stop: threading.Event) -> None:
        stop.wait(7)
        if stop.is_set():
            return
        sv.signal(signal.SIGSTOP)
        stop.wait(seconds)  # the fault: the master is stopped for this long
        sv.signal(signal.SIGCONT)
    return act


def reloads(sv: Supervise, code: Path, order: list[str]) -> Callable[[threading.Event], None]:
    def act(stop: threading.Event) -> None:
        stop.wait(4)
        if stop.is_set():
            return
        version = str(len(order) + 1)
        write_app(code, version)
        order.append(f"version={version}")
        sv.signal(signal.SIGHUP)
    return act


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--clients", type=int, default=4, help="well-behaved clients of each kind")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="supervise-soak-"))
    code = work / "code"
    write_app(code, "1")
    order = ["version=1"]
    log(f"starting supervise ({args.workers} workers, RLIMIT_NOFILE 512), code in {code}")
    sv = Supervise(["app", "-w", str(args.workers), "--chdir", str(code), "--no-watch",
                    "--keepalive-timeout", "1", "--header-timeout", "3", "--body-timeout", "3",
                    "--write-timeout", "3", "--worker-timeout", "3", "--graceful-timeout", "5"],
                   health=True, prefix=["prlimit", "--nofile=512:512", "--"], cwd=work)
    failures: list[str] = []
    try:
        sv.ready()
        refused = Supervise(["app", "--workers", "100000", "--chdir", str(code), "--no-watch"], cwd=work)
        if refused.wait(10) != 2:
            failures.append("--workers 100000 was not refused with exit 2")
        daemon = int(sv.get("/daemon")[1])

        stop = threading.Event()
        clients = [Client(sv.port, keepalive, stop, order) for keepalive in (True, False)
                   for _ in range(args.clients)]
        hostile = [Hostile("idle health", idle_health(sv), stop), Hostile("slow bodies", slow_bodies(sv), stop),
                   Hostile("slow readers", slow_readers(sv), stop),
                   Hostile("descriptor bursts", descriptor_burst(sv), stop),
                   Hostile("crashing endpoint", crashes(sv), stop), Hostile("busy loop", busy_loop(sv), stop),
                   Hostile("stray signals", stray_signals(sv), stop), Hostile("master paused", pauses(sv, 5), stop),
                   Hostile("reloads", reloads(sv, code, order), stop)]
        log(f"{len(clients)} well-behaved clients and {len(hostile)} hostile actors for {args.duration:g}s")
        for t in [*clients, *hostile]:
            t.start()
        deadline = time.monotonic() + args.duration
        while time.monotonic() < deadline and sv.proc.poll() is None:
            stop.wait(min(5.0, max(0.0, deadline - time.monotonic())))
            log(f"  {sum(c.ok for c in clients)} ok, {sum(len(c.failures) for c in clients)} failed")
        stop.set()
        for t in [*clients, *hostile]:
            t.join(CLIENT_TIMEOUT + 30)
        if sv.proc.poll() is not None:
            failures.append(f"supervise exited during the soak ({sv.proc.returncode})")
        else:
            health = sv.health()
            if health[0] != 200:
                failures.append(f"health after the soak: {health}")
            code_ = sv.stop(30)
            if code_ != 0:
                failures.append(f"graceful stop exited {code_}")
            leftovers = [p.pid for p in psutil.process_iter() if p.pid == daemon]
            if leftovers:
                failures.append(f"the app's daemon outlived supervise: {leftovers}")
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(("127.0.0.1", sv.port))
                except OSError:
                    failures.append("the port is still held after the stop")
        failures += report(sv, clients, hostile, order)
    finally:
        sv.kill()
    for f in failures:
        log(f"FAILED: {f}")
    log("soak passed" if not failures else f"soak failed ({len(failures)} problems)")
    return 1 if failures else 0


def report(sv: Supervise, clients: list[Client], hostile: list[Hostile], order: list[str]) -> list[str]:
    failures: list[str] = []
    ok = sum(c.ok for c in clients)
    failed = [f for c in clients for f in c.failures]
    lat = sorted(x for c in clients for x in c.latencies)
    pct = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan"))
    log(f"well-behaved: {ok} ok, {len(failed)} failed, {sum(c.retries for c in clients)} keep-alive "
        f"retries (RFC 9112 9.3.1); latency p50 {pct(0.5) * 1000:.1f} ms, p99 {pct(0.99) * 1000:.1f} ms, "
        f"max {lat[-1] * 1000 if lat else 0:.0f} ms")
    for kind, n in Counter(failed).most_common(10):
        log(f"  {n} x {kind}")
    if failed:
        failures.append(f"{len(failed)} failed requests from well-behaved clients")
    rank = {v: i for i, v in enumerate(order)}
    for c in clients:
        ranks = [rank.get(v, -1) for v in c.versions]
        back = [i for i, (a, b) in enumerate(zip(ranks, ranks[1:])) if b < a]
        if back:
            i = back[0]
            failures.append(f"a client (keepalive={c.keepalive}) saw an older version after a newer one: "
                            f"{c.versions[max(0, i - 2):i + 3]}")
            break
    if os.environ.get("SOAK_DEBUG"):
        for t in sorted(t for c in clients for t in c.when):
            near = [e for e in sv.events if abs(e["_t"] - t) < 0.5 and e["event"] not in ("signal_ignored",)]
            log(f"failure at {t:.3f}: " + "; ".join(f"{e['_t']:.3f} {e['event']} {e.get('reason') or e.get('status') or ''}"
                                                    for e in near[-8:]))
    for h in hostile:
        log(f"hostile {h.name}: {h.rounds} rounds" + (f", {dict(h.errors)}" if h.errors else ""))
    events = Counter(e["event"] for e in sv.events)
    phases = Counter(e.get("phase") for e in sv.events if e["event"] == "client_timeout")
    log("supervise: " + json.dumps({k: events[k] for k in (
        "reload_finished", "reload_failed", "worker_exited", "worker_killed", "worker_backoff", "master_was_paused",
        "signal_ignored", "accept_failed", "request_rejected", "client_timeout", "internal_error")}))
    log(f"client timeouts by phase: {dict(phases)}")
    kills = Counter(e.get("reason") for e in sv.events if e["event"] == "worker_killed")
    if kills:
        log(f"workers killed: {dict(kills)}")
    if events["internal_error"]:
        failures.append("supervise logged an internal error")
    if not all(events[k] for k in ("master_was_paused", "signal_ignored", "reload_finished")):
        failures.append("a hostile act had no effect (was it exercised?)")
    return failures


def log(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
