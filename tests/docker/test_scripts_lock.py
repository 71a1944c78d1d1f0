"""No process started by the image scripts keeps their build lock (issue 16, item 1), without an engine.

The bug: scripts/image.sh held its lock on fd 9 and started dockerd through
scripts/docker-engine.sh; dockerd inherited fd 9 and held the lock for ever, so every later
build waited 900 s ("waiting for another scripts/image.sh run to finish").  Now image.sh starts
the engine before it takes the lock (with fd 9 closed), docker-engine.sh closes every inherited
descriptor for the daemon, and image.sh fails at once, naming the process, when the lock is held
by something that is not an image.sh run.  The real-engine version of this is
tests/docker/test_image_lock.py.

The daemon here is a stand-in `dockerd` first in PATH that records its pid and sleeps (it never
answers, so docker-engine.sh gives up after DOCKER_ENGINE_TIMEOUT); the scripts are the real ones.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.docker import procfs
from tests.harness import wait_until

NEEDS_ENGINE = False  # tests/docker/conftest.py: not a `docker` test (runs in make test-fast)

REPO = Path(__file__).resolve().parents[2]
IMAGE_SH = REPO / "scripts" / "image.sh"
ENGINE_SH = REPO / "scripts" / "docker-engine.sh"

pytestmark = pytest.mark.timeout(120)

# The old way (scripts/image.sh before the fix): take the lock on fd 9, then start a daemon
# that inherits it.  $1 = lock file, $2... = the daemon's command.  Prints the daemon's pid.
OLD_WAY = 'exec 9>"$1"; flock 9; shift; setsid nohup "$@" </dev/null >/dev/null 2>&1 & echo $!'


@pytest.fixture
def started():
    """Pids of processes a test started; each is killed (by pid) at teardown."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        procfs.kill_and_wait(pid)


@pytest.fixture
def fake_dockerd(tmp_path: Path) -> tuple[Path, Path]:
    """A directory to put first in PATH, holding a `dockerd` that writes its pid and sleeps, and a
    `docker` CLI that finds no engine (as the real one does while dockerd is not answering)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    pidfile = tmp_path / "fake-dockerd.pid"
    (bindir / "dockerd").write_text(f'#!/bin/sh\necho $$ > "{pidfile}"\nexec sleep 300\n')
    (bindir / "docker").write_text("#!/bin/sh\necho 'Cannot connect to the Docker daemon' >&2\nexit 1\n")
    for tool in ("dockerd", "docker"):
        (bindir / tool).chmod(0o755)
    return bindir, pidfile


def engine_env(tmp_path: Path, bindir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DOCKER_HOST", "DOCKERD_LOG")}
    # A private engine root: the machine's engine (and its pid file) are never looked at.
    env.update({"PATH": f"{bindir}:{env['PATH']}", "DOCKERD_ROOT": str(tmp_path / "eng"), "DOCKER_ENGINE_TIMEOUT": "2"})
    env.update(extra)
    return env


def test_negative_control_the_detector_flags_a_process_that_inherited_the_lock(tmp_path, started):
    lock = tmp_path / ".build.lock"
    out = subprocess.run(["bash", "-c", OLD_WAY, "old-image.sh", str(lock), "sleep", "300"],
                         capture_output=True, text=True, timeout=30, check=True)
    sleeper = int(out.stdout)
    started.append(sleeper)
    # The shell that took the lock has exited; the sleep it started holds the lock on its own.
    # `setsid nohup` execs into `sleep`; wait for that exec (a handshake, with a deadline).
    wait_until(lambda: procfs.holders(lock).get(sleeper) == "sleep 300", message="setsid nohup exec'd sleep")
    holders = procfs.holders(lock)
    assert sleeper in holders and holders[sleeper] == "sleep 300", holders
    assert not procfs.lock_is_free(lock)
    procfs.kill_and_wait(sleeper)
    assert procfs.holders(lock) == {} and procfs.lock_is_free(lock)


def test_image_sh_names_a_stray_lock_holder_at_once_instead_of_waiting(tmp_path, started):
    """What every build after the bug met: a lock held by a daemon.  image.sh (which waits its
    turn behind another image.sh run) now fails within seconds naming the culprit."""
    cache = tmp_path / "cache"
    cache.mkdir()
    lock = cache / ".build.lock"
    out = subprocess.run(["bash", "-c", OLD_WAY, "old-image.sh", str(lock), "sleep", "300"],
                         capture_output=True, text=True, timeout=30, check=True)
    sleeper = int(out.stdout)
    started.append(sleeper)
    env = {**os.environ, "SUPERVISE_CACHE": str(cache), "SUPERVISE_LOCK_TIMEOUT": "900"}
    began = time.monotonic()
    proc = subprocess.run(["bash", str(IMAGE_SH), "wheels"], capture_output=True, text=True, timeout=60, env=env)
    took = time.monotonic() - began
    assert proc.returncode != 0, proc.stderr
    assert f"held by pid {sleeper} (sleep 300), which is not a scripts/image.sh run" in proc.stderr, proc.stderr
    assert took < 20, f"took {took:.1f} s"
    assert not (cache / "context").exists()  # nothing was built without the lock


def test_image_sh_waits_for_a_real_image_sh_run(tmp_path, started):
    """The control of the previous test: a lock held by an image.sh run is waited for."""
    cache = tmp_path / "cache"
    cache.mkdir()
    lock = cache / ".build.lock"
    release = tmp_path / "release"
    # A stand-in for a running build: a shell whose command line names image.sh, holding the lock
    # until `release` exists.
    holder = subprocess.Popen(["bash", "-c", 'exec 9>"$1"; flock 9; echo locked; '
                               'until [ -e "$2" ]; do sleep 0.1; done; true', "scripts/image.sh", str(lock), str(release)],
                              stdout=subprocess.PIPE, text=True)
    started.append(holder.pid)
    assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
    env = {**os.environ, "SUPERVISE_CACHE": str(cache), "SUPERVISE_LOCK_TIMEOUT": "60"}
    waiter = subprocess.Popen(["bash", str(IMAGE_SH), "wheels"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                              text=True, env=env)
    try:
        assert waiter.stderr is not None
        first = waiter.stderr.readline()
        assert "waiting for another scripts/image.sh run to finish" in first and f"pid {holder.pid}" in first, first
        assert waiter.poll() is None  # still waiting while the holder holds the lock
        release.touch()
        rest = waiter.communicate(timeout=300)[1]
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()
    holder.wait(10)
    assert "build lock acquired after" in rest, rest
    assert waiter.returncode == 0, rest
    assert "wheelhouse ready in" in rest


def test_docker_engine_sh_gives_the_daemon_no_inherited_descriptor(tmp_path, fake_dockerd, started):
    bindir, pidfile = fake_dockerd
    lock = tmp_path / ".build.lock"
    # docker-engine.sh run by a caller that holds the lock on fd 9 (as image.sh did).
    proc = subprocess.run(["bash", "-c", 'exec 9>"$1"; flock 9; "$2"', "caller", str(lock), str(ENGINE_SH)],
                          capture_output=True, text=True, timeout=60, env=engine_env(tmp_path, bindir))
    pid = wait_until(lambda: pidfile.exists() and int(pidfile.read_text()), 10, "the fake dockerd's pid")
    started.append(pid)
    assert "starting dockerd" in proc.stderr, proc.stderr
    assert procfs.alive(pid)
    assert pid not in procfs.holders(lock) and procfs.lock_is_free(lock)
    fds = sorted(int(fd) for fd in os.listdir(f"/proc/{pid}/fd"))
    assert fds == [0, 1, 2], f"the daemon inherited descriptors {fds}"


def test_negative_control_the_same_daemon_started_the_old_way_holds_the_lock(tmp_path, fake_dockerd, started):
    bindir, pidfile = fake_dockerd
    lock = tmp_path / ".build.lock"
    out = subprocess.run(["bash", "-c", OLD_WAY, "old-image.sh", str(lock), str(bindir / "dockerd")],
                         capture_output=True, text=True, timeout=30, check=True)
    started.append(int(out.stdout))
    pid = wait_until(lambda: pidfile.exists() and int(pidfile.read_text()), 10, "the fake dockerd's pid")
    assert pid == int(out.stdout)
    assert pid in procfs.holders(lock) and not procfs.lock_is_free(lock)


def test_docker_engine_sh_without_pgrep_does_not_report_a_running_dockerd_as_exited(tmp_path, fake_dockerd, started):
    """A minimal Debian has no procps: the script once read a missing pgrep as "dockerd exited".
    A `pgrep` that fails as a missing one would is first in PATH; the script must not care."""
    bindir, pidfile = fake_dockerd
    (bindir / "pgrep").write_text("#!/bin/sh\nexit 127\n")
    (bindir / "pgrep").chmod(0o755)
    proc = subprocess.run([str(ENGINE_SH)], capture_output=True, text=True, timeout=60, env=engine_env(tmp_path, bindir))
    pid = wait_until(lambda: pidfile.exists() and int(pidfile.read_text()), 10, "the fake dockerd's pid")
    started.append(pid)
    assert proc.returncode == 1
    assert "did not answer within 2s" in proc.stderr, proc.stderr
    assert "exited" not in proc.stderr, proc.stderr
    assert procfs.alive(pid)


def test_negative_control_a_dockerd_that_exits_is_reported_with_its_status(tmp_path, fake_dockerd):
    bindir, _ = fake_dockerd
    (bindir / "dockerd").write_text("#!/bin/sh\necho 'failed to start daemon: fake' >&2\nexit 3\n")
    began = time.monotonic()
    proc = subprocess.run([str(ENGINE_SH)], capture_output=True, text=True, timeout=60,
                          env=engine_env(tmp_path, bindir, DOCKER_ENGINE_TIMEOUT="30"))
    assert proc.returncode == 1
    assert "dockerd exited (status 3)" in proc.stderr and "failed to start daemon: fake" in proc.stderr, proc.stderr
    assert time.monotonic() - began < 10  # noticed at once, not at the deadline
