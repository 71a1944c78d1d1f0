"""Test harness: run supervise as a real process, read its JSON log events, drive load.

No fixed sleeps: everything waits on a log event, a socket answer or a deadline."""

from __future__ import annotations

import http.client
import json
import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

ROOT = Path(__file__).resolve().parent.parent
SUPERVISE = [sys.executable, "-m", "supervisor"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, message: str = "condition",
               interval: float = 0.02) -> Any:
    """Poll `predicate` until it returns something truthy and return that, or fail at the
    deadline.  An exception from the predicate counts as "not yet"; the last one is reported."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
            last_error = None
        except Exception as exc:  # noqa: BLE001 - not yet
            last_error = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {message}{detail}")
        time.sleep(interval)  # polling interval of a deadline loop, not a fixed wait


def wait_exit(pid: int, timeout: float) -> int | None:
    """Exit code of child `pid`, or None (after killing it) when it outlives the timeout."""
    fd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
    finally:
        os.close(fd)
    if not ready:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return None
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])



# For programs the tests run (apps, stand-in PID 1s): wait for a process's exit, no fixed sleep.
WAIT_EXIT = '''import os, select
def wait_exit(pid):
    """Return once process `pid` has exited and its children were re-parented (a pidfd turns
    readable only then): a handshake with the kernel, at most 10 s."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return  # exited and reaped already
    try:
        select.select([fd], [], [], 10)
    finally:
        os.close(fd)
'''

APP_TEMPLATE = '''
import os, select, sys, time
VERSION = {version!r}
{wait_exit}{extra}

def application(environ, start_response):
    path = environ["PATH_INFO"]
    query = dict(p.partition("=")[::2] for p in environ.get("QUERY_STRING", "").split("&") if p)
    if path == "/slow":
        open(os.path.join(os.environ.get("SLOW_MARK_DIR", "."), "slow.started"), "w").close()  # handshake
        time.sleep(float(query.get("s", "3")))
    elif path == "/env":
        body = os.environ.get(query.get("k", ""), "<unset>").encode()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]
    elif path == "/orphans":
        n = int(query.get("n", "3"))
        for _ in range(n):
            if os.fork() == 0:          # child: fork a grandchild, then exit at once
                child = os.getpid()
                if os.fork() == 0:      # grandchild: orphaned, re-parented, then exits
                    wait_exit(child)
                    with open("orphan.%d" % os.getpid(), "w") as f:
                        f.write(str(os.getppid()))  # who adopted us
                    os._exit(0)
                os._exit(0)
        # reap the direct children so only the grandchildren are orphans
        for _ in range(n):
            os.wait()
    elif path == "/crash":
        os._exit(7)
    elif path == "/body":  # reads the whole request body
        data = environ["wsgi.input"].read()
        body = str(len(data)).encode()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]
    elif path == "/big":  # one large chunk: ?mb=N MiB
        body = b"x" * (int(query.get("mb", "1")) << 20)
        start_response("200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(len(body)))])
        return [body]
    elif path == "/daemon":  # double-fork a daemon (setsid) that keeps every inherited descriptor
        r, w = os.pipe()
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.write(w, str(os.getpid()).encode())
                os.close(w)
                time.sleep(600)  # the daemon lives on: it is what a clean exit must not leave behind
                os._exit(0)
            os._exit(0)
        os.close(w)
        os.wait()
        body = os.read(r, 32)
        os.close(r)
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]
    elif path == "/pid":
        body = str(os.getpid()).encode()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]
    body = ("version=" + VERSION).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
'''


def slow_started(directory: Path, timeout: float = 10.0) -> None:
    """Wait for the app's mark that a /slow request is being served (the app's cwd)."""
    wait_until(lambda: (directory / "slow.started").exists(), timeout, message="slow request in flight")


def write_app(directory: Path, version: str = "1", extra: str = "", name: str = "app.py") -> Path:
    """Write the versioned test app.  `extra` is module-level code (e.g. raise, or sleep)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    tmp = path.with_suffix(".tmp")
    tmp.write_text(APP_TEMPLATE.format(version=version, wait_exit=WAIT_EXIT, extra=textwrap.dedent(extra)))
    os.replace(tmp, path)  # atomic, like a deploy tool
    return path


class Supervise:
    """A supervise process with its log events collected by a reader thread."""

    def __init__(self, args: Iterable[str], cwd: Path | str | None = None, env: dict[str, str] | None = None,
                 port: int | None = None, prefix: Iterable[str] = (), health: bool = False,
                 inject: Iterable[str] = (), pass_fds: Iterable[int] = ()) -> None:
        """`inject`: names of tests/inject.py patches to run supervise with."""
        self.port = port or free_port()
        self.health_port = free_port() if health else None
        args = list(args)
        inject = list(inject)
        command = [sys.executable, "-m", "tests.inject", ",".join(inject), "--"] if inject else SUPERVISE
        argv = [*prefix, *command, *args]
        if "--bind" not in args and "-b" not in args and not pass_fds:
            argv += ["--bind", f"127.0.0.1:{self.port}"]
        if health:
            argv += ["--health-bind", f"127.0.0.1:{self.health_port}"]
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), "SUPERVISE_LOG_FORMAT": "json",
                    "PYTHONUNBUFFERED": "1", **(env or {})}
        self.events: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(argv, cwd=cwd, env=full_env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True,
                                     pass_fds=tuple(pass_fds))
        self.stderr = ""
        self._threads = [threading.Thread(target=self._read_stdout, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------------ logs
    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self._cond:
                self.raw.append(line)
                try:
                    event = json.loads(line)
                except ValueError:
                    event = None
                if isinstance(event, dict):
                    event["_t"] = time.monotonic()
                    self.events.append(event)
                self._cond.notify_all()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            with self._cond:
                self.stderr += raw.decode("utf-8", "replace")
                self._cond.notify_all()

    def find(self, event: str, **match: Any) -> list[dict[str, Any]]:
        with self._cond:
            return [e for e in self.events if e.get("event") == event
                    and all(e.get(k) == v for k, v in match.items())]

    def wait_for(self, event: str, timeout: float = 15.0, count: int = 1, **match: Any) -> dict[str, Any]:
        """Wait until `count` events named `event` (with fields equal to `match`) were logged."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [e for e in self.events if e.get("event") == event
                         and all(e.get(k) == v for k, v in match.items())]
                if len(found) >= count:
                    return found[count - 1]
                if self.proc.poll() is not None and not any(t.is_alive() for t in self._threads):
                    raise AssertionError(f"supervise exited ({self.proc.returncode}) before {event} {match}; "
                                         f"stderr: {self.stderr[-2000:]}\nlog tail:\n" + "\n".join(self.raw[-30:]))
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"timed out waiting for {event} {match} (have {len(found)}/{count}); "
                                         "log tail:\n" + "\n".join(self.raw[-40:]))
                self._cond.wait(min(remaining, 0.2))

    def ready(self, timeout: float = 20.0) -> "Supervise":
        self.wait_for("generation_ready", timeout=timeout)
        return self

    # ------------------------------------------------------------------ process
    @property
    def pid(self) -> int:
        return self.proc.pid

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def reload(self, timeout: float = 20.0) -> dict[str, Any]:
        """SIGHUP and wait for that reload's reload_finished event."""
        before = len(self.find("reload_finished"))
        self.signal(signal.SIGHUP)
        return self.wait_for("reload_finished", timeout=timeout, count=before + 1)

    def wait(self, timeout: float = 20.0) -> int:
        code = self.proc.wait(timeout)
        for t in self._threads:
            t.join(5)
        return code

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
        try:
            return self.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)

    def get(self, path: str = "/", timeout: float = 10.0) -> tuple[int, str]:
        return http_get(self.port, path, timeout)

    def health(self) -> tuple[int, dict[str, Any]]:
        assert self.health_port is not None
        status, body = http_get(self.health_port, "/health")
        return status, json.loads(body)


def http_get(port: int, path: str = "/", timeout: float = 10.0) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def raw_request(port: int, data: bytes, timeout: float = 5.0, read_until_close: bool = True) -> bytes:
    """Send raw bytes, return everything the server sends until it closes (or the timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            chunks.append(chunk)
            if not read_until_close:
                break
        return b"".join(chunks)


# --------------------------------------------------------------------------- load


@dataclass
class Result:
    started: float
    finished: float
    status: int | None
    body: str
    error: str | None
    client: int


@dataclass
class Load:
    """Closed-loop clients hammering a path: `keepalive` reuses one connection per client,
    otherwise each request opens a new one.  Every failure is recorded with its kind."""

    port: int
    clients: int = 8
    keepalive: bool = True
    path: str = "/"
    timeout: float = 15.0
    results: list[Result] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.clients)]

    def __enter__(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout + 5)

    def _run(self, client: int) -> None:
        conn: http.client.HTTPConnection | None = None
        deadline = time.monotonic() + 600  # bounded even if a test forgets to stop us
        while not self._stop.is_set() and time.monotonic() < deadline:
            started = time.monotonic()
            status, body, error = None, "", None
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
                headers = {} if self.keepalive else {"Connection": "close"}
                conn.request("GET", self.path, headers=headers)
                resp = conn.getresponse()
                status, body = resp.status, resp.read().decode()
                if not self.keepalive or resp.will_close:
                    conn.close()
                    conn = None
            except Exception as exc:  # every failure counts, classified by type
                error = f"{type(exc).__name__}: {exc}"
                if conn is not None:
                    conn.close()
                conn = None
            with self._lock:
                self.results.append(Result(started, time.monotonic(), status, body, error, client))

    # ------------------------------------------------------------------ checks
    def count(self) -> int:
        with self._lock:
            return len(self.results)

    def wait_requests(self, n: int, timeout: float = 20.0) -> None:
        start = self.count()
        wait_until(lambda: self.count() >= start + n, timeout, message=f"{n} more requests")

    def failures(self) -> list[Result]:
        with self._lock:
            return [r for r in self.results if r.error or r.status != 200]

    def versions_by_client(self) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        with self._lock:
            for r in self.results:
                if r.status == 200:
                    out.setdefault(r.client, []).append(r.body)
        return out

    def summary(self) -> str:
        kinds: dict[str, int] = {}
        for r in self.failures():
            key = r.error or f"status {r.status}"
            kinds[key] = kinds.get(key, 0) + 1
        return f"{self.count()} requests, failures: {kinds}"


def slow_in_background(port: int, seconds: float) -> tuple[threading.Thread, dict[str, Any]]:
    """GET /slow?s=SECONDS in a thread; the dict gets `status` and `body`, or `error`."""
    result: dict[str, Any] = {}

    def go() -> None:
        try:
            result["status"], result["body"] = http_get(port, f"/slow?s={seconds}", timeout=30)
        except Exception as exc:  # the test decides whether a failure was expected
            result["error"] = repr(exc)

    thread = threading.Thread(target=go)
    thread.start()
    return thread, result


def hup_reloads_under_load(sv: Supervise, app_dir: Path, last: int = 11) -> tuple[Load, Load, list[str]]:
    """Keep-alive and connection-per-request clients while the app goes to versions 2..last,
    one SIGHUP each; every reload must succeed.  Returns both loads and the version order."""
    order = ["version=1"]
    with Load(sv.port, clients=6, keepalive=True) as ka, Load(sv.port, clients=4, keepalive=False) as nk:
        ka.wait_requests(100)
        for n in range(2, last + 1):
            write_app(app_dir, str(n))
            order.append(f"version={n}")
            finished = sv.reload()
            assert finished["outcome"] == "succeeded", finished
            ka.wait_requests(30)
            nk.wait_requests(10)
    return ka, nk, order


def assert_monotonic_versions(load: Load, order: list[str]) -> None:
    """Per client, the versions served only move forward through `order`."""
    rank = {v: i for i, v in enumerate(order)}
    for client, versions in load.versions_by_client().items():
        ranks = [rank[v] for v in versions]
        for a, b in zip(ranks, ranks[1:]):
            assert b >= a, f"client {client} went back from {order[a]} to {order[b]}: {versions}"
