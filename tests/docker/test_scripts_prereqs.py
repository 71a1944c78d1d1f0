"""What a fresh Debian needs before `make demo` / `make test` (issue 16, items 2 and 7), without an engine.

scripts/lib/prereqs.sh is the one list: the README's apt-get line, the Makefile's check and
.ci/run all come from it.  Missing pieces are simulated with stand-ins first in PATH / PYTHON
(a python without ensurepip, as Debian's python3 without python3-venv; an old python; no procps).
The real thing, on a minimal bookworm in a container, is tests/docker/test_fresh_machine.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

NEEDS_ENGINE = False  # tests/docker/conftest.py: not a `docker` test (runs in make test-fast)

REPO = Path(__file__).resolve().parents[2]
PREREQS = REPO / "scripts" / "lib" / "prereqs.sh"

pytestmark = pytest.mark.timeout(60)


def prereqs(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(PREREQS), *args], capture_output=True, text=True, timeout=30,
                          env={**os.environ, **(env or {})})


def apt_line() -> str:
    return prereqs("apt-line").stdout.strip()


def readme_apt_line() -> str:
    lines = [line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("apt-get ")]
    assert lines, "the README shows no apt-get line"
    return lines[0].split("#")[0].strip()


def real_python() -> str:
    """This interpreter's own binary (not a venv or pyenv shim: it must run with any PATH)."""
    return os.path.realpath(sys.executable)


def stand_in(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(0o755)
    return path


def test_readme_ci_and_check_share_one_package_list():
    assert apt_line() == "apt-get update && apt-get install -y make python3 python3-venv procps"
    assert readme_apt_line() == apt_line()
    assert "scripts/lib/prereqs.sh apt-line" in (REPO / ".ci" / "run").read_text()


def test_this_machine_has_them():
    proc = prereqs("check", env={"PYTHON": real_python()})
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def one_line_naming(proc: subprocess.CompletedProcess, *missing: str) -> str:
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"prereqs: missing {' '.join(missing)} ("), lines[0]
    assert lines[0].endswith(f"run first: {apt_line()}") or "sudo apt-get" in lines[0], lines[0]
    return lines[0]


def test_no_python(tmp_path):
    one_line_naming(prereqs("check", env={"PYTHON": str(tmp_path / "python3")}), "python3")


def test_python_without_venv_is_debians_python3_without_python3_venv(tmp_path):
    """Debian's python3 without python3-venv: `import ensurepip` fails (the module lives in
    python3.11-venv), and `python3 -m venv` would fail half-way."""
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "ensurepip.py").write_text("raise ImportError(\"No module named 'ensurepip'\")\n")
    python = stand_in(tmp_path, "python3", f'#!/bin/sh\nPYTHONPATH="{blocked}" exec "{real_python()}" "$@"\n')
    line = one_line_naming(prereqs("check", env={"PYTHON": str(python)}), "python3-venv")
    assert "has no venv/ensurepip" in line


def test_old_python(tmp_path):
    python = stand_in(tmp_path, "python3", "#!/bin/sh\necho 3.9\nexit 1\n")
    proc = prereqs("check", env={"PYTHON": str(python)})
    assert proc.returncode == 1
    assert "is Python 3.9; supervise needs Python >= 3.11" in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_no_procps(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("bash", "make", "id", "sed"):  # what prereqs.sh runs, and no ps/pgrep
        os.symlink(shutil.which(tool), bindir / tool)
    proc = subprocess.run([shutil.which("bash"), str(PREREQS), "check"], capture_output=True, text=True, timeout=30,
                          env={"PATH": str(bindir), "PYTHON": real_python()})
    assert "ps/pgrep" in one_line_naming(proc, "procps")


def test_make_demo_stops_at_the_check_before_creating_anything(tmp_path):
    venv = tmp_path / "venv"
    proc = subprocess.run(["make", "-C", str(REPO), "demo", f"PYTHON={tmp_path / 'python3'}", f"VENV={venv}"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert [line for line in proc.stderr.splitlines() if line.startswith("prereqs:")] == [
        f"prereqs: missing python3 (no {tmp_path / 'python3'}); run first: {apt_line()}"], proc.stderr
    assert not venv.exists()


def test_make_demo_echoes_the_real_ports():
    """`make demo` printed "health: http://127.0.0.1:$$((8000+1))/health" (unexpanded)."""
    out = subprocess.run(["make", "-s", "-n", "-C", str(REPO), "demo", "PORT=9000"], capture_output=True, text=True,
                         timeout=30).stdout
    echo = next(line for line in out.splitlines() if "supervise demo:" in line)
    assert "http://127.0.0.1:9000/" in echo and "http://127.0.0.1:9001/health" in echo, echo
    demo = out[out.index("supervise demo:"):]  # the demo's own recipe (a stale .venv adds the install's)
    assert "$((" not in demo and "--health-bind 127.0.0.1:9001" in demo, out
    # PORT from the environment (as the README shows it) and HEALTH_PORT chosen apart.
    out = subprocess.run(["make", "-s", "-n", "-C", str(REPO), "demo"], capture_output=True, text=True, timeout=30,
                         env={**os.environ, "PORT": "9100", "HEALTH_PORT": "9200"}).stdout
    assert re.search(r"127\.0\.0\.1:9100/ .*127\.0\.0\.1:9200/health", out) and "--health-bind 127.0.0.1:9200" in out
