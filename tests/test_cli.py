"""Bad input to supervise itself: one clear line on stderr, a documented exit code, no traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from tests.harness import ROOT, free_port, write_app

ENV = {"PYTHONPATH": str(ROOT), "SUPERVISE_LOG_FORMAT": "json", "PATH": "/usr/bin:/bin"}


def run(*args: str, cwd=None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "supervisor", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def one_clear_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and lines[0].startswith("supervise: error: ")
    return lines[0]


@pytest.mark.parametrize("args, needle", [
    (["app", "--bogus"], "unrecognized arguments: --bogus"),
    (["app", "--bind", "nonsense"], "invalid value for --bind"),
    (["app", "--bind", "[::1]:99999"], "port must be a number"),
    (["app", "--workers", "0"], "invalid value for --workers"),
    (["app", "--graceful-timeout", "soon"], "not a duration"),
    (["app:1bad"], "invalid value"),
    ([], "missing APP"),
    (["app", "--chdir", "/nonexistent/dir"], "is not a directory"),
    (["app", "--consul", "127.0.0.1:1", "--consul-check", "http"], "--health-bind"),
])
def test_bad_configuration_exits_2_with_one_line(args, needle):
    result = run(*args)
    assert result.returncode == 2
    assert needle in one_clear_line(result)


def test_port_in_use_exits_4(tmp_path):
    write_app(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("app", "--chdir", str(tmp_path), "--bind", f"127.0.0.1:{port}")
    assert result.returncode == 4
    assert "address already in use" in one_clear_line(result)


def test_unimportable_module_exits_3_within_boot_timeout_with_traceback_in_log(tmp_path):
    started = time.monotonic()
    result = run("no_such_module", "--chdir", str(tmp_path), "--bind", f"127.0.0.1:{free_port()}",
                 "--workers", "2", "--boot-timeout", "10")
    assert result.returncode == 3
    assert time.monotonic() - started < 10
    line = one_clear_line(result)
    assert "the app cannot boot: ModuleNotFoundError: No module named 'no_such_module'" in line
    assert "Traceback" in result.stdout  # the full traceback goes to the log


def test_app_raising_at_import_exits_3(tmp_path):
    write_app(tmp_path, extra='raise ValueError("bad config")')
    result = run("app", "--chdir", str(tmp_path), "--bind", f"127.0.0.1:{free_port()}")
    assert result.returncode == 3
    assert "ValueError: bad config" in one_clear_line(result)


def test_missing_callable_exits_3(tmp_path):
    write_app(tmp_path)
    result = run("app:nope", "--chdir", str(tmp_path), "--bind", f"127.0.0.1:{free_port()}")
    assert result.returncode == 3
    assert "has no attribute 'nope'" in one_clear_line(result)


def test_help_lists_every_setting_with_its_env_var():
    from supervisor.settings import SETTINGS

    result = run("--help")
    assert result.returncode == 0
    for s in SETTINGS:
        assert s.env[0] in result.stdout
        assert s.positional or s.flags[-1] in result.stdout


def test_port_zero_logs_the_real_port_and_unix_socket_serves(supervise, app_dir, tmp_path):
    import http.client
    import json

    path = tmp_path / "s.sock"
    sv = supervise("app", "--chdir", str(app_dir), "--no-watch", "-w", "1", "--bind", "127.0.0.1:0",
                   "--bind", f"unix:{path}").ready()
    bound = [e["address"] for e in sv.find("bound")]
    tcp = next(a for a in bound if a.startswith("127.0.0.1:"))
    assert not tcp.endswith(":0")
    conn = http.client.HTTPConnection("127.0.0.1", int(tcp.rsplit(":", 1)[1]), timeout=5)
    conn.request("GET", "/")
    assert conn.getresponse().read() == b"version=1"
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(path))
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert s.makefile("rb").read().endswith(b"version=1")
    assert json.loads(sv.raw[0])["event"] == "started"


def test_environment_configures_settings(supervise, app_dir):
    sv = supervise("app", "--chdir", str(app_dir), "--no-watch", env={"SUPERVISE_WORKERS": "3"}).ready()
    assert len(sv.find("worker_ready")) == 3
