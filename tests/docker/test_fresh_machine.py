"""The README's first hour on a fresh Debian (issue 16, item 2), in a container.

The "fresh machine" is a true minimal bookworm (mmdebstrap --variant=minbase: no python3, no
make, no procps), built by `scripts/image.sh minbase` from the host's own Debian mirror like the
base image.  Into it goes `git archive HEAD` (what a fresh clone has), and then:

1. with only `make` installed, `make demo` stops at once with one line naming python3 and the
   README's apt-get line; with `python3` but not python3-venv, the line names python3-venv
   (the negative controls of the prerequisites check: no venv is created);
2. the README's apt-get line, exactly as the README shows it, then `make check-prereqs` passes;
3. `PORT=8123 make demo` (as the README documents it): it installs .venv, serves on 8123 with
   health on 8124 (the echoed URLs show the real ports), the pid it prints is supervise's master,
   and SIGTERM to that pid stops it with make exiting 0;
4. `make test-fast` passes.

How the container reaches the network, as the host does:
- apt: the rootfs carries the host's mirror (scripts/lib/mirror.sh wrote it into
  /etc/apt/sources.list.d/) and the host's Acquire:: options (/etc/apt/apt.conf.d/99mmdebstrap).
  Plain HTTP to the mirror works from a container through Docker's NAT.
- PyPI: this machine reaches it only through an HTTPS-intercepting proxy whose CA exists on the
  host alone (pip in a container fails "self-signed certificate in certificate chain"), so the
  host's CA bundle is bind-mounted read-only at /host-ca/ and named by PIP_CERT, the variable
  the host itself sets.  An ordinary machine needs none of this (ca-certificates comes with
  python3-venv).  Nothing else of the host's pip configuration (local indexes) is passed in.
- `make test-fast` runs PID-namespace and user-namespace tests (unshare) that need root on a
  real machine: the container gets CAP_SYS_ADMIN and no seccomp filter.  (Not --privileged:
  this VM cannot grant it, its capability bounding set lacks CAP_SYS_RESOURCE.)  docker-init
  (--init) is PID 1 and reaps what the tests orphan.
"""

from __future__ import annotations

import os
import re
import ssl
import subprocess
import time
import uuid

import pytest

from tests.docker import helpers
from tests.docker.conftest import terminal_line
from tests.harness import wait_until

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(3000)]

REPO = helpers.REPO
MINBASE = os.environ.get("SUPERVISE_MINBASE", "localbase/debian:bookworm-minbase")
PORT = 8123


def host_ca_bundle() -> str:
    for candidate in (os.environ.get("PIP_CERT"), os.environ.get("REQUESTS_CA_BUNDLE"),
                      ssl.get_default_verify_paths().cafile, "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and os.path.isfile(candidate):
            return candidate
    pytest.fail("no CA bundle on the host to give the container (PIP_CERT, /etc/ssl/certs/ca-certificates.crt)")


class Machine:
    def __init__(self, name: str, say) -> None:
        self.name = name
        self.say = say

    def sh(self, script: str, timeout: float, workdir: str = "/src") -> subprocess.CompletedProcess:
        """bash -c SCRIPT in the container as root, with a deadline."""
        try:
            return subprocess.run(["docker", "exec", "-w", workdir, self.name, "bash", "-c", script],
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"{script!r} did not finish within {timeout:.0f} s:\n{(exc.stdout or b'')[-3000:]!r}"
                                 ) from None

    def step(self, what: str, script: str, timeout: float, ok: bool = True) -> subprocess.CompletedProcess:
        began = time.monotonic()
        proc = self.sh(script, timeout)
        self.say(f"[fresh] {what}: exit {proc.returncode} in {time.monotonic() - began:.1f} s")
        if ok:
            assert proc.returncode == 0, f"{what} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        return proc

    def get(self, port: int, path: str) -> str:
        """GET from inside the container (the demo binds 127.0.0.1 there)."""
        proc = self.sh(f"python3 -c \"import urllib.request as u; r = u.urlopen('http://127.0.0.1:{port}{path}', "
                       f"timeout=3); print(r.status); print(r.read().decode())\"", timeout=30)
        return proc.stdout if proc.returncode == 0 else ""


@pytest.fixture
def machine(pytestconfig):
    say = terminal_line(pytestconfig)
    run = helpers.run_image_sh("minbase", timeout=900, on_line=lambda line: say(f"[fresh]   {line}"))
    assert run.returncode == 0, run.stderr
    client = helpers.docker_client()
    name = f"supervise-fresh-{uuid.uuid4().hex[:8]}"
    ca = host_ca_bundle()
    container = client.containers.create(
        MINBASE, ["sleep", "infinity"], name=name, detach=True, init=True,
        cap_add=["SYS_ADMIN"], security_opt=["seccomp=unconfined"], labels={helpers.LABEL: "1"},
        environment={"DEBIAN_FRONTEND": "noninteractive", "PIP_CERT": "/host-ca/ca-certificates.crt",
                     "PIP_DEFAULT_TIMEOUT": "60", "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
        volumes={ca: {"bind": "/host-ca/ca-certificates.crt", "mode": "ro"}})
    try:
        container.start()
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=30, check=True).stdout.strip()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", "HEAD"], capture_output=True,
                                 timeout=60, check=True).stdout
        container.exec_run(["mkdir", "-p", "/src"])
        assert container.put_archive("/src", archive)
        say(f"[fresh] {MINBASE} container {name} with git archive HEAD ({commit}) in /src")
        yield Machine(name, say)
    finally:
        container.remove(force=True)


def prereq_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("prereqs:")]


def test_readme_commands_on_a_fresh_minimal_bookworm(machine):
    readme = machine.sh("cat README.md", 30).stdout
    apt_line = next(line for line in readme.splitlines() if line.startswith("apt-get ")).split("#")[0].strip()
    begun = time.monotonic()

    # 1. Negative controls: the check names what is missing, in one line, and stops make.
    assert machine.sh("command -v make python3 ps pgrep", 30).stdout == ""  # truly minimal
    machine.step("apt-get install make (only)", "apt-get update -q && apt-get install -y -q make", 600)
    proc = machine.step("make demo without python3", "make demo", 120, ok=False)
    assert proc.returncode != 0
    assert prereq_lines(proc) == [
        f"prereqs: missing python3 procps (no python3, no ps/pgrep); run first: {apt_line}"], proc.stderr
    machine.step("apt-get install python3 (no python3-venv)", "apt-get install -y -q python3", 600)
    proc = machine.step("make demo without python3-venv", "make demo", 120, ok=False)
    assert proc.returncode != 0
    assert prereq_lines(proc) == [f"prereqs: missing python3-venv procps (python3 has no venv/ensurepip, "
                                  f"no ps/pgrep); run first: {apt_line}"], proc.stderr
    assert machine.sh("test -e .venv", 30).returncode == 1

    # 2. The README's line, as written.
    machine.step(f"README: {apt_line}", apt_line, 900)
    proc = machine.step("make check-prereqs", "make check-prereqs", 60)
    assert prereq_lines(proc) == []

    # 3. PORT=... make demo: answers on its port, health on the next, stops on SIGTERM to its pid.
    began = time.monotonic()
    machine.sh(f"rm -f /tmp/demo.rc; (PORT={PORT} make demo >/tmp/demo.log 2>&1; echo $? >/tmp/demo.rc) "
               ">/dev/null 2>&1 </dev/null & disown", 30)

    def demo_state() -> str:
        if machine.sh("test -e /tmp/demo.rc", 30).returncode == 0:
            return "exited"
        return "up" if machine.get(PORT, "/").startswith("200") else ""

    state = wait_until(demo_state, 1200, f"make demo to answer on {PORT}", interval=1.0)
    log = machine.sh("cat /tmp/demo.log", 30).stdout
    assert state == "up", f"make demo exited:\n{log[-4000:]}"
    machine.say(f"[fresh] PORT={PORT} make demo answered after {time.monotonic() - began:.1f} s (with .venv install)")
    assert "hello from supervise" in machine.get(PORT, "/")
    assert machine.get(PORT + 1, "/health").startswith("200")
    assert f"supervise demo: http://127.0.0.1:{PORT}/  (health: http://127.0.0.1:{PORT + 1}/health)" in log, log
    pid = int(re.search(r"kill -HUP (\d+)", log).group(1))
    cmdline = machine.sh(f"tr '\\0' ' ' </proc/{pid}/cmdline", 30).stdout
    assert cmdline.strip() == "supervise: master app", cmdline  # the master's title (setproctitle)
    machine.sh(f"kill -TERM {pid}", 30)
    wait_until(lambda: machine.sh("cat /tmp/demo.rc", 30).stdout.strip(), 60, "make demo to exit after SIGTERM",
               interval=0.5)
    assert machine.sh("cat /tmp/demo.rc", 30).stdout.strip() == "0", machine.sh("tail -30 /tmp/demo.log", 30).stdout
    assert machine.get(PORT, "/") == ""

    # 4. make test-fast.
    proc = machine.step("make test-fast", "make test-fast 2>&1", 2400, ok=False)
    summary = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    machine.say(f"[fresh] make test-fast: {summary}")
    assert proc.returncode == 0, proc.stdout[-8000:]
    assert re.search(r"\d+ passed", summary) and "failed" not in summary and "error" not in summary, summary
    machine.say(f"[fresh] whole flow: {time.monotonic() - begun:.1f} s")
