"""PID 1 duties: every orphan is reaped, inside a real PID namespace and as a subreaper."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from tests.harness import WAIT_EXIT, http_get, wait_until

UNSHARE = ["unshare", "--pid", "--fork", "--mount-proc"]
ORPHANS = 5


def _zombies(pid1: psutil.Process) -> list[psutil.Process]:
    out = []
    for child in pid1.children(recursive=True):
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                out.append(child)
        except psutil.NoSuchProcess:
            pass
    return out


def _namespace_init(unshare_pid: int) -> psutil.Process:
    return wait_until(lambda: (psutil.Process(unshare_pid).children() or [None])[0], timeout=10,
                      message="the namespace's PID 1")


def _adopters(code: Path) -> list[int]:
    return [int(p.read_text()) for p in code.glob("orphan.*") if p.read_text()]


@pytest.fixture(autouse=True)
def _needs_unshare():
    if subprocess.run([*UNSHARE, "true"], capture_output=True).returncode != 0:
        pytest.fail("unshare --pid --fork --mount-proc does not work here (needs root)")


def test_as_pid1_in_a_pid_namespace_orphans_are_reaped(supervise, app_dir):
    sv = supervise("app", "-w", "1", "--chdir", str(app_dir), "--no-watch", "--log-level", "debug",
                   prefix=UNSHARE).ready()
    assert sv.find("started")[0]["pid1"] is True
    init = _namespace_init(sv.pid)
    assert http_get(sv.port, f"/orphans?n={ORPHANS}")[0] == 200
    wait_until(lambda: len(_adopters(app_dir)) == ORPHANS, timeout=10, message="orphans to report their adopter")
    assert set(_adopters(app_dir)) == {1}, "orphans are re-parented to supervise, PID 1 of the namespace"
    sv.wait_for("orphan_reaped", count=ORPHANS, timeout=10)
    wait_until(lambda: not _zombies(init), timeout=5, message="no zombies")
    assert not _zombies(init)
    init.send_signal(signal.SIGTERM)  # unshare does not forward signals: stop PID 1 itself
    assert sv.wait(15) == 0  # unshare exits with its child's code
    assert sv.find("shutdown_finished")


NAIVE_INIT = WAIT_EXIT + textwrap.dedent("""
    import os, select, sys, time
    # A plain program as PID 1: it starts the same orphan-making code, waits for its own
    # child only, and never reaps what gets re-parented to it.
    for _ in range(int(sys.argv[1])):
        if os.fork() == 0:
            child = os.getpid()
            if os.fork() == 0:
                wait_exit(child)  # orphaned and re-parented: then exit
                os._exit(0)
            os._exit(0)
        os.wait()
    print("ready", flush=True)
    time.sleep(30)
""")


def test_negative_control_a_plain_pid1_leaves_zombies():
    proc = subprocess.Popen([*UNSHARE, sys.executable, "-c", NAIVE_INIT, str(ORPHANS)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        init = _namespace_init(proc.pid)
        zombies = wait_until(lambda: len(_zombies(init)) == ORPHANS and _zombies(init), timeout=10,
                             message="zombies under the naive PID 1")
        assert len(zombies) == ORPHANS  # the check the supervise test relies on does see zombies
    finally:
        proc.kill()
        proc.wait(10)


def test_not_pid1_becomes_a_subreaper_and_reaps_orphans(supervise, app_dir):
    sv = supervise("app", "-w", "1", "--chdir", str(app_dir), "--no-watch", "--log-level", "debug").ready()
    started = sv.find("started")[0]
    assert started["pid1"] is False and started["subreaper"] is True
    assert http_get(sv.port, f"/orphans?n={ORPHANS}")[0] == 200
    wait_until(lambda: len(_adopters(app_dir)) == ORPHANS, timeout=10, message="orphans to report their adopter")
    assert set(_adopters(app_dir)) == {sv.pid}, "orphans are re-parented to supervise, not to init"
    sv.wait_for("orphan_reaped", count=ORPHANS, timeout=10)
    assert not _zombies(psutil.Process(sv.pid))
    assert not sv.find("worker_exited"), "reaped orphans are never mistaken for workers"


def test_negative_control_without_subreaper_orphans_go_elsewhere(tmp_path):
    """The same orphan-making code under a plain parent: the orphans are adopted by someone
    else, so the adopter check above really tells subreaping apart."""
    code = WAIT_EXIT + textwrap.dedent(f"""
        import os, select, time
        os.chdir({str(tmp_path)!r})
        if os.fork() == 0:
            child = os.getpid()
            if os.fork() == 0:
                wait_exit(child)  # orphaned and re-parented: then say who adopted us
                open("orphan.%d" % os.getpid(), "w").write(str(os.getppid()))
                os._exit(0)
            os._exit(0)
        os.wait()
        print(os.getpid(), flush=True)
        time.sleep(5)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        parent = int(proc.stdout.readline())
        wait_until(lambda: _adopters(tmp_path), timeout=10, message="orphan to report")
        assert _adopters(tmp_path) != [parent]
    finally:
        proc.kill()
        proc.wait(10)
