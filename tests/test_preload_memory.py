"""--preload and --max-memory with a heavy app (real processes, measured with psutil).

* With --preload, four workers share the zygote's ~200 MB heap: their unique memory (USS) adds up
  to at most 25 % of four copies of the heap; without --preload (the comparison, in the same
  run) each worker holds its own copy.
* Under a cgroup memory limit that cannot hold two generations, a reload falls back to rolling
  and nothing is OOM-killed (negative control: with the budget switched off, the full overlap
  does not fit and the kernel kills).
"""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import psutil
import pytest

from tests.harness import ROOT, SUPERVISE, http_get, wait_until, write_app

MiB = 1 << 20


def heavy(entries: int) -> str:
    """Module-level code of an app whose import allocates entries * ~150 bytes of Python objects
    and burns ~1 s of CPU."""
    return f'''
_t0 = time.process_time()
DATA = [("x%d" % i, i) for i in range({entries})]
while time.process_time() - _t0 < 1.0:
    pass
'''


def _workers(sv) -> list[psutil.Process]:
    out = []
    for child in psutil.Process(sv.pid).children():
        try:
            if "supervise: worker g" in " ".join(child.cmdline()):
                out.append(child)
        except psutil.Error:
            pass
    return out


def _uss(procs: list[psutil.Process]) -> list[int]:
    return [p.memory_full_info().uss for p in procs]


def _boot(supervise, code: Path, *extra: str):
    sv = supervise("app", "--workers", "4", "--chdir", str(code), "--no-watch", "--boot-timeout", "120",
                   "--health-bind", "127.0.0.1:0", *extra)
    sv.ready(timeout=120)
    wait_until(lambda: len(_workers(sv)) == 4, message="four workers")
    for _ in range(8):  # a few requests each: the heap is not touched by serving
        assert http_get(sv.port)[1] == "version=1"
    return sv


def test_preloaded_workers_share_the_imported_heap(supervise, tmp_path, capsys):
    code = tmp_path / "code"
    write_app(code, "1", extra=heavy(1_400_000))
    # Without --preload: every worker imports its own copy.
    sv = _boot(supervise, code)
    plain = _uss(_workers(sv))
    plain_ready = sv.find("generation_ready")[0]["boot_seconds"]
    write_app(code, "2", extra=heavy(1_400_000))
    plain_reload = sv.reload(timeout=120)
    assert plain_reload["outcome"] == "succeeded"
    assert http_get(sv.port)[1] == "version=2"
    assert sv.stop(60) == 0
    write_app(code, "1", extra=heavy(1_400_000))
    heap = min(plain)  # one worker's heap (and interpreter): what each plain worker holds alone
    assert heap > 150 * MiB, plain
    # With --preload: one import in the zygote, four forks.
    sv = _boot(supervise, code, "--preload")
    preloaded = _uss(_workers(sv))
    zygote = psutil.Process(sv.find("zygote_ready")[0]["zygote_pid"]).memory_full_info()
    assert sum(preloaded) <= 0.25 * 4 * heap, (preloaded, heap)
    # HUP on new code: one import (the zygote's), then four forks.
    write_app(code, "2", extra=heavy(1_400_000))
    finished = sv.reload(timeout=120)
    assert finished["outcome"] == "succeeded"
    assert http_get(sv.port)[1] == "version=2"
    zygote_import = sv.find("zygote_ready", generation=2)[0]["boot_seconds"]
    assert sv.stop(60) == 0
    with capsys.disabled():
        print(f"\n[preload figures] one worker's USS without --preload: {heap / MiB:.0f} MiB; "
              f"4 workers' USS: without --preload {sum(plain) / MiB:.0f} MiB, with --preload "
              f"{sum(preloaded) / MiB:.0f} MiB ({100 * sum(preloaded) / (4 * heap):.1f} % of 4 heaps), "
              f"zygote USS {zygote.uss / MiB:.0f} MiB; without --preload: first generation ready in "
              f"{plain_ready:.2f}s, HUP: new generation ready after {plain_reload['ready_after']:.2f}s "
              f"({plain_reload['ready_after'] / zygote_import:.2f}x the import); with --preload: zygote import "
              f"{zygote_import:.2f}s, HUP: new generation ready after {finished['ready_after']:.2f}s "
              f"({finished['ready_after'] / zygote_import:.2f}x the import)")


def test_health_shows_unique_and_shared_memory_and_the_zygote(supervise, tmp_path):
    code = tmp_path / "code"
    write_app(code, "1", extra=heavy(300_000))
    sv = supervise("app", "--workers", "2", "--chdir", str(code), "--no-watch", "--preload", health=True).ready(60)
    status, body = sv.health()
    assert status == 200
    for worker in body["workers"]:
        assert worker["uss"] > 0 and worker["shared"] > worker["uss"], worker
    (zygote,) = body["zygotes"]
    assert zygote["generation"] == 1 and zygote["state"] == "ready" and zygote["uss"] > 0, zygote
    shown = subprocess.run([*SUPERVISE, "status", "--health-bind", f"127.0.0.1:{sv.health_port}"],
                           capture_output=True, text=True, timeout=30, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert shown.returncode == 0 and "zygote of generation 1: pid" in shown.stdout, shown
    assert " uss " in shown.stdout and " shared" in shown.stdout, shown.stdout
    metrics = http_get(sv.health_port, "/metrics")[1]
    for name in ("supervise_worker_unique_memory_bytes", "supervise_worker_shared_memory_bytes",
                 "supervise_zygote_memory_bytes"):
        assert f"\n{name}{{" in metrics, name
    assert sv.stop() == 0
    # Without --preload or a budget, the health JSON is as before.
    sv = supervise("app", "--workers", "1", "--chdir", str(code), "--no-watch", "--max-memory", "0",
                   health=True).ready(60)
    body = sv.health()[1]
    assert "zygotes" not in body and "uss" not in body["workers"][0]
    assert sv.stop() == 0


# --------------------------------------------------------------------------- cgroup


def _memory_cgroup() -> tuple[Path, str, str, Path, str] | None:
    """A fresh child memory cgroup: (dir, limit file, procs file, events file, oom key), or None."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    name = f"supervise-test-{uuid.uuid4().hex[:8]}"
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2
            parent = Path("/sys/fs/cgroup" + path.rstrip("/"))
            try:
                if "memory" not in (parent / "cgroup.subtree_control").read_text().split():
                    continue
            except OSError:
                continue
            limit, events = "memory.max", "memory.events"
        elif "memory" in controllers.split(","):  # cgroup v1
            parent = Path("/sys/fs/cgroup/memory" + path.rstrip("/"))
            limit, events = "memory.limit_in_bytes", "memory.oom_control"
        else:
            continue
        try:
            (parent / name).mkdir()
        except OSError:
            continue
        return parent / name, limit, "cgroup.procs", parent / name / events, "oom_kill"
    return None


def _oom_kills(events: Path) -> int:
    for line in events.read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            return int(value)
    return 0


@pytest.fixture
def memory_cgroup():
    found = _memory_cgroup()
    if found is None:
        pytest.skip("no writable memory cgroup (v2 with the memory controller, or v1) to limit supervise in")
    directory, limit, procs, events, _ = found
    yield directory, limit, procs, events
    for pid in (directory / procs).read_text().split():
        try:
            os.kill(int(pid), 9)
        except ProcessLookupError:
            pass
    wait_until(lambda: not (directory / procs).read_text().strip(), message="cgroup empty")
    # The kernel frees a cgroup shortly after its last process: until then rmdir fails (EBUSY).
    wait_until(lambda: directory.rmdir() or True, message="cgroup removed")


def _in_cgroup(directory: Path, procs: str) -> list[str]:
    return ["sh", "-c", f'echo $$ > {directory / procs} && exec "$@"', "sh"]


LIMIT = 600 * MiB  # three ~110 MB workers fit, and four (rolling), but not six (two generations)


def _reload_under_limit(supervise, memory_cgroup, tmp_path, *extra: str):
    directory, limit, procs, events = memory_cgroup
    (directory / limit).write_text(str(LIMIT))
    code = tmp_path / "code"
    write_app(code, "1", extra=heavy(700_000))
    sv = supervise("app", "--workers", "3", "--chdir", str(code), "--no-watch", "--boot-timeout", "120",
                   *extra, prefix=_in_cgroup(directory, procs)).ready(120)
    before = _oom_kills(events)
    write_app(code, "2", extra=heavy(700_000))
    finished = sv.reload(timeout=180)
    return sv, finished, _oom_kills(events) - before


def test_reload_under_a_cgroup_limit_falls_back_to_rolling_without_oom(supervise, memory_cgroup, tmp_path):
    sv, finished, kills = _reload_under_limit(supervise, memory_cgroup, tmp_path)
    fallback = sv.find("reload_strategy_fallback")
    assert fallback and fallback[0]["budget"] == LIMIT, "the budget defaults to the cgroup's limit"
    assert sv.find("reload_started")[-1]["strategy"] == "rolling"
    assert finished["outcome"] == "succeeded", finished
    assert kills == 0
    assert not [e for e in sv.find("worker_exited") if "signal 9" in e["status"]]
    assert http_get(sv.port)[1] == "version=2"
    assert sv.stop(60) == 0


def test_negative_control_without_the_budget_the_overlap_is_oom_killed(supervise, memory_cgroup, tmp_path):
    sv, finished, kills = _reload_under_limit(supervise, memory_cgroup, tmp_path, "--max-memory", "0")
    assert not sv.find("reload_strategy_fallback")
    assert kills > 0 or finished["outcome"] != "succeeded", finished
