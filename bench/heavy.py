#!/usr/bin/env python3
"""The heavy-app table (issue 14): preload that still reloads.

An app whose import allocates ~220 MB of Python objects and burns ~1 s of CPU
(bench/apps/heavy.py), served with 4 workers by:

* supervise, each worker importing the app (the default);
* supervise --preload (a zygote per generation imports once and forks the workers);
* gunicorn sync --preload (the master imports once; HUP re-forks workers from it);
* uWSGI without --lazy-apps (the master imports once; reload `r` re-execs the master) and
  with --lazy-apps (each worker imports; chain reload `c`).

For each: the time until the first response, the workers' unique memory (USS, summed), the
whole process tree's memory (PSS, summed: shared pages once), then one reload onto new code:
how long until the new code answers (or that it never does), the tree's peak PSS during the
reload, and failed requests seen by one polling client meanwhile.

Separate from bench/run.py (which another table owns); `make bench` runs both and this one
appends its section to the report.  Every wait is bounded; every process is killed at the end.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psutil

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
VENV_BIN = Path(os.environ.get("BENCH_VENV_BIN", ROOT / ".venv" / "bin"))
PEER_BIN = Path(os.environ.get("BENCH_PEER_BIN", ROOT / ".venv-bench" / "bin"))
HOST = "127.0.0.1"
MODULE = "heavy"
BOOT_WAIT = 120.0
RELOAD_WAIT = 30.0  # a server whose reload has not served the new code by then never will
MiB = 1 << 20
PSS_EVERY = 0.3  # seconds between two samples of the tree's memory during a reload


@dataclass
class Peer:
    name: str
    label: str
    argv: Callable[[Path, int, int, Path], list[str]]
    reload: Callable[[subprocess.Popen, Path], None]
    exe: str


@dataclass
class Row:
    peer: Peer
    boot: float | None = None
    workers_uss: int | None = None
    tree_pss: int | None = None
    reload_seconds: float | None = None
    new_code: bool = False
    peak_pss: int | None = None
    failures: int = 0
    requests: int = 0
    longest: float = 0.0  # the slowest request of the polling client during the reload
    error: str = ""
    notes: list[str] = field(default_factory=list)


def _hup(proc: subprocess.Popen, fifo: Path) -> None:
    proc.send_signal(signal.SIGHUP)


def _fifo(command: str) -> Callable[[subprocess.Popen, Path], None]:
    def send(proc: subprocess.Popen, fifo: Path) -> None:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.write(fd, command.encode())
        finally:
            os.close(fd)
    return send


def supervise_argv(preload: bool) -> Callable[[Path, int, int, Path], list[str]]:
    def argv(appdir: Path, port: int, workers: int, fifo: Path) -> list[str]:
        return [str(VENV_BIN / "supervise"), MODULE, "--chdir", str(appdir), "--bind", f"{HOST}:{port}",
                "--workers", str(workers), "--no-watch", "--boot-timeout", str(int(BOOT_WAIT)),
                "--log-level", "warning", "--max-memory", "0", *(["--preload"] if preload else [])]
    return argv


def gunicorn_argv(appdir: Path, port: int, workers: int, fifo: Path) -> list[str]:
    return [str(PEER_BIN / "gunicorn"), "--chdir", str(appdir), "--bind", f"{HOST}:{port}", "--workers",
            str(workers), "--worker-class", "sync", "--preload", "--graceful-timeout", "8", "--timeout", "120",
            f"{MODULE}:application"]


def uwsgi_argv(lazy: bool) -> Callable[[Path, int, int, Path], list[str]]:
    def argv(appdir: Path, port: int, workers: int, fifo: Path) -> list[str]:
        return [str(PEER_BIN / "uwsgi"), "--master", "--http-socket", f"{HOST}:{port}", "--processes",
                str(workers), "--chdir", str(appdir), "--module", f"{MODULE}:application", "--master-fifo",
                str(fifo), "--die-on-term", "--disable-logging", "--need-app", "--worker-reload-mercy", "8",
                "--reload-mercy", "8", *(["--lazy-apps"] if lazy else [])]
    return argv


PEERS = [
    Peer("supervise", "supervise (each worker imports)", supervise_argv(False), _hup, "supervise"),
    Peer("supervise-preload", "supervise --preload", supervise_argv(True), _hup, "supervise"),
    Peer("gunicorn-preload", "gunicorn sync --preload", gunicorn_argv, _hup, "gunicorn"),
    Peer("uwsgi", "uWSGI (preloaded; reload `r`)", uwsgi_argv(False), _fifo("r"), "uwsgi"),
    Peer("uwsgi-lazy", "uWSGI --lazy-apps (chain reload `c`)", uwsgi_argv(True), _fifo("c"), "uwsgi"),
]


# --------------------------------------------------------------------------- measuring


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def get(port: int, timeout: float = 2.0) -> str | None:
    try:
        conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
        try:
            conn.request("GET", "/", headers={"Connection": "close"})
            resp = conn.getresponse()
            body = resp.read().decode()
            return body if resp.status == 200 else None
        finally:
            conn.close()
    except (OSError, http.client.HTTPException):
        return None


def serving(port: int, version: str, deadline: float, proc: subprocess.Popen) -> float | None:
    """The time at which `version` answered, or None at the deadline (or if the server died)."""
    while time.monotonic() < deadline and proc.poll() is None:
        body = get(port)
        if body is not None and version in body:
            return time.monotonic()
        time.sleep(0.05)  # polling interval of a bounded wait
    return None


def tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def pss(procs: list[psutil.Process]) -> int:
    total = 0
    for p in procs:
        try:
            total += p.memory_full_info().pss
        except psutil.Error:
            pass
    return total


def workers_uss(pid: int, peer: Peer) -> int:
    """Summed USS of the serving workers (not the master, not a zygote)."""
    total = 0
    for p in tree(pid)[1:]:
        try:
            title = " ".join(p.cmdline())
            if peer.exe == "supervise" and "supervise: worker" not in title:
                continue
            total += p.memory_full_info().uss
        except psutil.Error:
            pass
    return total


class Poller:
    """One client polling during the reload: counts requests and failures, bounded in time."""

    def __init__(self, port: int, until: float) -> None:
        self.port, self.until = port, until
        self.requests = self.failures = 0
        self.longest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set() and time.monotonic() < self.until:
            self.requests += 1
            t0 = time.monotonic()
            if get(self.port, timeout=10.0) is None:
                self.failures += 1
            self.longest = max(self.longest, time.monotonic() - t0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)


def write_app(appdir: Path, version: str) -> None:
    text = (BENCH / "apps" / "heavy.py").read_text()
    text = re.sub(r'^VERSION = "[^"]*"$', f'VERSION = "{version}"', text, count=1, flags=re.M)
    shutil.rmtree(appdir / "__pycache__", ignore_errors=True)
    tmp = appdir / f"{MODULE}.tmp"
    tmp.write_text(text)
    os.replace(tmp, appdir / f"{MODULE}.py")


def measure(peer: Peer, workers: int, scratch: Path) -> Row:
    row = Row(peer)
    exe = (VENV_BIN if peer.exe == "supervise" else PEER_BIN) / peer.exe
    if not os.access(exe, os.X_OK):
        row.error = f"`{peer.exe}` not installed (run bench/setup.sh)"
        return row
    appdir = scratch / peer.name
    appdir.mkdir(parents=True)
    write_app(appdir, "v0001")
    fifo = appdir / "fifo"
    os.mkfifo(fifo)
    port = free_port()
    log = open(appdir / "server.log", "wb")
    started = time.monotonic()
    proc = subprocess.Popen(peer.argv(appdir, port, workers, fifo), cwd=appdir, stdout=log, stderr=log,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        up = serving(port, "v0001", started + BOOT_WAIT, proc)
        if up is None:
            row.error = "did not serve"
            return row
        row.boot = up - started
        # Let every worker finish its import (each imports on its own without preload).
        deadline = time.monotonic() + BOOT_WAIT
        while time.monotonic() < deadline:
            before = workers_uss(proc.pid, peer)
            time.sleep(1.0)  # memory settled when two looks a second apart agree
            after = workers_uss(proc.pid, peer)
            if abs(after - before) < 4 * MiB and after > 0:
                break
        row.workers_uss = workers_uss(proc.pid, peer)
        row.tree_pss = pss(tree(proc.pid))
        write_app(appdir, "v0002")
        t0 = time.monotonic()
        poller = Poller(port, t0 + RELOAD_WAIT)
        peer.reload(proc, fifo)
        peak, sampled = 0, 0.0
        new = None
        while time.monotonic() < t0 + RELOAD_WAIT and proc.poll() is None:
            if time.monotonic() - sampled >= PSS_EVERY:  # reading smaps costs CPU the reload needs
                peak, sampled = max(peak, pss(tree(proc.pid))), time.monotonic()
            body = get(port, timeout=1.0)
            if body is not None and "v0002" in body:
                new = time.monotonic()
                break
            time.sleep(0.05)  # polling interval of a bounded wait
        poller.stop()
        row.peak_pss = peak
        row.requests, row.failures, row.longest = poller.requests, poller.failures, poller.longest
        row.new_code = new is not None
        row.reload_seconds = (new - t0) if new is not None else None
        if proc.poll() is not None:
            row.error = f"exited ({proc.returncode}) during the reload"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        log.close()
    return row


def import_seconds(scratch: Path) -> float:
    """The app's import on its own, in a fresh interpreter."""
    appdir = scratch / "import"
    appdir.mkdir(parents=True)
    write_app(appdir, "v0001")
    t0 = time.monotonic()
    subprocess.run([str(VENV_BIN / "python"), "-c", f"import {MODULE}"], cwd=appdir, check=True, timeout=BOOT_WAIT)
    return time.monotonic() - t0


def render(rows: list[Row], workers: int, imported: float) -> str:
    def mib(v: int | None) -> str:
        return "–" if v is None else f"{v / MiB:.0f}"

    lines = [
        "## Heavy app: preload that still reloads",
        "",
        f"`bench/heavy.py`: an app whose import allocates ~220 MB of Python objects and burns ~1 s of CPU "
        f"(`bench/apps/heavy.py`; the import alone takes {imported:.2f} s here), {workers} workers, one reload "
        "onto new code. USS: the workers' own memory, summed; PSS: the whole process tree's memory (shared "
        "pages counted once), after boot and at its peak during the reload. Failed and longest: the requests "
        "of one client polling during the reload (a long one means the server stopped serving). New code "
        "after: the first response from the new code. supervise swaps a whole generation at once, so by then "
        "every worker runs it; a uWSGI chain reload replaces one worker at a time, so its first new-code "
        "response comes after one worker's import while the others still serve the old code. The machine "
        "has 2 cores: 4 workers importing at once take about twice the import time.",
        "",
        "| server | first response (s) | workers' USS (MiB) | tree PSS (MiB) | reload: new code after (s) "
        "| reload ÷ import | peak PSS in reload (MiB) | failed / requests | longest request (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.error and r.boot is None:
            lines.append(f"| {r.peer.label} | {r.error} | | | | | | | |")
            continue
        reload = f"{r.reload_seconds:.2f}" if r.reload_seconds is not None else \
            f"never (old code after {RELOAD_WAIT:.0f} s)"
        ratio = f"{r.reload_seconds / imported:.1f}×" if r.reload_seconds is not None else "–"
        note = f" ({r.error})" if r.error else ""
        lines.append(f"| {r.peer.label}{note} | {r.boot:.2f} | {mib(r.workers_uss)} | {mib(r.tree_pss)} | {reload} "
                     f"| {ratio} | {mib(r.peak_pss)} | {r.failures} / {r.requests} | {r.longest:.2f} |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--servers", default=",".join(p.name for p in PEERS))
    ap.add_argument("--append", metavar="MARKDOWN", help="append the table to this report (else print it)")
    args = ap.parse_args(argv)
    wanted = args.servers.split(",")
    with tempfile.TemporaryDirectory(prefix="supervise-heavy-") as tmp:
        scratch = Path(tmp)
        imported = import_seconds(scratch)
        rows = []
        for peer in PEERS:
            if peer.name in wanted:
                print(f"heavy: {peer.name} ...", flush=True)
                rows.append(measure(peer, args.workers, scratch))
    table = render(rows, args.workers, imported)
    if args.append:
        with open(args.append, "a") as fh:
            fh.write("\n" + table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
