#!/usr/bin/env python3
"""Benchmark supervise against gunicorn (sync, gthread), uWSGI and Granian (and, for ASGI, uvicorn, Granian
and gunicorn's ASGI worker); write docs/benchmarks.md.

    python bench/run.py [--quick] [--servers supervise,gunicorn-gthread,...] [--duration S]

Every server serves the same app (bench/apps/hello.py, copied into a scratch
directory whose VERSION line is rewritten before each reload) with the same
number of workers, one server after another.  For each server:

* steady load, with and without keep-alive: bench/load.py (a separate
  multi-process client that classifies every failure) and, when installed, wrk;
* load with a reload every 2 s (SIGHUP, for Granian too; uWSGI: `r` and `c`
  written to its master FIFO; supervise also: an edit of the app file picked up
  by its watcher), with and without keep-alive, recording every failed request
  and the time from the trigger to the first response carrying the new VERSION;
* the same trigger-to-new-code time with a single light client (idle server).

supervise runs from the project venv (.venv/bin); the peer servers run from
their own venv, .venv-bench/bin (bench/setup.sh installs bench/requirements.txt
there).  All traffic goes to 127.0.0.1.  Every load run is bounded in time and
count.  Raw results and server logs go to bench/results/<timestamp>/ (git-ignored).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
VENV_BIN = Path(os.environ.get("BENCH_VENV_BIN", ROOT / ".venv" / "bin"))  # supervise (the project venv)
PEER_BIN = Path(os.environ.get("BENCH_PEER_BIN", ROOT / ".venv-bench" / "bin"))  # the peers (bench/setup.sh)
PYTHON = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable
HOST = "127.0.0.1"
APP_MODULE = "hello"
RELOAD_INTERVAL = 2.0
ALL_SERVERS = ["supervise", "supervise-nometrics", "supervise-watch", "gunicorn-sync", "gunicorn-gthread", "uwsgi",
               "granian", "supervise-asgi", "uvicorn", "granian-asgi", "gunicorn-asgi"]
PEERS = ["gunicorn-sync", "gunicorn-gthread", "uwsgi", "granian"]  # the servers supervise is compared with
ASGI_PEERS = ["uvicorn", "granian-asgi", "gunicorn-asgi"]  # the same for supervise's ASGI worker

RELOAD_LABELS = {
    "hup": "SIGHUP",
    "watch": "file edit (watcher)",
    "fifo-r": "FIFO `r` (graceful)",
    "fifo-c": "FIFO `c` (chain)",
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- servers


@dataclasses.dataclass
class Server:
    name: str
    label: str
    argv: Callable[["Ctx", int], list[str]]
    reloads: list[str]
    steady: bool = True
    fifo: bool = False
    available: Callable[[], str | None] = lambda: None  # None, or why not
    template: str = "hello.py"  # the app, in bench/apps (hello_asgi.py for the ASGI servers)
    asgi: bool = False


@dataclasses.dataclass
class Ctx:
    appdir: Path
    rundir: Path
    workers: int
    gthread_threads: int
    backlog: int = 2048
    fifo_name: str = "uwsgi.fifo"

    @property
    def fifo(self) -> Path:
        return self.rundir / self.fifo_name


def _exe(name: str) -> str:
    """supervise from the project venv, every other server from .venv-bench (never from $PATH)."""
    return str((VENV_BIN if name == "supervise" else PEER_BIN) / name)


def _need(name: str) -> Callable[[], str | None]:
    def check() -> str | None:
        exe = _exe(name)
        return None if os.access(exe, os.X_OK) else f"`{name}` not installed (run bench/setup.sh)"
    return check


_help_cache: dict[str, str] = {}


def supervise_help() -> str:
    if "h" not in _help_cache:
        try:
            _help_cache["h"] = subprocess.run([_exe("supervise"), "--help"], capture_output=True, text=True,
                                              timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            _help_cache["h"] = ""
    return _help_cache["h"]


def supervise_available() -> str | None:
    why = _need("supervise")()
    if why:
        return why
    if "--workers" not in supervise_help():
        return "`supervise --help` does not work yet"
    return None


def supervise_watch_available() -> str | None:
    why = supervise_available()
    if why:
        return why
    if "--no-watch" not in supervise_help():
        return "supervise has no --watch/--no-watch yet"
    return None


def watch_debounce_ms() -> float | None:
    m = re.search(r"SUPERVISE_WATCH_DEBOUNCE;\s*default:\s*([^\]]+)\]", supervise_help())
    if not m:
        return None
    text = re.sub(r"\s+", "", m.group(1))
    m = re.fullmatch(r"([\d.]+)(ms|s)?", text)
    return float(m.group(1)) * (1 if m.group(2) == "ms" else 1000) if m else None


def supervise_argv(ctx: Ctx, port: int, watch: bool, metrics: bool = True) -> list[str]:
    argv = [_exe("supervise"), f"{APP_MODULE}:application", "--bind", f"{HOST}:{port}",
            "--workers", str(ctx.workers), "--threads", "1", "--chdir", str(ctx.appdir),
            "--backlog", str(ctx.backlog), "--log-format", "json"]
    if not watch:
        argv.append("--no-watch")
    if not metrics:
        argv.append("--no-metrics")
    return argv


def supervise_asgi_argv(ctx: Ctx, port: int) -> list[str]:
    return [_exe("supervise"), f"{APP_MODULE}:application", "--interface", "asgi", "--bind", f"{HOST}:{port}",
            "--workers", str(ctx.workers), "--chdir", str(ctx.appdir), "--backlog", str(ctx.backlog),
            "--log-format", "json", "--no-watch"]


def uvicorn_argv(ctx: Ctx, port: int) -> list[str]:
    # SIGHUP replaces the workers (uvicorn >= 0.51: one at a time, after a readiness ping).
    return [_exe("uvicorn"), f"{APP_MODULE}:application", "--host", HOST, "--port", str(port),
            "--workers", str(ctx.workers), "--http", "httptools", "--loop", "uvloop", "--app-dir", str(ctx.appdir),
            "--backlog", str(ctx.backlog), "--timeout-graceful-shutdown", "8", "--no-access-log",
            "--log-level", "warning"]


def granian_asgi_argv(ctx: Ctx, port: int) -> list[str]:
    return [_exe("granian"), "--interface", "asgi", "--host", HOST, "--port", str(port),
            "--workers", str(ctx.workers), "--runtime-threads", "1", "--loop", "uvloop",
            "--backlog", str(ctx.backlog), "--working-dir", str(ctx.appdir), "--workers-kill-timeout", "8",
            "--respawn-interval", "3.5", f"{APP_MODULE}:application"]


def gunicorn_asgi_available() -> str | None:
    why = _need("gunicorn")()
    if why:
        return why
    try:
        text = subprocess.run([_exe("gunicorn"), "--help"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"`gunicorn --help` failed ({exc})"
    return None if "--asgi-loop" in text else "the installed gunicorn has no ASGI worker"


def gunicorn_argv(ctx: Ctx, port: int, klass: str) -> list[str]:
    argv = [_exe("gunicorn"), "--chdir", str(ctx.appdir), "--bind", f"{HOST}:{port}",
            "--workers", str(ctx.workers), "--worker-class", klass, "--backlog", str(ctx.backlog),
            "--graceful-timeout", "8"]
    if klass == "gthread":
        argv += ["--threads", str(ctx.gthread_threads)]
    if klass == "asgi":
        argv += ["--asgi-loop", "uvloop"]
    return argv + [f"{APP_MODULE}:application"]


def granian_argv(ctx: Ctx, port: int) -> list[str]:
    # --blocking-threads: the per-worker pool that runs the WSGI callable, set like gunicorn gthread's
    # --threads (Granian's WSGI default is backpressure / 2 = 256 threads per worker here); the Rust I/O
    # runtime keeps its default of 1 thread per worker.  --workers-kill-timeout 8 bounds the drain of an old
    # worker the way --graceful-timeout 8 / --*-mercy 8 do for the others (Granian's default: wait forever).
    # SIGHUP respawns the workers one at a time: start the new one, sleep --respawn-interval, stop the old one;
    # the interval is Granian's default, spelled out so that the report's command line shows it.
    return [_exe("granian"), "--interface", "wsgi", "--host", HOST, "--port", str(port),
            "--workers", str(ctx.workers), "--blocking-threads", str(ctx.gthread_threads),
            "--runtime-threads", "1", "--backlog", str(ctx.backlog), "--working-dir", str(ctx.appdir),
            "--workers-kill-timeout", "8", "--respawn-interval", "3.5", "--no-ws", f"{APP_MODULE}:application"]


def uwsgi_argv(ctx: Ctx, port: int) -> list[str]:
    # --lazy-apps: workers import the app after fork, so a chain reload (`c`) runs new code;
    # it does not change what `r` does (the master still re-execs itself).
    return [_exe("uwsgi"), "--master", "--http-socket", f"{HOST}:{port}", "--processes", str(ctx.workers),
            "--chdir", str(ctx.appdir), "--module", f"{APP_MODULE}:application", "--lazy-apps",
            "--master-fifo", str(ctx.fifo), "--die-on-term", "--disable-logging", "--need-app",
            "--listen", str(ctx.backlog), "--worker-reload-mercy", "8", "--reload-mercy", "8"]


SERVERS: dict[str, Server] = {s.name: s for s in [
    Server("supervise", "supervise (threads 1)", lambda c, p: supervise_argv(c, p, False), ["hup"],
           available=supervise_available),
    Server("supervise-nometrics", "supervise (threads 1, --no-metrics)",
           lambda c, p: supervise_argv(c, p, False, metrics=False), [], available=supervise_available),
    Server("supervise-watch", "supervise (threads 1, watching --chdir)", lambda c, p: supervise_argv(c, p, True),
           ["watch"], steady=False, available=supervise_watch_available),
    Server("gunicorn-sync", "gunicorn sync", lambda c, p: gunicorn_argv(c, p, "sync"), ["hup"],
           available=_need("gunicorn")),
    Server("gunicorn-gthread", "gunicorn gthread", lambda c, p: gunicorn_argv(c, p, "gthread"), ["hup"],
           available=_need("gunicorn")),
    Server("uwsgi", "uWSGI (--http-socket)", uwsgi_argv, ["fifo-r", "fifo-c"], fifo=True,
           available=_need("uwsgi")),
    Server("granian", "Granian (WSGI)", granian_argv, ["hup"], available=_need("granian")),
    Server("supervise-asgi", "supervise (ASGI)", supervise_asgi_argv, ["hup"], available=supervise_available,
           template="hello_asgi.py", asgi=True),
    Server("uvicorn", "uvicorn (httptools, uvloop)", uvicorn_argv, ["hup"], available=_need("uvicorn"),
           template="hello_asgi.py", asgi=True),
    Server("granian-asgi", "Granian (ASGI)", granian_asgi_argv, ["hup"], available=_need("granian"),
           template="hello_asgi.py", asgi=True),
    Server("gunicorn-asgi", "gunicorn asgi worker", lambda c, p: gunicorn_argv(c, p, "asgi"), ["hup"],
           available=gunicorn_asgi_available, template="hello_asgi.py", asgi=True),
]}


# --------------------------------------------------------------------------- the app


class App:
    """The scratch copy of bench/apps/hello.py and its VERSION."""

    def __init__(self, appdir: Path, template: str = "hello.py") -> None:
        self.appdir = appdir
        self.path = appdir / f"{APP_MODULE}.py"
        self.template = (BENCH / "apps" / template).read_text()
        if not re.search(r'^VERSION = "[^"]*"$', self.template, re.M):
            raise SystemExit(f"bench/apps/{template} lost its VERSION line")
        self.counter = 0
        self.version = ""
        appdir.mkdir(parents=True, exist_ok=True)
        self.bump()

    def bump(self) -> str:
        """Write the next VERSION in place (one write of the whole file) and return it."""
        self.counter += 1
        self.version = f"v{self.counter:04d}"
        text = re.sub(r'^VERSION = "[^"]*"$', f'VERSION = "{self.version}"', self.template, count=1, flags=re.M)
        shutil.rmtree(self.appdir / "__pycache__", ignore_errors=True)  # never a stale .pyc
        with open(self.path, "w") as fh:
            fh.write(text)
        return self.version


# --------------------------------------------------------------------------- process handling


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def http_get(port: int, timeout: float = 1.0) -> tuple[int, str]:
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.sendall(f"GET / HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            m = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
            if sep and m and len(body) >= int(m.group(1)):
                break
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head[9:12]) if head.startswith(b"HTTP/1.") else 0
    return status, body.decode("latin-1")


def wait_serving(port: int, version: str, proc: subprocess.Popen, deadline: float) -> float:
    """Poll until a response carries `version`; return seconds waited, or raise."""
    start = time.monotonic()
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before serving")
        try:
            status, body = http_get(port, timeout=1.0)
            if status == 200 and body.strip() == f"hello from {version}":
                return time.monotonic() - start
            last = f"{status} {body.strip()[:60]!r}"
        except OSError as exc:
            last = type(exc).__name__
        time.sleep(0.02)
    raise RuntimeError(f"not serving {version} in time (last: {last})")


class Running:
    def __init__(self, server: Server, ctx: Ctx, port: int, instance: int = 0) -> None:
        self.server = server
        self.ctx = ctx
        self.port = port
        self.logpath = ctx.rundir / (f"{server.name}.log" if not instance else f"{server.name}.{instance}.log")
        self.logfh = open(self.logpath, "wb")
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1")
        if server.fifo and ctx.fifo.exists():
            ctx.fifo.unlink()
        self.argv = server.argv(ctx, port)
        self.proc = subprocess.Popen(self.argv, cwd=ctx.appdir, stdout=self.logfh, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, start_new_session=True)

    def trigger(self, method: str, app: App) -> float:
        """Change the code and trigger a reload; return the trigger time (monotonic)."""
        app.bump()
        if method == "watch":
            return time.monotonic()  # the edit itself is the trigger
        if method == "hup":
            self.proc.send_signal(signal.SIGHUP)
            return time.monotonic()
        if method in ("fifo-r", "fifo-c"):
            fd = os.open(self.ctx.fifo, os.O_WRONLY | os.O_NONBLOCK)
            try:
                os.write(fd, method[-1].encode())
            finally:
                os.close(fd)
            return time.monotonic()
        raise ValueError(method)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                log(f"{self.server.name} did not stop in 15 s: SIGKILL to its process group")
        try:  # leftovers of the session we created (orphaned workers)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self.logfh.close()
        return self.proc.returncode


# --------------------------------------------------------------------------- load runs


@dataclasses.dataclass
class Opts:
    steady_duration: float
    reload_duration: float
    wrk_duration: float
    repeats: int
    reload_repeats: int
    idle_reloads: int
    procs: int
    conns: int
    timeout: float
    use_wrk: bool


def run_load(port: int, duration: float, keepalive: bool, opts: Opts, out: Path, *, procs: int | None = None,
             conns: int | None = None, pause: float = 0.0,
             during: Callable[[float], list[dict]] | None = None) -> tuple[dict, list[dict]]:
    """Run bench/load.py in its own process; `during(start_at)` runs here meanwhile (the reload driver)."""
    start_at = time.monotonic() + 0.6
    argv = [PYTHON, str(BENCH / "load.py"), "--host", HOST, "--port", str(port), "--duration", str(duration),
            "--procs", str(procs or opts.procs), "--conns", str(conns or opts.conns),
            "--timeout", str(opts.timeout), "--start-at", repr(start_at), "--out", str(out)]
    if not keepalive:
        argv.append("--close")
    if pause:
        argv += ["--pause", str(pause)]
    client = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    events: list[dict] = []
    try:
        if during is not None:
            events = during(start_at)
        _, err = client.communicate(timeout=duration + opts.timeout + 60)
    except BaseException:
        client.kill()
        client.wait()
        raise
    if client.returncode != 0:
        raise RuntimeError(f"load.py failed ({client.returncode}): {err.strip()[-500:]}")
    return json.loads(out.read_text()), events


def reload_driver(run: Running, app: App, method: str, count: int) -> Callable[[float], list[dict]]:
    def drive(start_at: float) -> list[dict]:
        events = []
        for k in range(count):
            when = start_at + RELOAD_INTERVAL * (k + 1)
            delay = when - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            if not run.alive():
                events.append({"version": None, "error": "server exited"})
                break
            old = app.version
            t = run.trigger(method, app)
            events.append({"version": app.version, "old": old, "t": t})
        return events
    return drive


def reload_timings(load: dict, events: list[dict]) -> list[dict]:
    out = []
    versions = load["versions"]
    for i, ev in enumerate(events):
        if not ev.get("version"):
            continue
        seen = versions.get(ev["version"])
        old = versions.get(ev["old"])
        rec = {"version": ev["version"], "new_code_ms": None, "old_last_ms": None}
        if seen:
            rec["new_code_ms"] = (seen["first_seen"] - ev["t"]) * 1000
        if old:
            rec["old_last_ms"] = (old["last_seen"] - ev["t"]) * 1000
        out.append(rec)
    return out


def parse_wrk(text: str) -> dict:
    def num(pattern: str, default: float = 0.0) -> float:
        m = re.search(pattern, text)
        return float(m.group(1)) if m else default

    def ms(value: str, unit: str) -> float:
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]

    lat = {}
    for q in ("50", "90", "99"):
        m = re.search(rf"^\s+{q}%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M)
        lat[f"p{q}"] = ms(*m.groups()) if m else float("nan")
    m = re.search(r"Latency\s+\S+\s+\S+\s+([\d.]+)(us|ms|s|m)", text)
    lat["max"] = ms(*m.groups()) if m else float("nan")
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    errors = {}
    if sock:
        for name, value in zip(("connect", "read", "write", "timeout"), sock.groups()):
            if int(value):
                errors[name] = int(value)
    non2xx = int(num(r"Non-2xx or 3xx responses: (\d+)"))
    if non2xx:
        errors["non-2xx"] = non2xx
    return {"rps": num(r"Requests/sec:\s+([\d.]+)"), "latency_ms": lat, "errors": errors,
            "requests": int(num(r"(\d+) requests in"))}


def run_wrk(port: int, duration: float, keepalive: bool, opts: Opts) -> dict:
    argv = ["wrk", "-t", str(opts.procs), "-c", str(opts.procs * opts.conns), "-d", f"{duration:g}s",
            "--timeout", f"{opts.timeout:g}s", "--latency"]
    if not keepalive:
        argv += ["-H", "Connection: close"]
    argv.append(f"http://{HOST}:{port}/")
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed: {proc.stderr.strip()[-300:]}")
    res = parse_wrk(proc.stdout)
    res["raw"] = proc.stdout
    return res


# --------------------------------------------------------------------------- one server


class Bench:
    """One server under test: its own app copy, port, process and results.

    The machine is shared: if the server dies under us (a crash, or a signal from outside the harness), the
    death is recorded as an incident with the end of its log, the server is started again and the scenario
    is retried once.  At most MAX_RESTARTS restarts per server.
    """

    MAX_RESTARTS = 2

    def __init__(self, server: Server, ctx: Ctx, opts: Opts, results: list[dict]) -> None:
        self.server = server
        self.ctx = dataclasses.replace(ctx, appdir=ctx.rundir / f"app-{server.name}",
                                       fifo_name=f"{server.name}.fifo")
        self.app = App(self.ctx.appdir, server.template)
        self.opts = opts
        self.results = results
        self.info: dict[str, Any] = {"server": server.name, "label": server.label, "errors": [], "incidents": [],
                                     "logs": [], "log_findings": []}
        self.run: Running | None = None
        self.instances = 0
        self.failed = False

    def record(self, kind: str, **kw: Any) -> dict:
        rec = {"server": self.server.name, "kind": kind, **kw}
        self.results.append(rec)
        return rec

    def fail(self, exc: BaseException) -> None:
        self.failed = True
        self.info["errors"].append(f"{type(exc).__name__}: {exc}")
        log(f"{self.server.name}: FAILED: {type(exc).__name__}: {exc}")

    def start(self) -> None:
        try:
            self._start()
        except Exception as exc:
            self.fail(exc)

    def _start(self) -> None:
        port = free_port()
        self.run = run = Running(self.server, self.ctx, port, self.instances)
        self.instances += 1
        self.info["argv"] = " ".join(run.argv)
        log(f"{self.server.name}: starting on {HOST}:{port} (pid {run.proc.pid})")
        t0 = time.monotonic()
        wait_serving(port, self.app.version, run.proc, time.monotonic() + 60)
        self.info.setdefault("startup_s", time.monotonic() - t0)
        log(f"{self.server.name}: serving after {time.monotonic() - t0:.2f} s")
        run_load(port, 1.0, True, self.opts, self.ctx.rundir / "warmup.json")  # not recorded

    def _retire(self) -> None:
        run = self.run
        if run is None:
            return
        self.info["exit_code"] = run.stop()
        self.info["logs"].append(str(run.logpath.relative_to(ROOT)) if run.logpath.is_relative_to(ROOT)
                                 else str(run.logpath))
        self.info["log_findings"].append(scan_log(run.logpath, self.server.name))
        if self.server.fifo and self.ctx.fifo.exists():
            self.ctx.fifo.unlink()

    def attempt(self, label: str, scenario: Callable[[], None]) -> None:
        """Run one scenario; if the server died meanwhile, note it, restart the server and retry once."""
        if self.failed:
            return
        for tries in range(2):
            try:
                if not self.run.alive():
                    self._restart(f"found dead before {label}")
                scenario()
                return
            except Exception as exc:
                if self.run is not None and not self.run.alive() and tries == 0:
                    try:
                        self._restart(f"died during {label} ({type(exc).__name__}: {exc})")
                    except Exception as exc2:
                        self.fail(exc2)
                        return
                    continue
                self.fail(exc)
                return

    def _restart(self, why: str) -> None:
        run = self.run
        code = run.proc.returncode if run else None
        tail = scan_log(run.logpath, self.server.name, tail=6) if run else {}
        incident = {"why": why, "exit_code": code, "log": str(run.logpath.name) if run else None,
                    "log_tail": tail.get("tail", []), "signals": tail.get("signals", [])}
        self.info["incidents"].append(incident)
        log(f"{self.server.name}: server {why}; exit code {code}; restarting")
        if len(self.info["incidents"]) > self.MAX_RESTARTS:
            raise RuntimeError(f"server died {len(self.info['incidents'])} times; giving up")
        self._retire()
        self._start()

    def steady(self, keepalive: bool, rep: int) -> None:
        if self.server.steady:
            self.attempt(f"steady {'keep-alive' if keepalive else 'close'} #{rep}",
                         lambda: self._steady(keepalive, rep))

    def _steady(self, keepalive: bool, rep: int) -> None:
        run, opts, name = self.run, self.opts, self.server.name
        mode = "keep-alive" if keepalive else "close"
        out = self.ctx.rundir / f"{name}-steady-{'ka' if keepalive else 'close'}-{rep}.json"
        load, _ = run_load(run.port, opts.steady_duration, keepalive, opts, out)
        if not run.alive():
            raise RuntimeError(f"server exited ({run.proc.returncode}) during steady load")
        log(f"{name}: steady {mode} #{rep}: {load['rps']:.0f} req/s, "
            f"p99 {load['latency_ms']['p99']:.2f} ms, failed {load['failed']}")
        wrk = None
        if opts.use_wrk:
            wrk = run_wrk(run.port, opts.wrk_duration, keepalive, opts)
            (self.ctx.rundir / out.name.replace(".json", ".wrk.txt")).write_text(wrk.pop("raw"))
            if not run.alive():
                raise RuntimeError(f"server exited ({run.proc.returncode}) during wrk")
            log(f"{name}: wrk {mode} #{rep}: {wrk['rps']:.0f} req/s, errors {wrk['errors'] or 0}")
        self.record("steady", keepalive=keepalive, rep=rep, load=_slim(load))
        if wrk is not None:
            self.record("wrk", keepalive=keepalive, rep=rep, load=wrk)

    def reloads(self) -> None:
        for method in self.server.reloads:
            self.attempt(f"idle {method} reloads", lambda: self._idle(method))
            for keepalive in (True, False):
                for rep in range(self.opts.reload_repeats):
                    self.attempt(f"{method} reloads {'keep-alive' if keepalive else 'close'} #{rep}",
                                 lambda: self._reload(method, keepalive, rep))

    def _idle(self, method: str) -> None:
        # one client at ~400 req/s: trigger-to-new-code on an idle server
        run, opts, app, name = self.run, self.opts, self.app, self.server.name
        count = opts.idle_reloads
        out = self.ctx.rundir / f"{name}-idle-{method}.json"
        load, events = run_load(run.port, RELOAD_INTERVAL * (count + 1), True, opts, out, procs=1, conns=1,
                                pause=0.0025, during=reload_driver(run, app, method, count))
        settle(run, app)
        timings = reload_timings(load, events)
        self.record("idle-reload", method=method, keepalive=True, load=_slim(load), reloads=timings,
                    error_samples=_relative_samples(load, events))
        log(f"{name}: idle {method}: new code after {_ms_list(timings)} ms, failed {load['failed']}")

    def _reload(self, method: str, keepalive: bool, rep: int) -> None:
        run, opts, app, name = self.run, self.opts, self.app, self.server.name
        count = max(1, int(opts.reload_duration / RELOAD_INTERVAL) - 1)
        out = self.ctx.rundir / f"{name}-reload-{method}-{'ka' if keepalive else 'close'}-{rep}.json"
        load, events = run_load(run.port, opts.reload_duration, keepalive, opts, out,
                                during=reload_driver(run, app, method, count))
        settle(run, app)
        timings = reload_timings(load, events)
        self.record("reload", method=method, keepalive=keepalive, rep=rep, load=_slim(load),
                    reloads=timings, error_samples=_relative_samples(load, events))
        log(f"{name}: reload {method} {'keep-alive' if keepalive else 'close'} #{rep}: "
            f"{load['rps']:.0f} req/s, failed {load['failed']} {load['errors'] or ''}, "
            f"p99 {load['latency_ms']['p99']:.2f} ms, new code after {_ms_list(timings)} ms")

    def stop(self) -> dict:
        if self.run is not None:
            self.info["alive_at_end"] = self.run.alive()
            self._retire()
        return self.info


def _ms_list(timings: list[dict]) -> list:
    return [round(t["new_code_ms"]) if t["new_code_ms"] is not None else None for t in timings]


def settle(run: Running, app: App) -> None:
    """After a reload run: wait until the server answers with the last version, so runs don't overlap."""
    if not run.alive():
        raise RuntimeError(f"server exited ({run.proc.returncode}) during reload load")
    wait_serving(run.port, app.version, run.proc, time.monotonic() + 30)
    time.sleep(0.3)


def _slim(load: dict) -> dict:
    return {k: v for k, v in load.items() if k not in ("error_samples",)}


def _relative_samples(load: dict, events: list[dict]) -> list[str]:
    """First failures, each as `+T.TTTs after trigger of VERSION: kind`."""
    triggers = [(e["t"], e["version"]) for e in events if e.get("version")]
    out = []
    for t, kind in load.get("error_samples", [])[:50]:
        before = [(tt, v) for tt, v in triggers if tt <= t]
        if before:
            tt, v = before[-1]
            out.append(f"+{t - tt:.3f}s after trigger {v}: {kind}")
        else:
            out.append(f"{t - load['start_at']:.3f}s into run (before any trigger): {kind}")
    return out


def scan_log(path: Path, name: str, tail: int = 0) -> dict:
    """Count events / warnings in a server log; keep the first warning and error lines."""
    findings: dict[str, Any] = {"log": path.name, "lines": 0, "events": {}, "problems": [], "signals": []}
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return findings
    lines = text.splitlines()
    if tail:
        findings["tail"] = [line[:400] for line in lines[-tail:]]
    for line in lines:
        if ('"shutdown_requested"' in line or "SIGINT/SIGTERM received" in line or "Handling signal" in line
                or "Shutting down granian" in line):
            findings["signals"].append(line[:400])
    for line in lines:
        findings["lines"] += 1
        problem = False
        if line.startswith("{"):
            try:
                rec = json.loads(line)
            except ValueError:
                rec = None
            if isinstance(rec, dict):
                ev = str(rec.get("event", "?"))
                findings["events"][ev] = findings["events"].get(ev, 0) + 1
                if ev == "reload_finished":
                    findings.setdefault("reloads", []).append(
                        {k: rec.get(k) for k in ("outcome", "duration", "ready_after", "drained_requests")})
                problem = str(rec.get("level", "")).lower() in ("warning", "error", "critical", "exception")
            else:
                problem = True
        else:
            problem = bool(re.search(r"(?i)\b(error|exception|traceback|critical|segmentation|no mercy)\b", line))
            if name.startswith("gunicorn") and "[INFO]" in line:
                problem = False
            if name == "granian":  # "[LEVEL] message"; a worker that had to be killed logs a WARNING
                problem = (problem and not line.startswith("[INFO]")) or line.startswith(
                    ("[WARNING]", "[ERROR]", "[CRITICAL]"))
        if problem and len(findings["problems"]) < 40:
            findings["problems"].append(line[:400])
    return findings


# --------------------------------------------------------------------------- environment


def sh(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        return (proc.stdout or proc.stderr).strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def environment() -> dict:
    cpu = "unknown"
    mem = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    except OSError:
        pass
    versions = {
        "python": sh([PYTHON, "-c", "import platform; print(platform.python_version())"]),
        "supervise": sh([_exe("supervise"), "--version"]).replace("supervise", "").strip() or "not installed",
        "gunicorn": sh([_exe("gunicorn"), "--version"]).replace("gunicorn", "").replace("(version", "")
        .replace(")", "").strip() or "not installed",
        "uwsgi": sh([_exe("uwsgi"), "--version"]) or "not installed",
        "granian": sh([_exe("granian"), "--version"]).replace("granian", "").strip() or "not installed",
        "peer_python": sh([str(PEER_BIN / "python"), "-c", "import platform; print(platform.python_version())"]),
        "wrk": (sh(["wrk", "--version"]).split(" [")[0].replace("wrk", "").strip() if shutil.which("wrk")
                else "not installed"),
    }
    return {
        "loadavg_start": os.getloadavg(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "ram": mem,
        "kernel": platform.release(),
        "versions": versions,
    }


def cpu_busy(interval: float = 1.0) -> float:
    """Fraction of all CPUs busy over `interval` seconds, from /proc/stat."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields[:8]), idle
    t1, i1 = sample()
    time.sleep(interval)
    t2, i2 = sample()
    return 1.0 - (i2 - i1) / max(1, t2 - t1)


def wait_for_quiet(limit: float, threshold: float = 0.25) -> float:
    """Wait (at most `limit` s) until other work leaves the CPUs mostly idle; return the last busy fraction."""
    deadline = time.monotonic() + limit
    busy = cpu_busy()
    while busy > threshold and time.monotonic() < deadline:
        log(f"machine busy ({busy:.0%} CPU): waiting for it to settle")
        time.sleep(4)
        busy = cpu_busy()
    return busy


def import_time(appdir: Path, n: int = 7) -> dict:
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); t = time.perf_counter(); import hello; "
            "print(time.perf_counter() - t)")
    in_proc, cold = [], []
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    for _ in range(n):
        t = time.perf_counter()
        out = subprocess.run([PYTHON, "-c", code, str(appdir)], capture_output=True, text=True, env=env,
                             timeout=60)
        cold.append(time.perf_counter() - t)
        in_proc.append(float(out.stdout.strip()))
    return {"import_ms": statistics.median(in_proc) * 1000, "interpreter_and_import_ms": statistics.median(cold) * 1000}


# --------------------------------------------------------------------------- report


def med(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and v == v]
    return statistics.median(values) if values else None


def fmt(v: float | None, digits: int = 2) -> str:
    if v is None:
        return "–"
    if digits == 0:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def fmt_errors(errors: dict[str, int]) -> str:
    if not errors:
        return "–"
    return ", ".join(f"{k} {v}" for k, v in sorted(errors.items(), key=lambda kv: -kv[1]))


def summarize(results: list[dict]) -> dict:
    steady: dict[tuple, dict] = {}
    for r in results:
        if r["kind"] not in ("steady", "wrk"):
            continue
        key = (r["server"], r["kind"], r["keepalive"])
        steady.setdefault(key, []).append(r["load"])
    s_out = {}
    for key, loads in steady.items():
        errs: dict[str, int] = {}
        for ld in loads:
            for k, v in ld["errors"].items():
                errs[k] = errs.get(k, 0) + v
        s_out[key] = {
            "rps": med([ld["rps"] for ld in loads]),
            "p50": med([ld["latency_ms"]["p50"] for ld in loads]),
            "p99": med([ld["latency_ms"]["p99"] for ld in loads]),
            "max": max((ld["latency_ms"]["max"] for ld in loads), default=None),
            "errors": errs,
            "failed": sum(errs.values()),
            "runs": len(loads),
            "stalled": max((ld.get("in_flight_max_age_ms", 0) for ld in loads), default=0),
        }
    reload: dict[tuple, list] = {}
    for r in results:
        if r["kind"] == "reload":
            reload.setdefault((r["server"], r["method"], r["keepalive"]), []).append(r)
    r_out = {}
    for key, runs in reload.items():
        errs = {}
        for r in runs:
            for k, v in r["load"]["errors"].items():
                errs[k] = errs.get(k, 0) + v
        timings = [t for r in runs for t in r["reloads"]]
        r_out[key] = {
            "rps": med([r["load"]["rps"] for r in runs]),
            "p50": med([r["load"]["latency_ms"]["p50"] for r in runs]),
            "p99": med([r["load"]["latency_ms"]["p99"] for r in runs]),
            "max": max((r["load"]["latency_ms"]["max"] for r in runs), default=None),
            "errors": errs,
            "failed": sum(errs.values()),
            "ok": sum(r["load"]["ok"] for r in runs),
            "sent": len(timings),
            "seen": sum(1 for t in timings if t["new_code_ms"] is not None),
            "new_code_ms": med([t["new_code_ms"] for t in timings]),
            "old_last_ms": med([t["old_last_ms"] for t in timings]),
            "runs": len(runs),
        }
    idle = {}
    for r in results:
        if r["kind"] == "idle-reload":
            vals = [t["new_code_ms"] for t in r["reloads"] if t["new_code_ms"] is not None]
            idle[(r["server"], r["method"])] = {
                "median": med(vals), "min": min(vals, default=None), "max": max(vals, default=None),
                "seen": len(vals), "sent": len(r["reloads"]), "failed": r["load"]["failed"],
                "errors": r["load"]["errors"],
            }
    return {"steady": s_out, "reload": r_out, "idle": idle}


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def render(envinfo: dict, imp: dict, opts: Opts, workers: int, servers: list[Server], infos: list[dict],
           skipped: dict[str, str], summary: dict, argv: list[str], elapsed: float) -> str:
    v = envinfo["versions"]
    label = {s.name: s.label for s in SERVERS.values()}
    ka_txt = {True: "yes", False: "no"}
    L: list[str] = []
    L += ["# Benchmarks", "",
          "<!-- Generated by `make bench` (bench/run.py). Do not edit by hand: rerun it. -->", "",
          f"Run on {envinfo['date']} with `{' '.join(['python bench/run.py', *argv])}` ({elapsed / 60:.1f} min).", "",
          "## Machine and versions", "",
          "| | |", "|---|---|",
          f"| CPUs (nproc) | {envinfo['nproc']} × {envinfo['cpu']} |",
          f"| RAM | {envinfo['ram']} |",
          f"| kernel | {envinfo['kernel']} |",
          f"| load average (1 min) at start / end | {envinfo['loadavg_start'][0]:.2f} / "
          f"{envinfo.get('loadavg_end', (float('nan'),))[0]:.2f} (other work on the machine skews results) |",
          *([f"| CPU busy just before the run | {envinfo['cpu_busy_before']:.0%} |"]
            if "cpu_busy_before" in envinfo else []),
          f"| Python | {v['python']}"
          + (f" (`.venv-bench`, the peers' venv: {v['peer_python']})"
             if v.get("peer_python") and v.get("peer_python") != v["python"] else "") + " |",
          f"| supervise | {v['supervise']} (`.venv`) |",
          f"| gunicorn | {v['gunicorn']} (`.venv-bench`) |",
          f"| uWSGI | {v['uwsgi']} (`.venv-bench`; pip, compiled against the venv's Python) |",
          f"| Granian | {v.get('granian', 'not installed')} (`.venv-bench`) |",
          f"| wrk | {v['wrk']} |",
          f"| app import time | {imp['import_ms']:.2f} ms in-process; {imp['interpreter_and_import_ms']:.0f} ms for a "
          f"fresh interpreter + import (median of 7) |",
          ""]
    L += ["## Setup", "",
          f"* Same app for all (`bench/apps/hello.py`: 200, `Content-Length`, body `hello from VERSION`), "
          f"{workers} workers each, all on {HOST}, `PYTHONDONTWRITEBYTECODE=1`. All servers are started "
          "first and stay up side by side (idle when not under test); only one is under load at a time.",
          f"* Load: `bench/load.py`, {opts.procs} processes × {opts.conns} connections = "
          f"{opts.procs * opts.conns} concurrent closed-loop clients (raw sockets, HTTP/1.1), the same for "
          f"every server; {opts.timeout:g} s per-request timeout. "
          + ("wrk uses the same thread and connection counts." if opts.use_wrk else ""),
          "* supervise runs from the project venv (`.venv/bin`), the other servers from their own venv "
          "(`.venv-bench/bin`, installed by `bench/setup.sh` from `bench/requirements.txt`).",
          f"* The load generator shares the {envinfo['nproc']} cores with the server, so absolute numbers are "
          "low; compare ratios.",
          f"* Steady: {opts.steady_duration:g} s × {opts.repeats} runs (bench client) "
          + (f"and {opts.wrk_duration:g} s × {opts.repeats} (wrk) " if opts.use_wrk else "")
          + "per keep-alive mode, interleaved round-robin over the servers so that background load on the "
          "shared machine spreads evenly; medians.",
          f"* Reloads: a reload every {RELOAD_INTERVAL:g} s for {opts.reload_duration:g} s × {opts.reload_repeats} "
          "runs per mode (the VERSION line is rewritten just before each trigger); the run goes on ≥ 2 s after "
          "the last one. Failures are totals over the runs; latencies are medians of per-run percentiles, max "
          "is the max.",
          f"* Trigger → new code: from the signal (or the file write) to the first response carrying the new "
          f"VERSION. Idle: one client sending a request every 2.5 ms, {opts.idle_reloads} reloads.",
          "* Server command lines:", ""]
    for info in infos:
        L.append(f"  * {label[info['server']]}: `{_short_argv(info.get('argv', ''))}`")
    L.append("")
    if skipped:
        L += ["Not run: " + "; ".join(f"{k} ({why})" for k, why in skipped.items()), ""]

    st = summary["steady"]
    L += ["## Steady load", "",
          "| server | keep-alive | req/s | p50 ms | p99 ms | max ms | failed | wrk req/s | wrk p50 ms | wrk p99 ms "
          "| wrk errors |",
          "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---|"]
    for s in servers:
        if not s.steady or s.asgi:
            continue
        for ka in (True, False):
            b = st.get((s.name, "steady", ka))
            w = st.get((s.name, "wrk", ka), {})
            if not b:
                continue
            L.append(f"| {s.label} | {ka_txt[ka]} | {fmt(b['rps'], 0)} | {fmt(b['p50'])} | {fmt(b['p99'])} | "
                     f"{fmt(b['max'], 1)} | {b['failed'] or 0}{' (' + fmt_errors(b['errors']) + ')' if b['failed'] else ''}"
                     f"{_stalled(b['stalled'])}"
                     f" | {fmt(w.get('rps'), 0)} | {fmt((w.get('p50')))} | {fmt(w.get('p99'))} | "
                     f"{fmt_errors(w.get('errors', {}))} |")
    L.append("")

    rl = summary["reload"]
    L += [f"## Reload every {RELOAD_INTERVAL:g} s under load", "",
          "| server | trigger | keep-alive | req/s | failed | failures by kind | p50 ms | p99 ms | max ms "
          "| new code seen | trigger → new code, median ms | → last old-code response, median ms |",
          "|---|---|---|---:|---:|---|---:|---:|---:|---|---:|---:|"]
    for s in servers:
        if s.asgi:
            continue
        for m in s.reloads:
            for ka in (True, False):
                r = rl.get((s.name, m, ka))
                if not r:
                    continue
                L.append(f"| {s.label} | {RELOAD_LABELS[m]} | {ka_txt[ka]} | {fmt(r['rps'], 0)} | "
                         f"**{r['failed']}** of {r['ok'] + r['failed']:,} | {fmt_errors(r['errors'])} | "
                         f"{fmt(r['p50'])} | {fmt(r['p99'])} | {fmt(r['max'], 1)} | {r['seen']}/{r['sent']} | "
                         f"{fmt(r['new_code_ms'], 0)} | {fmt(r['old_last_ms'], 0)} |")
    L.append("")

    idle = summary["idle"]
    L += ["## Trigger → first new-code response, idle server", "",
          f"App import time for reference: {imp['import_ms']:.2f} ms in-process, "
          f"{imp['interpreter_and_import_ms']:.0f} ms including a fresh interpreter.", "",
          "| server | trigger | median ms | min ms | max ms | seen | failed |",
          "|---|---|---:|---:|---:|---|---|"]
    for s in servers:
        if s.asgi:
            continue
        for m in s.reloads:
            r = idle.get((s.name, m))
            if r:
                L.append(f"| {s.label} | {RELOAD_LABELS[m]} | {fmt(r['median'], 0)} | {fmt(r['min'], 0)} | "
                         f"{fmt(r['max'], 0)} | {r['seen']}/{r['sent']} | {r['failed']}"
                         f"{' (' + fmt_errors(r['errors']) + ')' if r['failed'] else ''} |")
    L.append("")
    for info in infos:
        recs = [r for f in info.get("log_findings", []) for r in f.get("reloads", [])]
        if not recs:
            continue
        outcomes: dict[str, int] = {}
        for r in recs:
            outcomes[str(r.get("outcome"))] = outcomes.get(str(r.get("outcome")), 0) + 1
        ready = med([r["ready_after"] * 1000 for r in recs if isinstance(r.get("ready_after"), (int, float))])
        whole = med([r["duration"] * 1000 for r in recs if isinstance(r.get("duration"), (int, float))])
        L.append(f"{label[info['server']]}, from its own `reload_finished` events over the whole run: "
                 f"{len(recs)} reloads ({', '.join(f'{v} {k}' for k, v in outcomes.items())}); new generation "
                 f"ready after {fmt(ready, 0)} ms, reload finished (old generation drained) after "
                 f"{fmt(whole, 0)} ms, medians.")
        L.append("")

    # ratios and targets
    def sv(server: str, kind: str, ka: bool, field: str = "rps") -> float | None:
        return (st.get((server, kind, ka)) or {}).get(field)

    L += ["## Ratios", "",
          "supervise ÷ other server, medians (bench client; wrk in brackets).", "",
          "| | vs gunicorn sync | vs gunicorn gthread | vs uWSGI | vs Granian |", "|---|---:|---:|---:|---:|"]
    for ka in (True, False):
        cells = []
        for other in PEERS:
            a = ratio(sv("supervise", "steady", ka), sv(other, "steady", ka))
            b = ratio(sv("supervise", "wrk", ka), sv(other, "wrk", ka))
            cells.append(f"{fmt(a)}× [{fmt(b)}×]" if a is not None else "–")
        L.append(f"| steady req/s, keep-alive {ka_txt[ka]} | " + " | ".join(cells) + " |")
    for ka in (True, False):
        cells = []
        for other in PEERS:
            a = ratio(sv("supervise", "steady", ka, "p99"), sv(other, "steady", ka, "p99"))
            cells.append(f"{fmt(a)}×" if a is not None else "–")
        L.append(f"| steady p99, keep-alive {ka_txt[ka]} (lower is better) | " + " | ".join(cells) + " |")
    for ka in (True, False):
        cells = []
        sup = rl.get(("supervise", "hup", ka))
        for other, m in (("gunicorn-sync", "hup"), ("gunicorn-gthread", "hup"), ("uwsgi", "fifo-c"),
                         ("granian", "hup")):
            o = rl.get((other, m, ka))
            a = ratio(sup and sup["rps"], o and o["rps"])
            cells.append(f"{fmt(a)}×" if a is not None else "–")
        L.append(f"| req/s during reloads, keep-alive {ka_txt[ka]} (uWSGI: chain) | " + " | ".join(cells) + " |")
    L.append("")

    L += ["## Targets", "", "Reported, not asserted.", "",
          "| target | measured | ratio to target | met |", "|---|---|---:|---|"]

    def row(target: str, measured: str, r: float | None, met: bool | None) -> None:
        L.append(f"| {target} | {measured} | {fmt(r)} | {'–' if met is None else ('yes' if met else '**no**')} |")

    for m in SERVERS["supervise"].reloads + (SERVERS["supervise-watch"].reloads if any(
            s.name == "supervise-watch" for s in servers) else []):
        srv = "supervise-watch" if m == "watch" else "supervise"
        for ka in (True, False):
            r = rl.get((srv, m, ka))
            if r:
                row(f"0 failed requests during reloads ({RELOAD_LABELS[m]}, keep-alive {ka_txt[ka]})",
                    f"{r['failed']} failed of {r['ok'] + r['failed']:,}" + (f" ({fmt_errors(r['errors'])})"
                                                                            if r['failed'] else ""),
                    None, r["failed"] == 0)
    goals = [(True, "gunicorn-gthread", 3.0), (True, "granian", 1.0), (False, "uwsgi", 1.0),
             (False, "granian", 1.0)]
    for keepalive, peer, goal in goals:
        for kind, client in (("steady", "bench client"), ("wrk", "wrk")):
            a = ratio(sv("supervise", kind, keepalive), sv(peer, kind, keepalive))
            if a is not None:
                mode = "keep-alive" if keepalive else "new connection per request"
                row(f"steady req/s, {mode}, ≥ {goal:g} × {SERVERS[peer].label} ({client})",
                    f"{fmt(sv('supervise', kind, keepalive), 0)} vs {fmt(sv(peer, kind, keepalive), 0)} req/s "
                    f"= {fmt(a)}×", ratio(a, goal), a >= goal)
    for keepalive in (True, False):
        for kind, client in (("steady", "bench client"), ("wrk", "wrk")):
            a = ratio(sv("supervise", kind, keepalive), sv("supervise-nometrics", kind, keepalive))
            if a is not None:
                row(f"cost of the metrics ≤ 3 % (keep-alive {ka_txt[keepalive]}, {client})",
                    f"{fmt(sv('supervise', kind, keepalive), 0)} vs {fmt(sv('supervise-nometrics', kind, keepalive), 0)}"
                    f" req/s without = {fmt((1 - a) * 100, 1)} %", None, a >= 0.97)
    for ka in (True, False):
        r = rl.get(("supervise", "hup", ka))
        base = sv("supervise", "steady", ka, "p99")
        if r and base:
            a = ratio(r["p99"], base)
            row(f"p99 during reloads ≤ 2 × steady p99 (keep-alive {ka_txt[ka]})",
                f"{fmt(r['p99'])} vs {fmt(base)} ms = {fmt(a)}×", ratio(a, 2.0), a <= 2.0)
    limit = imp["import_ms"] + 100
    for srv, m in (("supervise", "hup"), ("supervise-watch", "watch")):
        r = idle.get((srv, m))
        if r and r["median"] is not None:
            debounce = watch_debounce_ms() if m == "watch" else None
            extra = f" ({debounce:.0f} ms of it is the default --watch-debounce)" if debounce else ""
            row(f"{RELOAD_LABELS[m]} → new code ≤ import time + 100 ms ({limit:.0f} ms)",
                f"{fmt(r['median'], 0)} ms idle median{extra}", ratio(r["median"], limit), r["median"] <= limit)
    L.append("")

    L += render_asgi([s for s in servers if s.asgi], summary)

    L += ["## Reading the numbers", "",
          "Failure kinds (from `bench/load.py`): `refused` (connect refused), `reset` (ECONNRESET/EPIPE), "
          "`eof` (closed before a complete response), `timeout`, `connect_timeout`, `bad_status:N`, `bad_body`, "
          "`bad_response`. `/reused` marks a failure on a keep-alive connection that had already carried a "
          "response (the server closed it while the next request was on its way; clients commonly retry "
          "those), `/fresh` one on a new connection. Before reusing a connection the client checks, as pooling "
          "clients do, whether the server has already closed it; such a connection is reopened without a "
          "failure. Requests still in flight when a run ends are not counted.", "",
          "* gunicorn sync has no keep-alive: it answers `Connection: close`, so its keep-alive rows are "
          "close-per-request in practice.",
          "* uWSGI `--http-socket` has no keep-alive either, and closes after each response *without* "
          "`Connection: close`; a keep-alive client then races the close, which shows up as `eof/reused` and "
          "`reset/reused` failures (and wrk read errors) in its keep-alive rows even without reloads. "
          "(`--http11-socket` keeps connections open but then a worker serves one connection at a time, "
          "starving the others.)",
          "* uWSGI `r` re-executes the master and all workers at once; `c` replaces one worker at a time and "
          "needs `--lazy-apps` to load new code.",
          "* Granian (`--interface wsgi`) reloads on SIGHUP by replacing its workers one at a time: it starts a "
          "new worker (which imports the app afresh), sleeps `--respawn-interval` (3.5 s, the default), then "
          "terminates the old one and moves on to the next. With 2 workers a reload takes about 7 s, so "
          "SIGHUPs every 2 s arrive while one is in progress and are merged into a single further reload "
          "(fewer \"new code seen\"; a worker started later loads whatever code is on disk by then). A "
          "keep-alive connection stays with its old worker until that worker is stopped, so a keep-alive client "
          "gets new code only after the respawn interval (the idle single-connection client sees at most the "
          "first trigger's version before its run ends). Stopping a worker closes its connections, hence the "
          "`eof` failures. Its `--reload` option is a development file watcher and is not used.",
          "* \"new code seen\" below its total means some triggers never produced a response with their own "
          "VERSION: a later trigger superseded them (uWSGI ignores `c` while a chain reload is still running, "
          "which with 2 workers takes about 2 s). \"→ last old-code response\" is when the version before the "
          "trigger was last served.", ""]

    problems = []
    for info in infos:
        findings = info.get("log_findings", [])
        if (info.get("errors") or info.get("incidents") or any(f.get("problems") for f in findings)
                or not info.get("alive_at_end", True)):
            problems.append(info)
    if problems:
        L += ["## Problems seen", "",
              "Harness errors, servers that died during the run (restarted, scenario retried once), and "
              "warning/error lines from the server logs (kept in `bench/results/<timestamp>/`).", ""]
        for info in problems:
            L.append(f"### {label[info['server']]}")
            L.append("")
            for e in info.get("errors", []):
                L.append(f"* harness gave up on this server: {e}")
            for inc in info.get("incidents", []):
                L.append(f"* server {inc['why']}; exit code {inc['exit_code']}; log `{inc['log']}`"
                         + (":" if inc.get("signals") or inc.get("log_tail") else ""))
                shown = inc.get("signals") or inc.get("log_tail") or []
                if shown:
                    L += ["", "  ```"] + [f"  {line}" for line in shown[-4:]] + ["  ```", ""]
            if not info.get("alive_at_end", True):
                L.append(f"* server was not running at the end (exit code {info.get('exit_code')})")
            for f in info.get("log_findings", []):
                if f.get("problems"):
                    L.append(f"* `{f['log']}`: {len(f['problems'])} warning/error lines (first ones):")
                    L += ["", "  ```"] + [f"  {p}" for p in f["problems"][:6]] + ["  ```", ""]
            L.append("")
    return "\n".join(L).rstrip() + "\n"


def _seen(r: dict | None) -> str:
    return f"{r['seen']}/{r['sent']}" if r else "–"


def render_asgi(servers: list[Server], summary: dict) -> list[str]:
    """The ASGI table: supervise's ASGI worker and the ASGI peers, the same hello app (bench/apps/hello_asgi.py)."""
    if not servers:
        return []
    st, rl, idle = summary["steady"], summary["reload"], summary["idle"]
    ka_txt = {True: "yes", False: "no"}
    L = ["## ASGI", "",
         "The same load and reloads with the ASGI hello app (`bench/apps/hello_asgi.py`, with a lifespan), "
         "side by side: supervise's ASGI worker, uvicorn (`--workers`, httptools, uvloop), Granian "
         "(`--interface asgi`) and gunicorn's ASGI worker when the installed gunicorn has one.", "",
         "| server | keep-alive | steady req/s | p99 ms | wrk req/s | reloads: failed | failures by kind "
         "| req/s during reloads | new code seen | trigger → new code, median ms | idle: trigger → new code, ms |",
         "|---|---|---:|---:|---:|---:|---|---:|---|---:|---:|"]
    for s in servers:
        for ka in (True, False):
            b = st.get((s.name, "steady", ka)) or {}
            w = st.get((s.name, "wrk", ka)) or {}
            r = rl.get((s.name, "hup", ka))
            i = idle.get((s.name, "hup")) if ka else None
            failed = f"**{r['failed']}** of {r['ok'] + r['failed']:,}" if r else "–"
            L.append(f"| {s.label} | {ka_txt[ka]} | {fmt(b.get('rps'), 0)} | {fmt(b.get('p99'))} | "
                     f"{fmt(w.get('rps'), 0)} | {failed} | {fmt_errors(r['errors']) if r else ''} | "
                     f"{fmt(r['rps'], 0) if r else '–'} | {_seen(r)} | "
                     f"{fmt(r['new_code_ms'], 0) if r else '–'} | {fmt(i['median'], 0) if i else ''} |")
    L.append("")
    names = {s.name for s in servers}
    if "supervise-asgi" in names:
        L += ["| target (ASGI) | measured | met |", "|---|---|---|"]
        for ka in (True, False):
            for kind, client in (("steady", "bench client"), ("wrk", "wrk")):
                mine = (st.get(("supervise-asgi", kind, ka)) or {}).get("rps")
                peer = (st.get(("uvicorn", kind, ka)) or {}).get("rps")
                a = ratio(mine, peer)
                if a is not None:
                    L.append(f"| steady req/s ≥ 1.0 × uvicorn, keep-alive {ka_txt[ka]} ({client}) | "
                             f"{fmt(mine, 0)} vs {fmt(peer, 0)} req/s = {fmt(a)}× | {'yes' if a >= 1.0 else '**no**'} |")
            r = rl.get(("supervise-asgi", "hup", ka))
            if r:
                peers = "; ".join(f"{SERVERS[p].label}: {rl[(p, 'hup', ka)]['failed']}" for p in ASGI_PEERS
                                  if (p, "hup", ka) in rl)
                L.append(f"| 0 failed requests during reloads, keep-alive {ka_txt[ka]} | {r['failed']} failed"
                         f"{f' (peers: {peers})' if peers else ''} | {'yes' if r['failed'] == 0 else '**no**'} |")
        L.append("")
    return L


def _stalled(ms: float) -> str:
    """A request still unanswered at the end of a run after more than a second: starvation, not latency."""
    return f" ⚠ a request waited {ms / 1000:.1f} s unanswered at the end" if ms > 1000 else ""


def _short_argv(argv: str) -> str:
    argv = re.sub(r"\S*/(bench/results/[^/ ]+/)", r"\1", argv)
    return argv.replace(str(VENV_BIN) + "/", "").replace(str(PEER_BIN) + "/", "")


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short smoke run (about a minute per server)")
    ap.add_argument("--servers", default=",".join(ALL_SERVERS),
                    help=f"comma-separated subset of {','.join(ALL_SERVERS)} (default: all)")
    ap.add_argument("--duration", type=float, help="seconds of each steady run (default 4; --quick 2)")
    ap.add_argument("--reload-duration", type=float, help="seconds of each reload run (default 10; --quick 6)")
    ap.add_argument("--repeats", type=int, help="steady runs per mode (default 3; --quick 1)")
    ap.add_argument("--reload-repeats", type=int, help="reload runs per mode (default 2; --quick 1)")
    ap.add_argument("--workers", type=int, default=2, help="workers per server (default 2)")
    ap.add_argument("--threads", type=int, default=4,
                    help="threads per worker of gunicorn gthread (--threads) and Granian (--blocking-threads) "
                    "(default 4)")
    ap.add_argument("--procs", type=int, default=2, help="load generator processes (default 2)")
    ap.add_argument("--conns", type=int, default=8, help="connections per load process (default 8)")
    ap.add_argument("--no-wrk", action="store_true", help="skip the wrk runs")
    ap.add_argument("--output", help="markdown report path (default docs/benchmarks.md; with --quick "
                    "bench/results/<timestamp>/benchmarks.md, so a smoke run never replaces the report)")
    ap.add_argument("--quiet-wait", type=float, help="wait up to this many seconds for the CPUs to be mostly "
                    "idle before starting (default 60; --quick 0)")
    ap.add_argument("--results-dir", default=str(BENCH / "results"), help="raw results and logs go below here")
    ap.add_argument("--render", metavar="RESULTS_JSON",
                    help="only rewrite the report from a saved bench/results/<timestamp>/results.json")
    args = ap.parse_args(argv)

    if args.render:
        raw = json.loads(Path(args.render).read_text())
        servers = [SERVERS[n] for n in raw["server_names"]]
        text = render(raw["env"], raw["import"], Opts(**raw["opts"]), raw["workers"], servers, raw["servers"],
                      raw["skipped"], summarize(raw["results"]), raw["argv"], raw["elapsed"])
        out = Path(args.output) if args.output else ROOT / "docs" / "benchmarks.md"
        out.write_text(text)
        log(f"wrote {out} from {args.render}")
        return 0

    quick = args.quick
    if args.quiet_wait is None:
        args.quiet_wait = 0.0 if quick else 60.0
    opts = Opts(
        steady_duration=args.duration or (2.0 if quick else 4.0),
        reload_duration=args.reload_duration or (6.0 if quick else 10.0),
        wrk_duration=args.duration or (2.0 if quick else 3.0),
        repeats=args.repeats or (1 if quick else 3),
        reload_repeats=args.reload_repeats or (1 if quick else 2),
        idle_reloads=2 if quick else 4,
        procs=args.procs, conns=args.conns, timeout=5.0,
        use_wrk=not args.no_wrk and shutil.which("wrk") is not None,
    )
    if opts.reload_duration < 2 * RELOAD_INTERVAL:
        ap.error(f"--reload-duration must be at least {2 * RELOAD_INTERVAL:g}")
    wanted = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SERVERS]
    if unknown:
        ap.error(f"unknown server(s) {', '.join(unknown)}; choose from {', '.join(ALL_SERVERS)}")

    started = time.monotonic()
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    rundir = Path(args.results_dir) / stamp
    rundir.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(appdir=rundir / "app", rundir=rundir, workers=args.workers, gthread_threads=args.threads)
    log(f"results in {rundir}")
    if not opts.use_wrk and not args.no_wrk:
        log("wrk not found: skipping the wrk runs (bench/setup.sh installs it)")

    servers, skipped = [], {}
    for name in wanted:
        why = SERVERS[name].available()
        if why:
            skipped[name] = why
            log(f"skipping {name}: {why}")
        else:
            servers.append(SERVERS[name])

    envinfo = environment()
    if args.quiet_wait > 0:
        envinfo["cpu_busy_before"] = wait_for_quiet(args.quiet_wait)
        envinfo["loadavg_start"] = os.getloadavg()
    App(ctx.appdir)
    imp = import_time(ctx.appdir)
    log(f"app import {imp['import_ms']:.2f} ms; interpreter + import {imp['interpreter_and_import_ms']:.0f} ms")

    # All servers run side by side (idle ones cost nothing); steady runs are interleaved round-robin so
    # background noise on the shared machine spreads evenly over the servers.  Reload runs go server by server.
    results: list[dict] = []
    benches = [Bench(s, ctx, opts, results) for s in servers]
    try:
        for b in benches:
            b.start()
        for rep in range(opts.repeats):
            for keepalive in (True, False):
                for b in benches:
                    b.steady(keepalive, rep)
        for b in benches:
            b.reloads()
    finally:
        infos = [b.stop() for b in benches]
    envinfo["loadavg_end"] = os.getloadavg()

    summary = summarize(results)
    elapsed = time.monotonic() - started
    raw = {"env": envinfo, "import": imp, "opts": dataclasses.asdict(opts), "workers": args.workers,
           "server_names": [s.name for s in servers], "servers": infos, "skipped": skipped, "argv": argv,
           "elapsed": elapsed, "results": results}
    (rundir / "results.json").write_text(json.dumps(raw, indent=1, default=str))
    text = render(envinfo, imp, opts, args.workers, servers, infos, skipped, summary, argv, elapsed)
    out = Path(args.output) if args.output else (rundir / "benchmarks.md" if quick else ROOT / "docs" / "benchmarks.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    log(f"wrote {out} and {rundir / 'results.json'} in {elapsed / 60:.1f} min")
    return 1 if any(i["errors"] for i in infos) else 0


if __name__ == "__main__":
    sys.exit(main())
