"""Helpers for the Docker end-to-end tests: build, start, follow logs, load, inspect.

Every wait is a handshake with a deadline (a log event, an HTTP answer, a `docker inspect`
state), never a fixed sleep. We only talk to containers we started, on 127.0.0.1.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import docker  # the Docker SDK for Python (not this package: tests/ has an __init__.py)
from tests.harness import wait_until  # noqa: F401  (one deadline helper for every test)

REPO = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("SUPERVISE_IMAGE", "supervise:latest")
EXAMPLE_APP = REPO / "images" / "example" / "app"
LABEL = "supervise.test"
HEALTHCHECK_SCRIPT = "/usr/local/lib/supervise/healthcheck.py"
VENV_PYTHON = "/opt/venv/bin/python"

# `reload_finished` carries an `outcome`; these mean the new generation took over.
RELOAD_OK = {"ok", "success", "succeeded", "completed", "complete", "done", "ready", "reloaded"}

if not hasattr(docker, "from_env"):  # pragma: no cover - guards against tests/docker shadowing the SDK
    raise ImportError(f"`import docker` found {docker!r}, not the Docker SDK; keep tests/__init__.py")


class BuildError(Exception):
    pass


@dataclass
class ScriptRun:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def run_image_sh(*args: str, env: dict[str, str] | None = None, timeout: float = 900,
                 on_line: Callable[[str], None] | None = None) -> ScriptRun:
    """scripts/image.sh ARGS...; each progress line it prints on stderr (one per step, with its
    duration: "image: base image ... built in 31.2 s") goes to `on_line` as it comes."""
    start = time.monotonic()
    proc = subprocess.Popen([str(REPO / "scripts" / "image.sh"), *args], cwd=REPO, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1, env=env)
    out: list[str] = []
    err: list[str] = []

    def pump(stream, sink: list[str], callback) -> None:
        for line in stream:
            sink.append(line)
            if callback is not None:
                callback(line.rstrip("\n"))

    readers = [threading.Thread(target=pump, args=(proc.stdout, out, None), daemon=True),
               threading.Thread(target=pump, args=(proc.stderr, err, on_line), daemon=True)]
    for reader in readers:
        reader.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise BuildError(f"scripts/image.sh {' '.join(args)} did not finish within {timeout:.0f}s:\n"
                         f"{''.join(err)[-3000:]}") from None
    finally:
        for reader in readers:
            reader.join(5)
    return ScriptRun(proc.returncode, "".join(out), "".join(err), time.monotonic() - start)


def build_image(timeout: float = 900, on_line: Callable[[str], None] | None = None) -> float:
    """scripts/image.sh build: ensures the engine, base image, wheelhouse and image. Returns its duration."""
    run = run_image_sh("build", timeout=timeout, on_line=on_line)
    if run.returncode != 0:
        raise BuildError(f"scripts/image.sh build failed (exit {run.returncode}); the Docker tests need a working "
                         f"engine and image:\n{run.stdout[-3000:]}{run.stderr[-3000:]}")
    return run.seconds


def docker_client():
    return docker.from_env(timeout=120)


def copy_example_app(tmp_path: Path) -> Path:
    target = tmp_path / "app"
    shutil.copytree(EXAMPLE_APP, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    # The container runs as a non-root user: the bind-mounted code must be world-readable.
    target.chmod(0o755)
    for path in target.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return target


def write_file(path: Path, text: str) -> None:
    """Replace a file atomically, as an editor or a deploy would (write aside, rename over)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:6]}.tmp")
    tmp.write_text(text)
    tmp.chmod(0o644)
    os.replace(tmp, path)


def set_version(app_dir: Path, version: str) -> None:
    write_file(app_dir / "version.py", f'"""Edited by the Docker tests."""\n\nVERSION = {version!r}\n')


def event_is(*names: str, **fields: Any) -> Callable[[dict], bool]:
    def match(ev: dict) -> bool:
        return ev.get("event") in names and all(ev.get(k) == v for k, v in fields.items())

    match.__name__ = f"event in {names}" + (f" with {fields}" if fields else "")
    return match


class LogStream:
    """Follows `docker logs` of one container in a thread; JSON lines become events."""

    def __init__(self, container) -> None:
        self.container = container
        self.events: list[dict] = []
        self.lines: list[str] = []
        self.closed = False
        self.error: BaseException | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=f"logs-{container.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        buf = b""
        try:
            for chunk in self.container.logs(stream=True, follow=True, stdout=True, stderr=True):
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    self._add(line)
        except Exception as exc:  # noqa: BLE001 - container removed under us
            self.error = exc
        finally:
            if buf:
                self._add(buf)
            with self._cond:
                self.closed = True
                self._cond.notify_all()

    def _add(self, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").rstrip("\r")
        try:
            event = json.loads(text)
            if not isinstance(event, dict):
                raise ValueError
        except ValueError:
            event = {"event": None, "raw": text}
        with self._cond:
            self.lines.append(text)
            self.events.append(event)
            self._cond.notify_all()

    def mark(self) -> int:
        with self._cond:
            return len(self.events)

    def find(self, match: Callable[[dict], bool], start: int = 0) -> list[dict]:
        with self._cond:
            return [ev for ev in self.events[start:] if match(ev)]

    def wait_for(self, match: Callable[[dict], bool], timeout: float = 30, start: int = 0) -> tuple[int, dict]:
        """The first event at index >= start that matches; (index, event)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            index = start
            while True:
                while index < len(self.events):
                    if match(self.events[index]):
                        return index, self.events[index]
                    index += 1
                if self.closed:
                    raise AssertionError(f"container log ended before {getattr(match, '__name__', match)}; "
                                         f"last lines:\n{self.tail()}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no {getattr(match, '__name__', match)} within {timeout:.0f}s; "
                                         f"last lines:\n{self.tail()}")
                self._cond.wait(remaining)

    def tail(self, n: int = 40) -> str:
        with self._cond:
            return "\n".join(self.lines[-n:])


# --------------------------------------------------------------------------- HTTP


def http_get(port: int, path: str, timeout: float = 10, host: str = "127.0.0.1") -> tuple[int, str]:
    """One request on a fresh connection (Connection: close): (status, body)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        resp = conn.getresponse()
        return resp.status, resp.read().decode("utf-8", "replace")
    finally:
        conn.close()


def classify(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection_refused"
    if isinstance(exc, ConnectionResetError):
        return "connection_reset"
    if isinstance(exc, BrokenPipeError):
        return "broken_pipe"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "closed_before_response"
    if isinstance(exc, http.client.IncompleteRead):
        return "incomplete_body"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timeout"
    if isinstance(exc, http.client.HTTPException):
        return f"bad_http:{type(exc).__name__}"
    return f"other:{type(exc).__name__}"


@dataclass
class LoadReport:
    ok: int
    bodies: Counter
    failures: list[tuple[str, str, str]]  # (thread kind, classification, detail)
    keepalive_retries: list[tuple[str, str]]
    connections: int
    keepalive_requests: int
    keepalive_connections: int
    duration: float

    def summary(self) -> str:
        kinds = Counter(kind for _, kind, _ in self.failures)
        return (f"{self.ok} ok in {self.duration:.1f}s over {self.connections} connections "
                f"(keep-alive: {self.keepalive_requests} requests on {self.keepalive_connections}), "
                f"{len(self.failures)} failed {dict(kinds)}, "
                f"{len(self.keepalive_retries)} idempotent retries after an idle keep-alive close "
                f"{dict(Counter(k for k, _ in self.keepalive_retries))}, bodies {dict(self.bodies)}")


class Load:
    """Client threads hammering GET `path` on 127.0.0.1:port until stopped.

    `keepalive` threads reuse one connection as long as the server keeps it open
    (`Connection: close` from the server is honoured: that is the graceful way to end it);
    `fresh` threads open a new connection per request. Every failure is classified.

    A request sent on a *reused* keep-alive connection that the server closed while idle,
    before any byte of a response, is retried once on a new connection, as RFC 9112 §9.3.1
    lets clients do for idempotent requests (browsers, urllib3 and Go's net/http all do). Such
    retries are counted separately (`keepalive_retries`); a failure of the retry, and every
    other error or non-200 status, is a failed request.
    """

    def __init__(self, port: int, path: str = "/version", keepalive: int = 3, fresh: int = 3,
                 timeout: float = 15) -> None:
        self.port, self.path, self.timeout = port, path, timeout
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.ok = 0
        self.bodies: Counter = Counter()
        self.failures: list[tuple[str, str, str]] = []
        self.retries: list[tuple[str, str]] = []
        self.connections = 0
        self.ka_requests = 0
        self.ka_connections = 0
        self.last_body: str | None = None
        self._threads = [threading.Thread(target=self._keepalive, daemon=True, name=f"ka{i}") for i in range(keepalive)]
        self._threads += [threading.Thread(target=self._fresh, daemon=True, name=f"fresh{i}") for i in range(fresh)]
        self._started = 0.0
        self._stopped = 0.0

    # -- lifecycle
    def __enter__(self) -> "Load":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> None:
        self._started = time.monotonic()
        for t in self._threads:
            t.start()

    def stop(self) -> LoadReport:
        if not self._stopped:
            self._stop.set()
            for t in self._threads:
                t.join(self.timeout + 5)
            self._stopped = time.monotonic()
        return self.report()

    def report(self) -> LoadReport:
        with self._lock:
            end = self._stopped or time.monotonic()
            return LoadReport(self.ok, Counter(self.bodies), list(self.failures), list(self.retries),
                              self.connections, self.ka_requests, self.ka_connections, end - self._started)

    def wait_for_requests(self, count: int, timeout: float = 20) -> None:
        """Handshake: at least `count` more successful requests from now."""
        target = self.ok + count
        wait_until(lambda: self.ok >= target or self.failures, timeout, f"{count} requests under load")

    def wait_for_body(self, body: str, timeout: float = 20) -> None:
        wait_until(lambda: self.bodies.get(body), timeout, f"load to see body {body!r}")

    # -- recording
    def _record_ok(self, body: str) -> None:
        with self._lock:
            self.ok += 1
            self.bodies[body] += 1
            self.last_body = body

    def _record_failure(self, kind: str, classification: str, detail: str) -> None:
        with self._lock:
            self.failures.append((kind, classification, detail[:200]))

    def _connect(self, keepalive: bool = False) -> http.client.HTTPConnection:
        with self._lock:
            self.connections += 1
            self.ka_connections += keepalive
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)

    # -- workers
    def _keepalive(self) -> None:
        conn, used = self._connect(True), 0
        while not self._stop.is_set():
            try:
                conn.request("GET", self.path)
                resp = conn.getresponse()
                body = resp.read().decode("utf-8", "replace").strip()
            except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected) as exc:
                conn.close()
                if used == 0:  # a brand-new connection failed: no excuse
                    self._record_failure("keepalive", classify(exc), repr(exc))
                    conn, used = self._connect(True), 0
                    continue
                with self._lock:
                    self.retries.append((classify(exc), repr(exc)))
                conn, used = self._connect(True), 0
                self._once_fresh("keepalive-retry", close=False)
                continue
            except Exception as exc:  # noqa: BLE001 - classified
                conn.close()
                self._record_failure("keepalive", classify(exc), repr(exc))
                conn, used = self._connect(True), 0
                continue
            used += 1
            with self._lock:
                self.ka_requests += 1
            if resp.status != 200:
                self._record_failure("keepalive", f"status_{resp.status}", body)
            else:
                self._record_ok(body)
            if resp.will_close:  # the server said Connection: close: graceful
                conn.close()
                conn, used = self._connect(True), 0
        conn.close()

    def _once_fresh(self, kind: str, close: bool = True) -> None:
        conn = self._connect()
        try:
            conn.request("GET", self.path, headers={"Connection": "close"} if close else {})
            resp = conn.getresponse()
            body = resp.read().decode("utf-8", "replace").strip()
        except Exception as exc:  # noqa: BLE001 - classified
            self._record_failure(kind, classify(exc), repr(exc))
            return
        finally:
            conn.close()
        if resp.status != 200:
            self._record_failure(kind, f"status_{resp.status}", body)
        else:
            self._record_ok(body)

    def _fresh(self) -> None:
        while not self._stop.is_set():
            self._once_fresh("fresh")


# --------------------------------------------------------------------------- containers


@dataclass
class Service:
    container: Any
    logs: LogStream
    app_dir: Path | None
    port: int = 0
    health_port: int = 0
    removed: bool = field(default=False)

    @property
    def name(self) -> str:
        return self.container.name

    def get(self, path: str, timeout: float = 10) -> tuple[int, str]:
        return http_get(self.port, path, timeout=timeout)

    def health(self, timeout: float = 3) -> tuple[int, str]:
        return http_get(self.health_port, "/health", timeout=timeout)

    def attrs(self) -> dict:
        self.container.reload()
        return self.container.attrs

    def state(self) -> dict:
        return self.attrs()["State"]

    def exec(self, cmd: list[str], user: str | None = None) -> tuple[int, str]:
        result = self.container.exec_run(cmd, user=user or "", demux=False)
        return result.exit_code, (result.output or b"").decode("utf-8", "replace")

    def wait_ready(self, timeout: float = 20) -> dict:
        """First generation ready (log event) and the published port answering."""
        _, event = self.logs.wait_for(event_is("generation_ready"), timeout=timeout)
        try:
            wait_until(lambda: self.get("/", timeout=2)[0] == 200, timeout, "GET / on the published port")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last log lines:\n{self.logs.tail()}") from None
        return event

    def signal_reload(self, timeout: float = 60) -> dict:
        """docker kill -s HUP; returns the `reload_finished` / `reload_failed` event it caused."""
        mark = self.logs.mark()
        self.container.kill(signal="SIGHUP")
        return self.wait_reload(mark, timeout)

    def wait_reload(self, mark: int, timeout: float = 60) -> dict:
        _, event = self.logs.wait_for(event_is("reload_finished", "reload_failed"), timeout=timeout, start=mark)
        return event

    def health_status(self) -> str | None:
        return (self.state().get("Health") or {}).get("Status")

    def remove(self) -> None:
        if self.removed:
            return
        self.removed = True
        try:
            self.container.remove(force=True, v=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:  # already being removed
            if "in progress" not in str(exc):
                raise


class InFlight:
    """One GET /slow?s=SECONDS on its own connection, started and confirmed in a worker
    (the app logs `example_slow_begin`) before the constructor returns."""

    def __init__(self, service: "Service", seconds: float) -> None:
        self.seconds = seconds
        self.response: tuple[int, str] | None = None
        self.error: BaseException | None = None
        mark = service.logs.mark()
        self._thread = threading.Thread(target=self._run, args=(service.port,), daemon=True)
        self._thread.start()
        service.logs.wait_for(event_is("example_slow_begin", seconds=float(seconds)), timeout=10, start=mark)

    def _run(self, port: int) -> None:
        try:
            self.response = http_get(port, f"/slow?s={self.seconds:g}", timeout=self.seconds + 20)
        except BaseException as exc:  # noqa: BLE001 - reported by result()
            self.error = exc

    def result(self, timeout: float = 30) -> tuple[int, str]:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "in-flight request still running"
        assert self.error is None, f"in-flight request failed: {self.error!r}"
        assert self.response is not None
        return self.response


def _host_port(attrs: dict, container_port: str) -> int:
    bindings = (attrs["NetworkSettings"].get("Ports") or {}).get(container_port) or []
    for binding in bindings:
        if binding.get("HostIp") in ("127.0.0.1", "") and binding.get("HostPort"):
            return int(binding["HostPort"])
    return 0


def start_service(client, image: str, *, app_dir: Path | None, name_hint: str = "t",
                  env: dict[str, str] | None = None, healthcheck: dict | None = None,
                  entrypoint: list[str] | None = None, command: list[str] | str | None = None,
                  wait: bool = True) -> Service:
    """docker run -d with the code bind-mounted read-only on /app and 8000/8001 published on
    127.0.0.1 (random host ports)."""
    slug = re.sub(r"[^a-zA-Z0-9_.-]+", "-", name_hint)[-40:].strip("-.") or "t"
    name = f"supervise-test-{slug}-{uuid.uuid4().hex[:6]}"
    kwargs: dict[str, Any] = dict(
        name=name, detach=True, labels={LABEL: "1"}, environment=env or {},
        ports={"8000/tcp": ("127.0.0.1", None), "8001/tcp": ("127.0.0.1", None)},
    )
    if app_dir is not None:
        kwargs["volumes"] = {str(app_dir): {"bind": "/app", "mode": "ro"}}
    if healthcheck is not None:
        kwargs["healthcheck"] = healthcheck
    if entrypoint is not None:
        kwargs["entrypoint"] = entrypoint
    if command is not None:
        kwargs["command"] = command
    container = client.containers.run(image, **kwargs)
    service = Service(container=container, logs=LogStream(container), app_dir=app_dir)
    try:
        attrs = service.attrs()
        service.port = _host_port(attrs, "8000/tcp")
        service.health_port = _host_port(attrs, "8001/tcp")
        if wait:
            service.wait_ready()
    except BaseException:
        service.remove()
        raise
    return service


def fast_healthcheck(interval: float = 0.5, retries: int = 2) -> dict:
    """The image's HEALTHCHECK command with a short interval, for `docker run --health-*`."""
    ns = 1_000_000_000
    return {"test": ["CMD", VENV_PYTHON, HEALTHCHECK_SCRIPT], "interval": int(interval * ns),
            "timeout": 3 * ns, "retries": retries, "start_period": 0}


# Runs inside the container (python is there, procps may not be): watch processes via /proc.
PROC_PROBE = r"""
import json, os, sys, time
pids = [int(p) for p in sys.argv[1].split(",") if p]
want = sys.argv[2]            # "gone": every pid reaped; "zombie": every pid a zombie
deadline = time.monotonic() + float(sys.argv[3])

def state(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    rest = data[data.rindex(")") + 2:].split()
    return {"state": rest[0], "ppid": int(rest[1])}

def zombies():
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            s = state(int(entry))
            if s and s["state"] == "Z":
                out[entry] = s
    return out

while True:
    states = {pid: state(pid) for pid in pids}
    done = all(s is None for s in states.values()) if want == "gone" else \
        all(s is not None and s["state"] == "Z" for s in states.values())
    if done or time.monotonic() >= deadline:
        break
    time.sleep(0.05)
print(json.dumps({"done": done, "states": states, "zombies": zombies()}))
"""


# Runs inside the container through `docker exec`: orphans whose new parent is the container's
# PID 1 itself (an exec'd process is outside supervise's process tree, so no subreaper adopts them).
EXEC_ORPHANS = r"""
import os, sys, time
n, linger = int(sys.argv[1]), float(sys.argv[2])
pids = []
for _ in range(n):
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(r)
        grandchild = os.fork()
        if grandchild == 0:
            time.sleep(linger)
            os._exit(0)
        os.write(w, str(grandchild).encode())
        os._exit(0)
    os.close(w)
    pids.append(int(os.read(r, 64)))
    os.waitpid(child, 0)
print(",".join(map(str, pids)))
"""


def exec_orphans(service: "Service", n: int = 3, linger: float = 0.3) -> list[int]:
    code, out = service.exec([VENV_PYTHON, "-c", EXEC_ORPHANS, str(n), str(linger)])
    assert code == 0, out
    return [int(p) for p in out.strip().splitlines()[-1].split(",")]


def caught_signals(service: "Service", pid: int = 1) -> set[str]:
    """Signals `pid` has a handler for (SigCgt in /proc/PID/status). A signal PID 1 does not
    catch is dropped by the kernel: it can never arrive."""
    import signal as _signal

    code, out = service.exec(["cat", f"/proc/{pid}/status"])
    assert code == 0, out
    mask = int(next(line.split()[1] for line in out.splitlines() if line.startswith("SigCgt:")), 16)
    return {s.name for s in _signal.Signals if s.value < 64 and mask & (1 << (s.value - 1))}


def probe_processes(service: Service, pids: Iterable[int], want: str, timeout: float) -> dict:
    code, out = service.exec([VENV_PYTHON, "-c", PROC_PROBE, ",".join(map(str, pids)), want, str(timeout)])
    assert code == 0, f"probe failed ({code}): {out}"
    return json.loads(out.strip().splitlines()[-1])
