"""`make image` after `make test` no longer hangs (issue 16, item 1), with a real engine.

scripts/image.sh starts the engine (scripts/docker-engine.sh), then builds under its lock.  The
bug: dockerd inherited the lock's fd 9 and held it for ever, and every later build waited 900 s.

The machine's engine is shared (other tests and people use it), so it is never stopped here.
Instead image.sh starts a private one through its ordinary code path: DOCKERD_ROOT makes
scripts/docker-engine.sh start (exactly as it starts the machine's) a dockerd whose data, socket
and pid file live in a temporary directory, in its own network and mount namespaces, so its
bridge and iptables rules never touch the machine's engine.  Against it: the engine started by
image.sh holds no descriptor on the lock (/proc/PID/fd), the lock is free, and a second build
right after is quick and does not wait.  The negative controls (a process that inherits the lock
the old way IS flagged, and image.sh names it instead of waiting) are in test_scripts_lock.py.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import tempfile
from pathlib import Path

import pytest

from tests.docker import procfs
from tests.docker.conftest import terminal_line
from tests.docker.helpers import run_image_sh
from tests.harness import wait_until

pytestmark = [pytest.mark.docker, pytest.mark.timeout(1200)]

SHARED_CACHE = Path(os.environ.get("SUPERVISE_CACHE", "/var/cache/supervise"))
# Keeps the base rootfs tarball between runs (a cold mmdebstrap takes 30-60 s).
TEST_CACHE = SHARED_CACHE / "lock-test"

# One line per step, each with its duration (issue 16, item 4).
STEP_LINES = [
    r"image: engine ready in \d+\.\d s",
    r"image: base image localbase/python:bookworm (present \(\d+\.\d s\)|built in \d+\.\d s)",
    r"image: wheelhouse ready in \d+\.\d s",
    r"image: docker build done in \d+\.\d s",
    r"image: built supervise:latest \(\w+, supervise [^)]+\) in \d+\.\d s",
]


def _ours(pid: int, root: Path) -> bool:
    return str(root) in procfs.cmdline(pid)


def _stop_private_engine(root: Path) -> None:
    """Stop the dockerd started under `root` (and its containerd), by pid, never any other."""
    pidfile = root / "docker.pid"
    if pidfile.exists():
        pid = int(pidfile.read_text().strip() or 0)
        if pid and procfs.comm(pid) == "dockerd" and _ours(pid, root):
            os.kill(pid, signal.SIGTERM)
            try:
                wait_until(lambda: not procfs.alive(pid), 30, "the private dockerd to stop", interval=0.1)
            except AssertionError:
                procfs.kill_and_wait(pid)
    for entry in os.listdir("/proc"):  # a containerd or shim it left behind
        if entry.isdigit() and _ours(int(entry), root) and procfs.alive(int(entry)):
            procfs.kill_and_wait(int(entry))


@pytest.fixture
def private_engine():
    """DOCKERD_ROOT for scripts/docker-engine.sh: a short path (unix socket paths are limited)."""
    root = Path(tempfile.mkdtemp(prefix="sv-engine-", dir="/tmp"))
    try:
        yield root
    finally:
        _stop_private_engine(root)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def build_cache():
    """A cache dir of this test's own (its own lock, nobody else's builds), seeded with the base
    rootfs tarball when one exists; a tarball built here is kept for the next run."""
    TEST_CACHE.mkdir(parents=True, exist_ok=True)
    cache = Path(tempfile.mkdtemp(prefix="run-", dir=TEST_CACHE))
    for source in (SHARED_CACHE, TEST_CACHE):
        for tarball in source.glob("rootfs-bookworm-python-*.tar"):
            if not (cache / tarball.name).exists():
                os.link(tarball, cache / tarball.name)
    try:
        yield cache
    finally:
        for tarball in cache.glob("rootfs-bookworm-python-*.tar"):
            if not (TEST_CACHE / tarball.name).exists():
                for old in TEST_CACHE.glob("rootfs-bookworm-python-*.tar"):
                    old.unlink()
                os.link(tarball, TEST_CACHE / tarball.name)
        shutil.rmtree(cache, ignore_errors=True)


def test_engine_started_by_image_sh_holds_no_lock_and_the_next_build_does_not_wait(private_engine, build_cache,
                                                                                    pytestconfig):
    say = terminal_line(pytestconfig)
    env = {k: v for k, v in os.environ.items() if k != "DOCKER_HOST"}
    env.update(DOCKERD_ROOT=str(private_engine), SUPERVISE_CACHE=str(build_cache))
    lock = build_cache / ".build.lock"

    say("[lock] scripts/image.sh build with a private engine it starts itself (first build: ~30-90 s)")
    first = run_image_sh("build", env=env, timeout=900, on_line=lambda line: say(f"[lock]   {line}"))
    assert first.returncode == 0, first.stderr
    assert "docker-engine: starting dockerd" in first.stderr, first.stderr  # this run started it
    dockerd = int((private_engine / "docker.pid").read_text())
    assert procfs.comm(dockerd) == "dockerd" and procfs.alive(dockerd)

    # The detector: after the build, nothing has the lock open, and in particular not dockerd.
    holders = procfs.holders(lock)
    assert dockerd not in holders, f"dockerd (pid {dockerd}) inherited the build lock: {holders}"
    assert holders == {}, f"processes still holding {lock}: {holders}"
    assert procfs.lock_is_free(lock)
    for step in STEP_LINES:
        assert re.search(step, first.stderr), f"no line matching {step!r} in:\n{first.stderr}"

    second = run_image_sh("build", env=env, timeout=300, on_line=lambda line: say(f"[lock]   {line}"))
    assert second.returncode == 0, second.stderr
    assert "waiting for another" not in second.stderr, second.stderr
    assert "starting dockerd" not in second.stderr  # the same engine, found answering
    assert second.seconds < 60, f"second build took {second.seconds:.1f} s:\n{second.stderr}"
    for step in STEP_LINES:
        assert re.search(step, second.stderr), f"no line matching {step!r} in:\n{second.stderr}"
    assert procfs.holders(lock) == {} and procfs.lock_is_free(lock)
    say(f"[lock] first build {first.seconds:.1f} s, second {second.seconds:.1f} s; dockerd {dockerd} holds no lock")
