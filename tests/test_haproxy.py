"""Behind a real HAProxy (Debian's package): the app sees the real client address, with
X-Forwarded-For and with the PROXY protocol v2.  The client connects from 127.0.0.2, HAProxy
and supervise talk over 127.0.0.1 (the trusted proxy)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.harness import free_port, wait_until

APPS = Path(__file__).resolve().parent / "apps"
CLIENT = "127.0.0.2"
pytestmark = pytest.mark.haproxy


def haproxy_binary() -> str:
    """HAProxy from Debian's package (installed here when missing and root, as CI does)."""
    found = shutil.which("haproxy") or (os.path.exists("/usr/sbin/haproxy") and "/usr/sbin/haproxy")
    if not found and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "haproxy"],
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, capture_output=True, check=False)
        found = shutil.which("haproxy") or (os.path.exists("/usr/sbin/haproxy") and "/usr/sbin/haproxy")
    if not found:
        pytest.fail("haproxy is not installed (apt-get install haproxy)")
    return str(found)


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator[Any]:
    """start(backends) -> {frontend name: port}: HAProxy in the foreground on loopback."""
    procs: list[subprocess.Popen] = []

    def start(backends: dict[str, str]) -> dict[str, int]:
        ports = {name: free_port() for name in backends}
        cfg = ["global", "  maxconn 256", "defaults", "  mode http", "  timeout connect 2s",
               "  timeout client 10s", "  timeout server 10s"]
        for name, server_line in backends.items():
            cfg += [f"frontend fe_{name}", f"  bind 127.0.0.1:{ports[name]}", f"  bind {CLIENT}:{ports[name]}",
                    f"  default_backend be_{name}", f"backend be_{name}", f"  {server_line}"]
        path = tmp_path / "haproxy.cfg"
        path.write_text("\n".join(cfg) + "\n")
        proc = subprocess.Popen([haproxy_binary(), "-f", str(path), "-db"], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        procs.append(proc)
        for port in ports.values():
            wait_until(lambda: socket.create_connection((CLIENT, port), timeout=1).close() or True,
                       timeout=10, message="haproxy listening")
        return ports

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(10)


def seen_through(port: int, headers: str = "") -> dict[str, Any]:
    with socket.create_connection((CLIENT, port), timeout=10, source_address=(CLIENT, 0)) as sock:
        client_port = sock.getsockname()[1]
        sock.sendall(f"GET / HTTP/1.1\r\nHost: app.example\r\nConnection: close\r\n{headers}\r\n".encode())
        raw = b""
        while data := sock.recv(65536):
            raw += data
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), raw[:300]
    return {**json.loads(body), "client_port": client_port}


def test_x_forwarded_for_from_haproxy_gives_the_real_client(supervise, haproxy):
    sv = supervise("echo", "-w", "1", "--chdir", str(APPS), "--no-watch", "--forwarded-allow-ips", "127.0.0.1").ready()
    ports = haproxy({"xff": f"option forwardfor\n  server app 127.0.0.1:{sv.port}"})
    seen = seen_through(ports["xff"], headers="X-Forwarded-For: 6.6.6.6\r\n")  # a forgery by the client
    assert seen["remote_addr"] == CLIENT, seen
    assert "6.6.6.6" in seen["headers"]["HTTP_X_FORWARDED_FOR"], "the app still sees the whole chain"


def test_negative_control_an_untrusted_proxy_is_not_believed(supervise, haproxy):
    sv = supervise("echo", "-w", "1", "--chdir", str(APPS), "--no-watch", "--forwarded-allow-ips", "10.9.9.9").ready()
    ports = haproxy({"xff": f"option forwardfor\n  server app 127.0.0.1:{sv.port}"})
    assert seen_through(ports["xff"])["remote_addr"] == "127.0.0.1"  # HAProxy's own address


def test_proxy_protocol_v2_from_haproxy_gives_the_real_client(supervise, haproxy):
    sv = supervise("echo", "-w", "1", "--chdir", str(APPS), "--no-watch", "--forwarded-allow-ips", "127.0.0.1",
                   "--proxy-protocol", "v2").ready()
    ports = haproxy({"pp": f"server app 127.0.0.1:{sv.port} send-proxy-v2"})
    seen = seen_through(ports["pp"])
    assert seen["remote_addr"] == CLIENT and seen["remote_port"] == str(seen["client_port"]), seen


def test_negative_control_a_required_proxy_header_that_is_missing_closes_the_connection(supervise):
    sv = supervise("echo", "-w", "1", "--chdir", str(APPS), "--no-watch", "--proxy-protocol", "v2").ready()
    with socket.create_connection(("127.0.0.1", sv.port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536) == b""
    assert "malformed PROXY protocol header" in sv.wait_for("proxy_protocol_error")["error"]
