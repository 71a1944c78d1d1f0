"""--preload with real processes: a zygote per generation imports the app once and forks the
workers; HUP still serves new code; a broken import on reload leaves the old generation serving;
a dead zygote is replaced for the next respawn; the workers share the imported heap."""

from __future__ import annotations

import os
import signal

import psutil

from tests.harness import (Load, assert_monotonic_versions, http_get, hup_reloads_under_load, wait_until,
                           write_app)

BROKEN_IMPORT = 'raise RuntimeError("broken deploy")'


def _zygote_pid(sv, generation: int) -> int:
    return sv.wait_for("zygote_ready", generation=generation)["zygote_pid"]


def _worker_pids(sv) -> dict[int, int]:
    """Serving workers: pid -> generation, from the master's children (titles)."""
    out = {}
    for child in psutil.Process(sv.pid).children():
        try:
            title = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if "supervise: worker g" in title:
            out[child.pid] = int(title.split("worker g")[1].split("/")[0])
    return out


def test_preload_forks_workers_from_a_zygote_that_are_the_masters_children(supervise, app_dir):
    sv = supervise("app", "--workers", "2", "--chdir", str(app_dir), "--no-watch", "--preload").ready()
    zygote = _zygote_pid(sv, 1)
    spawned = sv.find("worker_spawned", generation=1)
    assert len(spawned) == 2
    for event in spawned:
        p = psutil.Process(event["worker_pid"])
        assert p.ppid() == sv.pid, "a worker is the master's child, not the zygote's"
    assert psutil.Process(zygote).ppid() == sv.pid
    assert "supervise: zygote g1" in " ".join(psutil.Process(zygote).cmdline())
    assert http_get(sv.port)[1] == "version=1"
    assert sv.stop() == 0
    assert not psutil.pid_exists(zygote) or psutil.Process(zygote).status() == psutil.STATUS_ZOMBIE


def test_preload_hups_under_load_zero_failures_and_new_code(supervise, app_dir):
    sv = supervise("app", "--workers", "2", "--chdir", str(app_dir), "--no-watch", "--preload").ready()
    ka, nk, order = hup_reloads_under_load(sv, app_dir, last=6)
    for load in (ka, nk):
        assert not load.failures(), load.summary()
        assert_monotonic_versions(load, order)
        assert all(r.body == "version=6" for r in load.results[-10:])
    # Each reload had its zygote, and the retired ones are gone.
    for generation in range(2, 7):
        sv.wait_for("zygote_ready", generation=generation)
    for generation in range(1, 6):
        sv.wait_for("zygote_exited", generation=generation, state="stopping")
    assert sv.stop() == 0


def test_preload_broken_import_on_reload_keeps_the_old_generation_serving(supervise, app_dir):
    sv = supervise("app", "--workers", "2", "--chdir", str(app_dir), "--no-watch", "--preload").ready()
    with Load(sv.port, clients=4) as load:
        load.wait_requests(50)
        write_app(app_dir, "2", extra=BROKEN_IMPORT)
        failed = sv.reload()
        assert failed["outcome"] == "failed" and "RuntimeError: broken deploy" in failed["error"], failed
        assert not sv.find("worker_spawned", generation=2), "no worker forked from a failed zygote"
        load.wait_requests(50)
        assert http_get(sv.port)[1] == "version=1"
        # Negative control: a good import reloads.
        write_app(app_dir, "3")
        assert sv.reload()["outcome"] == "succeeded"
        load.wait_requests(50)
        assert http_get(sv.port)[1] == "version=3"
    assert not load.failures(), load.summary()
    assert sv.stop() == 0


def test_preload_broken_import_at_start_exits_3(supervise, tmp_path):
    write_app(tmp_path / "code", "1", extra=BROKEN_IMPORT)
    sv = supervise("app", "--workers", "2", "--chdir", str(tmp_path / "code"), "--no-watch", "--preload")
    assert sv.wait(30) == 3
    assert "broken deploy" in sv.stderr + "\n".join(sv.raw)
    assert not sv.find("worker_spawned")


def test_preload_killed_zygote_is_replaced_and_respawns_still_work(supervise, app_dir):
    sv = supervise("app", "--workers", "2", "--chdir", str(app_dir), "--no-watch", "--preload").ready()
    zygote = _zygote_pid(sv, 1)
    workers = set(_worker_pids(sv))
    assert len(workers) == 2
    os.kill(zygote, signal.SIGKILL)
    sv.wait_for("zygote_exited", zygote_pid=zygote)
    # Its workers live on (they are the master's children).
    assert http_get(sv.port)[1] == "version=1"
    assert set(_worker_pids(sv)) == workers
    # A crashed worker is respawned through a fresh zygote.
    victim = sorted(workers)[0]
    os.kill(victim, signal.SIGKILL)
    sv.wait_for("worker_exited", worker_pid=victim)
    fresh = sv.wait_for("zygote_ready", count=2)["zygote_pid"]
    assert fresh != zygote
    spawned = sv.wait_for("worker_spawned", count=3)
    sv.wait_for("worker_ready", worker_pid=spawned["worker_pid"])
    wait_until(lambda: len(_worker_pids(sv)) == 2, message="two workers again")
    assert http_get(sv.port)[1] == "version=1"
    # And a reload still works after all that.
    write_app(app_dir, "2")
    assert sv.reload()["outcome"] == "succeeded"
    assert http_get(sv.port)[1] == "version=2"
    assert sv.stop() == 0


THREAD_AT_IMPORT = '''
import threading
threading.Thread(target=threading.Event().wait, name="metrics-pusher", daemon=True).start()
'''


def test_preload_warns_about_threads_started_at_import(supervise, tmp_path):
    write_app(tmp_path / "code", "1", extra=THREAD_AT_IMPORT)
    sv = supervise("app", "--workers", "1", "--chdir", str(tmp_path / "code"), "--no-watch", "--preload").ready()
    warned = sv.wait_for("threads_at_fork")
    assert warned["threads"] == ["metrics-pusher"] and warned["level"] == "warning"
    assert sv.stop() == 0
    # Negative control: an app that starts none is not warned about.
    write_app(tmp_path / "code2", "1")
    sv = supervise("app", "--workers", "1", "--chdir", str(tmp_path / "code2"), "--no-watch", "--preload").ready()
    assert sv.stop() == 0
    assert not sv.find("threads_at_fork")


AT_FORK_HOOK = '''
def _mark():
    with open("forked.%d" % os.getpid(), "w") as f:
        f.write("x")
os.register_at_fork(after_in_child=_mark)
'''


def test_preload_runs_the_apps_at_fork_hooks_in_each_worker(supervise, tmp_path):
    code = tmp_path / "code"
    write_app(code, "1", extra=AT_FORK_HOOK)
    sv = supervise("app", "--workers", "2", "--chdir", str(code), "--no-watch", "--preload").ready()
    for event in sv.find("worker_spawned"):
        assert (code / f"forked.{event['worker_pid']}").exists()
    assert sv.stop() == 0


def test_preload_recycled_and_scaled_workers_fork_from_the_same_zygote(supervise, app_dir):
    sv = supervise("app", "--workers", "1", "--chdir", str(app_dir), "--no-watch", "--preload",
                   "--max-requests", "20").ready()
    zygote = _zygote_pid(sv, 1)
    for _ in range(25):
        assert http_get(sv.port)[1] == "version=1"
    recycled = sv.wait_for("worker_recycle")
    replacement = sv.wait_for("worker_spawned", count=2)
    sv.wait_for("worker_exited", worker_pid=recycled["worker_pid"])
    assert replacement["generation"] == 1
    sv.signal(signal.SIGTTIN)  # live scaling: one more worker
    scaled = sv.wait_for("worker_spawned", count=3)
    sv.wait_for("worker_ready", worker_pid=scaled["worker_pid"])
    assert len(sv.find("zygote_started")) == 1, "every fork came from the generation's one zygote"
    assert psutil.Process(zygote).is_running()
    assert http_get(sv.port)[1] == "version=1"
    assert sv.stop() == 0


def test_preload_a_fresh_zygote_on_changed_code_leads_to_a_reload(supervise, app_dir):
    """The zygote died and the code on disk changed since: the respawn's fresh zygote imports the
    new code, so its worker is not put in service beside the old ones; a reload follows."""
    sv = supervise("app", "--workers", "2", "--chdir", str(app_dir), "--no-watch", "--preload").ready()
    zygote = _zygote_pid(sv, 1)
    os.kill(zygote, signal.SIGKILL)
    sv.wait_for("zygote_exited", zygote_pid=zygote)
    write_app(app_dir, "2")
    victim = sorted(_worker_pids(sv))[0]
    os.kill(victim, signal.SIGKILL)
    sv.wait_for("code_changed_under_generation")
    sv.wait_for("generation_ready", count=2)
    assert http_get(sv.port)[1] == "version=2"
    assert sv.stop() == 0


ASGI_APP = '''
import os
VERSION = {version!r}
STARTED = []

async def application(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                STARTED.append(os.getpid())  # runs in each worker, after the fork
                await send({{"type": "lifespan.startup.complete"}})
            elif message["type"] == "lifespan.shutdown":
                await send({{"type": "lifespan.shutdown.complete"}})
                return
    else:
        body = ("version=%s startup_in=%s" % (VERSION, STARTED == [os.getpid()])).encode()
        await send({{"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(body)).encode())]}})
        await send({{"type": "http.response.body", "body": body}})
'''


def test_preload_serves_an_asgi_app_with_its_lifespan_in_each_worker(supervise, tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    (code / "app.py").write_text(ASGI_APP.format(version="1"))
    sv = supervise("app", "--workers", "2", "--chdir", str(code), "--no-watch", "--preload").ready()
    assert http_get(sv.port)[1] == "version=1 startup_in=True"
    (code / "app.py").write_text(ASGI_APP.format(version="2"))
    assert sv.reload()["outcome"] == "succeeded"
    assert http_get(sv.port)[1] == "version=2 startup_in=True"
    assert sv.stop() == 0


def test_negative_control_workers_forked_once_die_with_their_zygote(supervise, app_dir):
    """The failure mode the double fork prevents: workers that are the zygote's children (with
    their parent-death signal tied to it) all go when it is killed."""
    sv = supervise("app", "--workers", "2", "--chdir", str(app_dir), "--no-watch", "--preload",
                   inject=["workers-die-with-zygote"]).ready()
    zygote = _zygote_pid(sv, 1)
    workers = [e["worker_pid"] for e in sv.find("worker_spawned")]
    assert all(psutil.Process(pid).ppid() == zygote for pid in workers)
    os.kill(zygote, signal.SIGKILL)
    for pid in workers:
        sv.wait_for("worker_exited", worker_pid=pid)
    sv.kill()


def _zygotes(sv) -> list[int]:
    out = []
    for child in psutil.Process(sv.pid).children():
        try:
            if "supervise: zygote" in " ".join(child.cmdline()) and child.status() != psutil.STATUS_ZOMBIE:
                out.append(child.pid)
        except psutil.Error:
            pass
    return out


def test_preload_hup_storm_supersedes_zygotes_and_leaves_one(supervise, app_dir):
    sv = supervise("app", "--workers", "2", "--chdir", str(app_dir), "--no-watch", "--preload").ready()
    with Load(sv.port, clients=4) as load:
        load.wait_requests(30)
        for n in range(2, 7):
            write_app(app_dir, str(n), extra="time.sleep(0.3)")  # an import that takes a while
            sv.signal(signal.SIGHUP)
        wait_until(lambda: http_get(sv.port)[1] == "version=6", timeout=30, message="the newest code")
        load.wait_requests(30)
    assert not load.failures(), load.summary()
    assert sv.find("reload_finished", outcome="superseded"), "HUPs during a boot superseded it"
    serving = sv.find("generation_ready")[-1]["generation"]
    wait_until(lambda: _zygotes(sv) == [sv.find("zygote_ready", generation=serving)[0]["zygote_pid"]],
               message="only the serving generation's zygote left")
    assert sv.stop() == 0


CONNECTION_AT_IMPORT = '''
import socket
DB = socket.create_connection(("127.0.0.1", int(os.environ["TEST_DB_PORT"])))
'''


def test_preload_warns_about_connections_opened_at_import(supervise, tmp_path):
    import socket

    with socket.socket() as db:
        db.bind(("127.0.0.1", 0))
        db.listen(8)  # connections complete in the backlog: nothing needs to accept them
        port = db.getsockname()[1]
        write_app(tmp_path / "code", "1", extra=CONNECTION_AT_IMPORT)
        sv = supervise("app", "--workers", "1", "--chdir", str(tmp_path / "code"), "--no-watch", "--preload",
                       env={"TEST_DB_PORT": str(port)}).ready()
        warned = sv.wait_for("connections_at_fork")
        assert warned["peers"] == [f"127.0.0.1:{port}"] and warned["level"] == "warning"
        assert sv.stop() == 0
    # Negative control: an app that opens none is not warned about.
    write_app(tmp_path / "code2", "1")
    sv = supervise("app", "--workers", "1", "--chdir", str(tmp_path / "code2"), "--no-watch", "--preload").ready()
    assert sv.stop() == 0
    assert not sv.find("connections_at_fork")


def test_preload_respawn_after_a_code_change_on_disk_runs_the_generations_code(supervise, app_dir):
    """The code on disk changed (no reload asked): a crashed worker's respawn forks from the
    generation's zygote, so it runs the generation's code and is put in service as is.  (The
    negative control is the fresh-zygote test above: a zygote that imports the changed code
    triggers a reload.)"""
    sv = supervise("app", "--workers", "2", "--chdir", str(app_dir), "--no-watch", "--preload").ready()
    write_app(app_dir, "2")
    victim = sorted(_worker_pids(sv))[0]
    os.kill(victim, signal.SIGKILL)
    sv.wait_for("worker_exited", worker_pid=victim)
    respawned = sv.wait_for("worker_spawned", count=3)
    sv.wait_for("worker_ready", worker_pid=respawned["worker_pid"])
    wait_until(lambda: len(_worker_pids(sv)) == 2, message="two workers again")
    bodies = {http_get(sv.port)[1] for _ in range(20)}
    assert bodies == {"version=1"}
    assert not sv.find("code_changed_under_generation")
    assert len(sv.find("zygote_started")) == 1 and not sv.find("reload_started")
    assert sv.stop() == 0


def test_preload_reload_whose_workers_cannot_be_forked_fails_and_the_old_generation_serves(supervise, app_dir):
    """An at-fork hook that kills the child: the new zygote imports, but no worker comes out of
    it.  The reload fails at once (not at --boot-timeout) and the old generation serves on."""
    sv = supervise("app", "--workers", "2", "--chdir", str(app_dir), "--no-watch", "--preload",
                   "--boot-timeout", "60").ready()
    write_app(app_dir, "2", extra="os.register_at_fork(after_in_child=lambda: os._exit(1))")
    failed = sv.reload()
    assert failed["outcome"] == "failed" and "could not be forked" in failed["error"], failed
    assert http_get(sv.port)[1] == "version=1"
    write_app(app_dir, "3")  # negative control: a forkable app reloads
    assert sv.reload()["outcome"] == "succeeded"
    assert http_get(sv.port)[1] == "version=3"
    assert sv.stop() == 0
