"""`supervise status|reload|stop|workers`: the control commands, run in the operator's shell
(often `docker exec CONTAINER supervise reload`), never in the master.

They talk to a running master with what it already offers: its health endpoint (GET /health,
the JSON state) to read and to wait on, and signals to act (HUP reloads, TERM stops, TTIN and
TTOU add and remove a worker).  Nothing is written anywhere, so they work on a read-only root
filesystem.  The master is found through --health-bind (its JSON names its pid), --pid-file,
or, inside its container, PID 1; a pid is only signalled once /proc shows it is supervise.

Exit codes: 0 done, 1 the operation failed (a reload that failed, a timeout, a master that is
stopping), 2 bad usage, 6 no running master found or reachable.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import select
import signal
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from supervisor import logs, settings, sockets
from supervisor.cli import CONTROL_COMMANDS as COMMANDS
from supervisor.settings import ConfigError, positive_duration

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 6
POLL = 0.05  # seconds between two looks at the health JSON while waiting
REQUEST_TIMEOUT = 5.0
SCALE_STEP_TIMEOUT = 5.0  # one TTIN/TTOU must show in the health JSON within this
SHARED = ("health_bind", "pid_file")  # the master's settings these commands read too


class ControlError(Exception):
    """Why a command cannot go on: one line for the operator, and the exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Master:
    """How to reach the running master."""

    health: sockets.Address | None
    pid_file: str | None

    def health_json(self) -> dict[str, Any]:
        """GET /health (its JSON comes with a 200 or a 503 alike)."""
        if self.health is None:
            raise ControlError("no health address: set --health-bind or SUPERVISE_HEALTH_BIND as the master "
                               "has it", EXIT_USAGE)
        try:
            conn = _Connection(self.health)
            conn.request("GET", "/health", headers={"User-Agent": "supervise-control"})
            response = conn.getresponse()
            body = response.read(16 << 20)
            conn.close()
            state = json.loads(body)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise ControlError(f"no master answers at {self.health}: {exc}", EXIT_UNREACHABLE) from None
        if not isinstance(state, dict) or "workers_target" not in state:
            raise ControlError(f"{self.health} does not answer like a supervise health endpoint", EXIT_UNREACHABLE)
        return state

    def pid(self) -> int:
        """The master's pid in this pid namespace, checked to be supervise before any signal."""
        if self.pid_file:
            try:
                with open(self.pid_file) as f:
                    text = f.read().strip()
            except OSError as exc:
                raise ControlError(f"cannot read --pid-file {self.pid_file}: {exc.strerror}", EXIT_UNREACHABLE) \
                    from None
            if not text.isdigit():
                raise ControlError(f"--pid-file {self.pid_file} holds no pid", EXIT_UNREACHABLE)
            return _checked(int(text), f"--pid-file {self.pid_file}")
        if self.health is not None:
            return _checked(int(self.health_json()["pid"]), f"the health endpoint at {self.health}")
        return _checked(1, "PID 1 (no --health-bind or --pid-file given)")


class _Connection(http.client.HTTPConnection):
    """HTTP over the health address, TCP or unix socket."""

    def __init__(self, address: sockets.Address) -> None:
        super().__init__("localhost", timeout=REQUEST_TIMEOUT)
        self.address = address

    def connect(self) -> None:
        a = self.address
        if a.family == socket.AF_UNIX:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(REQUEST_TIMEOUT)
            try:
                sock.connect(a.host)
            except OSError:
                sock.close()
                raise
            self.sock = sock
            return
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(a.host, a.host)
        self.sock = socket.create_connection((host, a.port), REQUEST_TIMEOUT)


def _checked(pid: int, source: str) -> int:
    """`pid` if it is a live supervise process here; an error naming where it came from otherwise
    (a stale pid file, or a master in another pid namespace: run the command inside it)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        raise ControlError(f"no process {pid} here (from {source}): supervise is not running, or runs in "
                           "another pid namespace (use docker exec CONTAINER supervise ...)", EXIT_UNREACHABLE) \
            from None
    if "supervis" not in cmdline:
        raise ControlError(f"process {pid} (from {source}) is not supervise: {cmdline.strip()[:80]!r}; "
                           "inside a container, use docker exec CONTAINER supervise ...", EXIT_UNREACHABLE)
    return pid


# --------------------------------------------------------------------------- commands


def status(master: Master, args: argparse.Namespace, out: Callable[[str], None]) -> int:
    state = master.health_json()
    if args.json:
        out(json.dumps(state, indent=2))
    else:
        out(describe(state))
    return EXIT_OK if state.get("status") == "ok" else EXIT_FAILED


def reload(master: Master, args: argparse.Namespace, out: Callable[[str], None]) -> int:
    if args.no_wait:
        pid = master.pid()
        os.kill(pid, signal.SIGHUP)
        out(f"reload requested (SIGHUP to pid {pid})")
        return EXIT_OK
    before = master.health_json()
    newest = max([g["number"] for g in before.get("generations", [])] + [before.get("generation") or 0])
    pid = master.pid()
    os.kill(pid, signal.SIGHUP)
    out(f"reload requested (SIGHUP to pid {pid}); generation {before.get('generation')} serves until the new one "
        "is ready")
    deadline = time.monotonic() + args.timeout
    while True:
        state = master.health_json()
        serving = state.get("generation") or 0
        if serving > newest:
            boot = next((g["age"] for g in state.get("generations", []) if g["number"] == serving), None)
            out(f"generation {serving} serves" + (f" (started {boot:.2f} s ago)" if boot is not None else ""))
            return EXIT_OK
        failed = next((r for r in state.get("reloads", []) if r["generation"] > newest and r["result"] == "failed"),
                      None)
        if failed is not None:
            out(f"reload failed: {failed.get('error')}; generation {serving} still serves")
            return EXIT_FAILED
        if state.get("status") == "stopping":
            out("the master is shutting down")
            return EXIT_FAILED
        if time.monotonic() >= deadline:
            out(f"no new generation after {args.timeout:g} s (see the master's log); generation {serving} serves")
            return EXIT_FAILED
        time.sleep(POLL)


def stop(master: Master, args: argparse.Namespace, out: Callable[[str], None]) -> int:
    pid = master.pid()
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        pidfd = None
    os.kill(pid, signal.SIGTERM)
    out(f"stopping supervise (SIGTERM to pid {pid}): it withdraws, drains and exits")
    if pid == 1:
        return EXIT_OK  # the container's PID 1: this command ends with its container
    if pidfd is None:
        gone = _wait(lambda: not os.path.exists(f"/proc/{pid}"), args.timeout)
    else:
        gone = bool(select.select([pidfd], [], [], args.timeout)[0])
        os.close(pidfd)
    out("stopped" if gone else f"still running after {args.timeout:g} s")
    return EXIT_OK if gone else EXIT_FAILED


def workers(master: Master, args: argparse.Namespace, out: Callable[[str], None]) -> int:
    state = master.health_json()
    current, limit = state["workers_target"], state["workers_max"]
    if args.count is None:
        out(f"{current} workers (at most {limit})")
        return EXIT_OK
    if not 1 <= args.count <= limit:
        raise ControlError(f"workers {args.count}: choose 1 to {limit} (--max-workers of the master)", EXIT_USAGE)
    pid = master.pid()
    start = current
    while current != args.count:
        # One signal at a time: signals of one kind do not queue, so each step is confirmed.
        os.kill(pid, signal.SIGTTIN if args.count > current else signal.SIGTTOU)
        step_from = current
        if not _wait(lambda: master.health_json()["workers_target"] != step_from, SCALE_STEP_TIMEOUT):
            out(f"the master did not scale from {current} workers (see its log)")
            return EXIT_FAILED
        current = master.health_json()["workers_target"]
    out(f"workers: {start} -> {current}; waiting for them to serve")
    if _wait(lambda: _serving(master.health_json()) == args.count, args.timeout):
        out(f"{args.count} worker{'s serve' if args.count > 1 else ' serves'}")
        return EXIT_OK
    out(f"{_serving(master.health_json())} of {args.count} workers serve after {args.timeout:g} s (see the log)")
    return EXIT_FAILED


def _serving(state: Mapping[str, Any]) -> int:
    return sum(1 for w in state["workers"] if w["state"] == "serving")


def _wait(done: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL)
    return True


def describe(state: Mapping[str, Any]) -> str:
    """The health JSON as an operator reads it."""
    lines = [f"supervise {state.get('version', '')}  pid {state['pid']}  up {_age(state['uptime'])}  "
             f"status {state['status']}"]
    gen = state.get("generation")
    lines.append(f"generation {gen if gen is not None else '-'} serving; {state['available_workers']} of "
                 f"{state['workers_target']} workers available (at most {state['workers_max']})")
    for g in state.get("generations", []):
        if g["number"] != gen:
            lines.append(f"generation {g['number']} {g['state']} ({g['reason']}, {_age(g['age'])})")
    if state.get("workers"):
        lines.append("")
        unique = any("uss" in w for w in state["workers"])  # --preload, --max-memory: own and shared memory
        lines.append(f"{'worker':>6} {'gen':>4} {'pid':>8}  {'state':<9}{'requests':>9} {'busy':>4} "
                     f"{'rss':>8} {'heartbeat':>9}" + (f" {'uss':>8} {'shared':>8}" if unique else ""))
        for w in state["workers"]:
            rss = f"{w['rss'] / 1048576:.0f} MiB" if w.get("rss") else "-"
            memory = f" {_mib(w.get('uss')):>8} {_mib(w.get('shared')):>8}" if unique else ""
            lines.append(f"{w['worker']:>6} {w['generation']:>4} {w['pid']:>8}  {w['state']:<9}{w['requests']:>9} "
                         f"{w['busy']:>4} {rss:>8} {w['heartbeat_age']:>8.1f}s" + memory)
    for z in state.get("zygotes", []):
        threads = f"  threads at fork: {', '.join(z['threads_at_fork'])}" if z.get("threads_at_fork") else ""
        lines.append(f"zygote of generation {z['generation']}: pid {z['pid']} {z['state']}, uss {_mib(z.get('uss'))}, "
                     f"pss {_mib(z.get('pss'))}{threads}")
    if state.get("reloads"):
        lines.append("")
        lines.append("last reloads:")
        for r in reversed(state["reloads"]):
            phases = " ".join(f"{k} {v:.2f}s" for k, v in r.get("phases", {}).items())
            error = f"  {r['error']}" if r.get("error") else ""
            lines.append(f"  generation {r['generation']:<4} {r['trigger']:<24} {r['result']:<10} {phases:<26} "
                         f"{_age(r['seconds_ago'])} ago{error}")
    if state.get("consul"):
        lines.append("")
        lines.append("consul: " + ", ".join(f"{k} {v}" for k, v in state["consul"].items()))
    if state.get("shutdown") not in (None, "running"):
        lines.append(f"shutdown: {state['shutdown']}")
    return "\n".join(lines)


def _mib(value: int | None) -> str:
    return f"{value / 1048576:.0f} MiB" if value else "-"


def _age(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d"


# --------------------------------------------------------------------------- entry


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        raise ConfigError(f"{message} (see supervise {self.prog.split()[-1]} --help)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="supervise", description="Control a running supervise master.",
                     epilog="Exit codes: 0 done, 1 the operation failed, 2 bad usage, 6 no running master "
                            "found or reachable.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    helps = {"status": "Show the master's state (exit 1 when it is not healthy).",
             "reload": "Reload gracefully and wait until the new generation serves (exit 1 if the reload fails).",
             "stop": "Stop gracefully (withdraw, drain, exit) and wait until the master is gone.",
             "workers": "Show or change the worker count, live; it persists across reloads."}
    for name in COMMANDS:
        sub = commands.add_parser(name, help=helps[name], description=helps[name])
        settings.add_flags(sub, SHARED)
        if name == "status":
            sub.add_argument("--json", action="store_true", help="The raw health JSON.")
        if name == "reload":
            sub.add_argument("--no-wait", action="store_true", help="Send SIGHUP and return.")
        if name == "workers":
            sub.add_argument("count", nargs="?", type=_count, metavar="N", help="The new worker count.")
        if name != "status":
            sub.add_argument("--timeout", type=_duration, default=120.0, metavar="DURATION",
                             help="How long to wait for the result (default 120s).")
    return parser


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of workers")
    return int(text)


def _duration(text: str) -> float:
    try:
        return positive_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: Sequence[str], environ: Mapping[str, str], out: Callable[[str], None] = print) -> int:
    try:
        args = _parser().parse_args(list(argv))
        values = settings.values_of(args, SHARED, environ)
        health = values["health_bind"]
        master = Master(sockets.parse_address(health) if health else None, values["pid_file"])
        if master.health is not None and master.health.family == sockets.FD:
            raise ControlError(f"--health-bind {health} is a socket the master inherited: give its address",
                               EXIT_USAGE)
        return {"status": status, "reload": reload, "stop": stop, "workers": workers}[args.command](
            master, args, out)
    except ConfigError as exc:
        logs.error_line(str(exc))
        return EXIT_USAGE
    except ControlError as exc:
        logs.error_line(str(exc))
        return exc.code
    except PermissionError as exc:
        logs.error_line(f"cannot signal the master: {exc.strerror} (run as its user)")
        return EXIT_UNREACHABLE
    except ProcessLookupError:
        logs.error_line("the master exited")
        return EXIT_UNREACHABLE
