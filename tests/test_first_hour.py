"""Issue 16, a new user's first hour: readable tracebacks in the console format, processes named
in `ps`, and the small things (drain logged when it starts, the cause of a failed reload, `app:`
rejected, os._exit at import failing at once, watcher warnings as events)."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from supervisor.lifecycle.actions import Exit
from supervisor.lifecycle.events import Exited
from supervisor.master.helpers import fork_helper
from supervisor.watch.helper import WARNING_CHARS, _PythonWarnings
from tests.harness import ROOT, free_port, slow_in_background, slow_started, wait_exit, wait_until, write_app
from tests.sim import Sim, notes, running

ENV = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "supervisor", *args], env={**ENV, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def one_clear_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and lines[0].startswith("supervise: error: ")
    return lines[0]


def title(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode().strip()


# --------------------------------------------------------------------------- item 5: console tracebacks


def test_console_format_prints_a_boot_traceback_as_a_block(tmp_path):
    write_app(tmp_path, extra='raise ValueError("bad config")')
    result = run("app", "--chdir", str(tmp_path), "--bind", f"127.0.0.1:{free_port()}", "--workers", "1",
                 "--log-format", "console")
    assert result.returncode == 3
    lines = result.stdout.splitlines()
    assert "Traceback (most recent call last):" in lines, result.stdout
    assert any(line.startswith("  File ") and "app.py" in line for line in lines), result.stdout
    assert "\\n" not in result.stdout, "no escaped newlines: the traceback is a block"
    failed = next(line for line in lines if "boot_failed" in line)
    assert "traceback=" not in failed and "error='ValueError: bad config'" in failed
    assert lines[lines.index(failed) + 1] == "Traceback (most recent call last):", "the block follows its event"


def test_json_format_keeps_the_traceback_as_one_field(tmp_path):
    """Negative control: JSON lines stay one event per line, the traceback a field."""
    write_app(tmp_path, extra='raise ValueError("bad config")')
    result = run("app", "--chdir", str(tmp_path), "--bind", f"127.0.0.1:{free_port()}", "--workers", "1",
                 "--log-format", "json")
    assert result.returncode == 3
    events = [json.loads(line) for line in result.stdout.splitlines()]  # every line is JSON
    failed = next(e for e in events if e["event"] == "boot_failed")
    assert "Traceback (most recent call last):" in failed["traceback"]


def test_console_format_in_any_process_renders_traceback_and_exc_info_as_blocks():
    """The master, workers and helpers all log through logs.configure (helpers inherit it)."""
    code = textwrap.dedent("""
        from supervisor import logs
        logs.configure("info", "console", role="watcher")
        log = logs.get()
        log.critical("helper_crashed", traceback="Traceback (most recent call last):\\n  File \\"x.py\\", line 1\\nOSError: boom")
        try:
            1 / 0
        except ZeroDivisionError:
            log.exception("internal_error")
        log.error("worker_stack", stacks="Thread 0x1 (most recent call first):\\n  File \\"y.py\\", line 2")
    """)
    out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "OSError: boom" in lines and '  File "x.py", line 1' in lines
    assert "ZeroDivisionError: division by zero" in lines
    assert '  File "y.py", line 2' in lines
    assert "\\n" not in out.stdout


def test_a_helper_thread_that_dies_is_an_event_with_its_traceback():
    code = textwrap.dedent("""
        import os, socket, threading
        from supervisor import logs
        from supervisor.master.helpers import fork_helper
        logs.configure("info", "json", role="master")

        def body(sock):
            def boom():
                raise OSError("inotify went away")
            t = threading.Thread(target=boom, name="emitter")
            t.start()
            t.join()
            sock.recv(1)

        pid, chan = fork_helper(body, "watcher")
        chan.close()
        os.waitpid(pid, 0)
    """)
    out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    events = [json.loads(line) for line in out.stdout.splitlines()]
    crashed = [e for e in events if e["event"] == "thread_crashed"]
    assert len(crashed) == 1, events
    assert crashed[0]["role"] == "watcher" and crashed[0]["thread"] == "emitter"
    assert crashed[0]["error"] == "OSError: inotify went away"
    assert "Traceback (most recent call last):" in crashed[0]["traceback"]


def test_a_python_warning_in_a_helper_is_an_event_once_per_source_line():
    code = textwrap.dedent("""
        import os, warnings
        from supervisor import logs
        from supervisor.master.helpers import fork_helper
        logs.configure("info", "json", role="master")

        def body(sock):
            for n in range(3):
                warnings.warn(f"Unverified HTTPS request {n} " + "x" * 1000, RuntimeWarning)
            sock.recv(1)

        pid, chan = fork_helper(body, "consul")
        chan.close()
        os.waitpid(pid, 0)
    """)
    out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    events = [json.loads(line) for line in out.stdout.splitlines()]
    warned = [e for e in events if e["event"] == "python_warning"]
    assert len(warned) == 1, events
    assert warned[0]["role"] == "consul" and warned[0]["category"] == "RuntimeWarning"
    assert warned[0]["message"].startswith("Unverified HTTPS request 0 ") and len(warned[0]["message"]) < 400


# --------------------------------------------------------------------------- item 6: process titles


def test_processes_are_titled_master_workers_watcher(supervise, app_dir):
    sv = supervise("app", "--chdir", str(app_dir), "--workers", "2").ready()
    sv.wait_for("watching")
    assert title(sv.pid) == "supervise: master app"
    titles = wait_until(lambda: sorted(title(c.pid) for c in psutil.Process(sv.pid).children()), 10,
                        "the children")
    assert titles == ["supervise: watcher", "supervise: worker g1/w1", "supervise: worker g1/w2"]
    sv.reload()
    new = [e["worker_pid"] for e in sv.find("worker_spawned", generation=2)]
    assert sorted(title(pid) for pid in new) == ["supervise: worker g2/w1", "supervise: worker g2/w2"]
    assert sv.stop() == 0


@pytest.mark.consul
def test_the_consul_helper_is_titled_and_logs_as_itself(supervise, app_dir, consul_agent):
    sv = supervise("app", "--chdir", str(app_dir), "--no-watch", "--workers", "1", "--consul", consul_agent.addr,
                   "--consul-service", "first-hour", "--consul-timeout", "2").ready()
    helper = sv.wait_for("consul_helper_started")
    assert helper["role"] == "consul" and helper["pid"] != sv.pid
    assert title(helper["pid"]) == "supervise: consul"
    assert sv.stop() == 0


def test_a_helper_is_titled_by_its_name():
    def body(sock: socket.socket) -> None:
        sock.recv(1)  # until the master closes its end

    pid, chan = fork_helper(body, "consul")
    try:
        assert wait_until(lambda: title(pid) == "supervise: consul", 10, "the helper's title")
    finally:
        chan.close()
        assert wait_exit(pid, 10) == 0


# --------------------------------------------------------------------------- item 7: small things


def test_empty_callable_name_is_one_clear_line_and_exit_2():
    for args, env in ((["app:"], None), ([], {"SUPERVISE_APP": "pkg.app:"})):
        result = run(*args, env=env)
        assert result.returncode == 2
        assert "nothing after ':'" in one_clear_line(result)


@pytest.mark.parametrize("app, file, hint", [
    ("app.py", "app.py", "'app'"),
    ("app.py:application", "app.py", "'app:application'"),
    ("pkg.web.py", "pkg/web.py", "'pkg.web'"),
])
def test_a_file_name_for_app_is_one_clear_line_naming_the_module(tmp_path, app, file, hint):
    write_app(tmp_path / Path(file).parent, name=Path(file).name)
    result = run(app, "--chdir", str(tmp_path), "--bind", f"127.0.0.1:{free_port()}")
    assert result.returncode == 2
    assert f"is a file name; give the module: {hint}" in one_clear_line(result)


def test_a_module_named_like_a_file_is_not_mistaken_for_one(supervise, tmp_path):
    """Negative control: with no file app.py, `app.py` is the module `py` of a package `app`."""
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "__init__.py").write_text("")
    write_app(tmp_path / "app", name="py.py")
    sv = supervise("app.py", "--chdir", str(tmp_path), "--workers", "1", "--no-watch").ready()
    assert sv.get()[1] == "version=1"
    assert sv.stop() == 0


def test_module_calling_os_exit_at_import_fails_at_once_not_at_boot_timeout(tmp_path):
    write_app(tmp_path, extra="os._exit(0)")
    # The boot timeout is longer than the run's own timeout: only an immediate failure passes.
    result = run("app", "--chdir", str(tmp_path), "--bind", f"127.0.0.1:{free_port()}", "--workers", "2",
                 "--boot-timeout", "300", "--log-format", "json", timeout=60)
    assert result.returncode == 3
    line = one_clear_line(result)
    assert "exited before ready (exit 0) with no import error reported" in line


def test_pool_first_generation_worker_exiting_before_ready_exits_3_at_once():
    sim = Sim(2, boot_timeout=300.0)
    sim.start()
    exits = [a for a in sim.exit(sim.pids_of(1)[0], "exit 0") if isinstance(a, Exit)]
    assert exits and exits[0].code == 3 and "exited before ready (exit 0)" in exits[0].reason
    assert sim.now == 0.0


def test_pool_worker_dying_while_the_first_generation_already_serves_is_respawned():
    """Negative control: the code boots (a worker serves), so one exit before ready is not fatal."""
    sim = Sim(2, boot_timeout=300.0)
    sim.start()
    first, second = sim.pids_of(1)
    sim.pool.ready(sim.now, first)
    sim.step()
    actions = sim.exit(second, "signal 9 (SIGKILL)")
    assert not [a for a in actions if isinstance(a, Exit)]
    for _ in range(10):
        if len(sim.pids_of(1)) == 2:
            break
        sim.advance_to_next_deadline()
    assert len(sim.pids_of(1)) == 2 and second not in sim.pids_of(1) and sim.exited_with is None


def test_pool_reload_failure_names_the_cause_the_master_found():
    sim = running(2)
    sim.reload()
    actions = sim.handle(Exited(sim.pids_of(2)[0], "exit 1", "the code directory /srv/app does not exist"))
    error = notes(actions, "reload_failed")[0].fields["error"]
    assert error == "worker 1 exited before ready (exit 1) with no import error reported: " \
                    "the code directory /srv/app does not exist"


def test_reload_into_a_missing_code_directory_names_the_cause(supervise, tmp_path):
    release1, release2 = tmp_path / "release1", tmp_path / "release2"
    write_app(release1, "1")
    current = tmp_path / "current"
    current.symlink_to(release1)
    sv = supervise("app", "--chdir", str(current), "--no-watch", "--workers", "2").ready()
    tmp = tmp_path / "current.tmp"
    tmp.symlink_to(release2)  # not there (yet)
    os.replace(tmp, current)
    failed = sv.reload()
    assert failed["outcome"] == "failed"
    assert f"the code directory {current} does not exist" in failed["error"], failed
    assert sv.get()[1] == "version=1", "the old generation keeps serving"
    # Negative control: once the directory exists the same reload succeeds, and names no cause.
    write_app(release2, "2")
    done = sv.reload()
    assert done["outcome"] == "succeeded" and "error" not in done
    assert sv.get()[1] == "version=2"
    assert sv.stop() == 0


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv")
def test_reload_into_an_unreadable_code_directory_names_the_cause(supervise, tmp_path):
    """Root without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH obeys the permission bits, as any user does."""
    release1, release2 = tmp_path / "release1", tmp_path / "release2"
    write_app(release1, "1")
    write_app(release2, "2")
    current = tmp_path / "current"
    current.symlink_to(release1)
    sv = supervise("app", "--chdir", str(current), "--no-watch", "--workers", "1",
                   prefix=[shutil.which("setpriv"), "--bounding-set", "-dac_override,-dac_read_search"]).ready()
    tmp = tmp_path / "current.tmp"
    tmp.symlink_to(release2)
    os.replace(tmp, current)
    cause = f"the code directory {current} cannot be read (permission denied)"
    try:
        release2.chmod(0)  # the worker cannot even enter it: it dies without a word
        failed = sv.reload()
        assert failed["outcome"] == "failed" and failed["error"].endswith(cause), failed
        release2.chmod(0o311)  # it can enter but not list it: the import fails, and why is added
        failed = sv.reload()
        assert failed["error"] == f"ModuleNotFoundError: No module named 'app': {cause}", failed
        assert sv.get()[1] == "version=1"
        # Negative control: readable again, the same reload succeeds and names no cause.
        release2.chmod(0o755)
        done = sv.reload()
        assert done["outcome"] == "succeeded" and "error" not in done
        assert sv.get()[1] == "version=2"
    finally:
        release2.chmod(0o755)
    assert sv.stop() == 0


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv")
def test_an_unreadable_code_directory_at_start_is_one_clear_line_and_exit_2(tmp_path):
    write_app(tmp_path / "code")
    (tmp_path / "code").chmod(0o311)
    try:
        result = subprocess.run([shutil.which("setpriv"), "--bounding-set", "-dac_override,-dac_read_search",
                                 sys.executable, "-m", "supervisor", "app", "--chdir", str(tmp_path / "code"),
                                 "--bind", f"127.0.0.1:{free_port()}"], env=ENV, capture_output=True, text=True,
                                timeout=30)
    finally:
        (tmp_path / "code").chmod(0o755)
    assert result.returncode == 2
    assert "cannot be read (permission denied)" in one_clear_line(result)


def test_worker_draining_is_logged_when_the_drain_starts(supervise, app_dir):
    """With one thread a worker busy in a request notices SIGTERM only when the request ends;
    the master logs the drain as it starts it."""
    sv = supervise("app", "--chdir", str(app_dir), "--no-watch", "--workers", "1", "--threads", "1",
                   "--graceful-timeout", "30", env={"SLOW_MARK_DIR": str(app_dir)}).ready()
    thread, result = slow_in_background(sv.port, 8)
    slow_started(app_dir)
    sv.signal(signal.SIGHUP)
    draining = sv.wait_for("worker_draining", role="master", generation=1)
    assert draining["why"] == "reload" and draining["worker"] == 1
    assert thread.is_alive() and not result, "logged while the request it waits for is in flight"
    thread.join(30)
    assert result.get("status") == 200, result
    finished = sv.wait_for("reload_finished")
    assert finished["outcome"] == "succeeded" and finished["drained_requests"] == 1
    assert sv.stop() == 0


def test_watching_names_a_reason_only_when_there_is_one(supervise, app_dir):
    sv = supervise("app", "--chdir", str(app_dir), "--workers", "1").ready()
    watching = sv.wait_for("watching")
    assert watching["mode"] == "inotify" and "reason" not in watching, watching
    assert sv.stop() == 0
    # Negative control: polling says why.
    sv = supervise("app", "--chdir", str(app_dir), "--workers", "1", "--watch-poll").ready()
    assert sv.wait_for("watching")["reason"] == "--watch-poll"
    assert sv.stop() == 0


def _deep_tree(root: Path, depth: int = 300) -> None:
    path = root
    for i in range(depth):
        path = path / f"d{i}"
    path.mkdir(parents=True)


def test_watcher_warnings_about_deep_trees_are_events_not_plain_text(supervise, app_dir):
    sv = supervise("app", "--chdir", str(app_dir), "--workers", "1", "--watch-debounce", "60").ready()
    sv.wait_for("watching")
    n = [0]

    def churn() -> bool:
        """watchdog warns when a tree grows while it adds watches for it: a race, so repeat."""
        n[0] += 1
        tree = app_dir / f"tree{n[0]}"
        _deep_tree(tree)
        shutil.rmtree(tree)
        return bool(sv.find("watcher_warning")) or "RuntimeWarning" in sv.stderr

    wait_until(churn, 60, "a watchdog warning", interval=0.05)
    assert "RuntimeWarning" not in sv.stderr, sv.stderr[-2000:]
    warning = sv.find("watcher_warning")[0]
    assert warning["message"].startswith("RuntimeWarning: ") and warning["level"] == "warning"
    assert len(warning["message"]) < WARNING_CHARS + 100
    sv.stop()
    assert all(line.startswith("{") for line in sv.raw), [line for line in sv.raw if not line.startswith("{")]


DEPTH = 1200  # deeper than Python 3.11's recursion limit: os.walk (recursive) cannot walk it


def _make_very_deep(root: Path) -> str:
    """root/d/d/.../d (DEPTH levels), made through directory fds; returns the relative path."""
    root.mkdir()
    fd = os.open(root, os.O_RDONLY)
    for _ in range(DEPTH):
        os.mkdir("d", dir_fd=fd)
        below = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = below
    os.close(fd)
    return "/".join(["d"] * DEPTH)


def _remove_very_deep(root: Path) -> None:
    fd = os.open(root, os.O_RDONLY)
    try:
        for depth in range(DEPTH, 0, -1):
            rel = "/".join(["d"] * depth)
            for name in os.listdir(os.open(rel, os.O_RDONLY, dir_fd=fd)):
                os.unlink(f"{rel}/{name}", dir_fd=fd)
            os.rmdir(rel, dir_fd=fd)
    finally:
        os.close(fd)


def test_watcher_watches_a_tree_deeper_than_the_recursion_limit(supervise, app_dir):
    tree = app_dir / "deep"
    rel = _make_very_deep(tree)
    try:
        # Negative control: the tree is deep enough to break a recursive walk at the default limit.
        walk = subprocess.run([sys.executable, "-c", "import os, sys; [None for _ in os.walk(sys.argv[1])]",
                               str(tree)], capture_output=True, text=True, timeout=60)
        assert "RecursionError" in walk.stderr
        sv = supervise("app", "--chdir", str(app_dir), "--workers", "1", "--watch-debounce", "0.1").ready()
        assert sv.wait_for("watching")["mode"] == "inotify"
        fd = os.open(tree, os.O_RDONLY)
        try:
            os.close(os.open(f"{rel}/leaf.py", os.O_WRONLY | os.O_CREAT, dir_fd=fd))
        finally:
            os.close(fd)
        assert sv.wait_for("reload_finished", timeout=30)["outcome"] == "succeeded"
        assert not sv.find("helper_crashed") and not sv.find("watcher_error"), sv.raw[-10:]
        assert sv.stop() == 0
    finally:
        _remove_very_deep(tree)


def test_python_warnings_are_forwarded_once_per_source_line():
    inbox: queue.Queue = queue.Queue()
    show = _PythonWarnings(inbox).show
    show(RuntimeWarning("x" * 5000), RuntimeWarning, "/v/watchdog/inotify_c.py", 450)
    show(RuntimeWarning("again"), RuntimeWarning, "/v/watchdog/inotify_c.py", 450)
    show(RuntimeWarning("elsewhere"), RuntimeWarning, "/v/watchdog/inotify_c.py", 493)
    items = [inbox.get_nowait() for _ in range(inbox.qsize())]
    assert [kind for kind, _ in items] == ["warning", "warning"]
    assert items[0][1].startswith("RuntimeWarning: xxx") and "..." in items[0][1]
    assert len(items[0][1]) < WARNING_CHARS + 100
    assert "elsewhere" in items[1][1]


@pytest.mark.parametrize("text", ["app", "app:application", "pkg.mod:make.app"])
def test_valid_app_specs_still_parse(text):
    """Negative control for `app:`: real specs pass."""
    from supervisor.settings import parse_app

    assert parse_app(text) == text
