"""A real, throwaway Consul agent for the tests (a test helper, not a product module).

`ConsulAgent` runs `consul agent -dev` on loopback with free ports, no gRPC and no update
check, and offers the few queries the tests need.  `-dev` keeps everything in memory, so
`restart()` (kill, start again on the same ports) is a real "agent lost all state" fault.

Fixtures, for tests/conftest.py::

    from tests.consul_agent import consul_binary, consul_agent  # noqa: F401

`consul_binary` (session) runs scripts/fetch-consul.sh once and fails the test loudly when
the binary cannot be had; `consul_agent` (function) yields a started `ConsulAgent` and kills it
afterwards.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import signal
import socket
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
from tests.harness import wait_until  # noqa: F401  (one deadline helper for every test)

REPO = Path(__file__).resolve().parent.parent
FETCH_SCRIPT = REPO / "scripts" / "fetch-consul.sh"



# --------------------------------------------------------------------------- waiting


@functools.lru_cache(maxsize=None)
def _fetch() -> tuple[str | None, str]:
    """(path, "") or (None, error).  Cached: the script runs once per session."""
    if not FETCH_SCRIPT.exists():
        return None, f"{FETCH_SCRIPT} is missing"
    try:
        proc = subprocess.run(["bash", str(FETCH_SCRIPT)], capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return None, f"{FETCH_SCRIPT} took longer than 600 s"
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines or not os.access(lines[-1], os.X_OK):
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        return None, f"{FETCH_SCRIPT.name} failed (exit {proc.returncode}):\n{tail}"
    return lines[-1], ""


def fetch_consul_binary() -> str:
    """Path of the Consul binary; `pytest.fail` (never skip) when it cannot be fetched."""
    path, error = _fetch()
    if path is None:
        pytest.fail(f"cannot get a Consul binary for the consul tests: {error}", pytrace=False)
    return path


# --------------------------------------------------------------------------- ports


def _free_port() -> int:
    """A loopback port currently free for both TCP and UDP (DNS and Serf use both)."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                    udp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port")


def _free_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = _free_port()
        if port not in ports:
            ports.append(port)
    return ports


# --------------------------------------------------------------------------- agent


class ConsulAgent:
    """`consul agent -dev` on 127.0.0.1 with its own free ports."""

    START_TIMEOUT = 30.0

    def __init__(self, binary: str, log_dir: str | None = None, hcl: tuple[str, ...] = ()) -> None:
        """`hcl`: extra configuration snippets, e.g. an `acl { ... }` block."""
        self.binary = binary
        self.hcl = tuple(hcl)
        self.http_port, self.dns_port, self.serf_lan_port, self.serf_wan_port, self.server_port = _free_ports(5)
        self._log_dir = Path(log_dir or tempfile.mkdtemp(prefix="consul-agent-"))
        self._log_path = self._log_dir / f"consul-{self.http_port}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    # ---------------------------------------------------------------- addresses

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def http(self) -> str:
        return f"http://{self.addr}"

    # ---------------------------------------------------------------- life cycle

    def _command(self) -> list[str]:
        return [
            self.binary, "agent", "-dev",
            "-bind=127.0.0.1", "-client=127.0.0.1", "-advertise=127.0.0.1",
            f"-http-port={self.http_port}", f"-dns-port={self.dns_port}",
            f"-serf-lan-port={self.serf_lan_port}", f"-serf-wan-port={self.serf_wan_port}",
            f"-server-port={self.server_port}", "-grpc-port=-1",
            "-hcl", "disable_update_check = true",
            *(arg for snippet in self.hcl for arg in ("-hcl", snippet)),
        ]

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> "ConsulAgent":
        """Start the agent (on this object's ports) and wait until it has a leader."""
        if self.running:
            return self
        self.starts += 1
        log = open(self._log_path, "ab")
        log.write(f"\n===== start #{self.starts}: {' '.join(self._command())}\n".encode())
        log.flush()
        try:
            self._proc = subprocess.Popen(
                self._command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()
        try:
            wait_until(self._has_leader, self.START_TIMEOUT, f"the Consul agent on {self.addr} to elect a leader")
        except AssertionError as exc:
            self.stop()
            raise AssertionError(f"{exc}\n--- agent log tail ---\n{self.log_tail()}") from None
        return self

    def _has_leader(self) -> bool:
        if self._proc is None or self._proc.poll() is not None:
            raise AssertionError(f"consul agent exited with {self._proc.returncode if self._proc else None}")
        with urllib.request.urlopen(f"{self.http}/v1/status/leader", timeout=2) as resp:
            return bool(json.loads(resp.read() or b'""'))

    def stop(self) -> None:
        """Kill the agent (SIGKILL: no graceful leave, all in-memory state gone)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=10)

    def restart(self) -> "ConsulAgent":
        """Kill and start again on the same ports: the agent lost all its state."""
        self.stop()
        return self.start()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self._log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> "ConsulAgent":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------- queries

    token: str | None = None  # sent as X-Consul-Token by the query helpers when set

    def request(self, method: str, path: str, body: bytes | None = None, timeout: float = 5.0) -> tuple[int, Any]:
        """(status, decoded JSON or text).  HTTP errors are returned, not raised."""
        req = urllib.request.Request(f"{self.http}{path}", data=body, method=method)
        if self.token:
            req.add_header("X-Consul-Token", self.token)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        text = raw.decode("utf-8", "replace")
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def _get_json(self, path: str) -> Any:
        status, data = self.request("GET", path)
        if status != 200:
            raise AssertionError(f"GET {path}: {status} {data}")
        return data

    def passing(self, service: str) -> list[dict[str, Any]]:
        """GET /v1/health/service/NAME?passing: instances whose checks all pass."""
        return self._get_json(f"/v1/health/service/{urllib.parse.quote(service)}?passing")

    def instances(self, service: str) -> list[dict[str, Any]]:
        """GET /v1/health/service/NAME: every instance, whatever its checks say."""
        return self._get_json(f"/v1/health/service/{urllib.parse.quote(service)}")

    def checks(self, service: str) -> list[dict[str, Any]]:
        """GET /v1/health/checks/NAME: the checks of every instance of the service."""
        return self._get_json(f"/v1/health/checks/{urllib.parse.quote(service)}")

    def services(self) -> dict[str, Any]:
        """GET /v1/agent/services: services registered with this agent, by ID."""
        return self._get_json("/v1/agent/services")

    def kv_put(self, key: str, value: str | bytes) -> None:
        data = value.encode() if isinstance(value, str) else value
        status, body = self.request("PUT", f"/v1/kv/{urllib.parse.quote(key)}", data)
        if status != 200 or body is not True:
            raise AssertionError(f"PUT /v1/kv/{key}: {status} {body}")

    def kv_delete(self, key: str, recurse: bool = False) -> None:
        suffix = "?recurse" if recurse else ""
        status, body = self.request("DELETE", f"/v1/kv/{urllib.parse.quote(key)}{suffix}")
        if status != 200:
            raise AssertionError(f"DELETE /v1/kv/{key}: {status} {body}")

    def kv_get(self, key: str) -> str | None:
        status, body = self.request("GET", f"/v1/kv/{urllib.parse.quote(key)}")
        if status == 404:
            return None
        if status != 200:
            raise AssertionError(f"GET /v1/kv/{key}: {status} {body}")
        value = body[0]["Value"]
        return None if value is None else base64.b64decode(value).decode()


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def consul_binary() -> str:
    """Path of a Consul 1.8.7 binary (scripts/fetch-consul.sh, run once per session)."""
    return fetch_consul_binary()


@pytest.fixture
def consul_agent(consul_binary: str, tmp_path: Path) -> Iterator[ConsulAgent]:
    """A fresh, started dev agent for one test, killed afterwards."""
    agent = ConsulAgent(consul_binary, log_dir=str(tmp_path))
    agent.start()
    try:
        yield agent
    finally:
        agent.stop()
