"""Code watcher: pure filters and debouncer, and the real helper process on real files."""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import selectors
import socket
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from dataclasses import asdict
from typing import Any

import pytest

from supervisor import proto
from supervisor.channel import Channel
from supervisor.lifecycle.debounce import Batch, Debouncer
from supervisor.master.helpers import fork_helper as master_fork_helper
from supervisor.settings import WATCH_EXCLUDE, WATCH_INCLUDE, resolve
from supervisor.watch import helper as watch
from supervisor.watch.spec import WatchSpec, path_matches, spec_from_config
from tests.harness import wait_exit, wait_until

INCLUDE = tuple(WATCH_INCLUDE)
EXCLUDE = tuple(WATCH_EXCLUDE)
ROOT = "/srv/app"

# --------------------------------------------------------------------------- filters


@pytest.mark.parametrize("rel", [
    "app.py", "pkg/mod.py", "a/b/c/d/deep.py", "templates/index.html", "conf/settings.yaml",
    "conf/x.yml", "pyproject.toml", "setup.cfg", "tox.ini", "data.json",
])
def test_default_include_matches(rel: str) -> None:
    assert path_matches(f"{ROOT}/{rel}", ROOT, INCLUDE, EXCLUDE)


@pytest.mark.parametrize("rel", [
    "notes.txt", "image.png", "app.pyc", "pkg/__pycache__/mod.cpython-311.pyc",
    "pkg/__pycache__/weird.py",        # a directory pattern excludes at any depth
    "__pycache__/x.py",
    ".git/HEAD", ".git/hooks/post-checkout.py", "sub/.git/config.json",
    "node_modules/lib/index.json", "a/b/node_modules/c/d.py",
    "server.log", "app.py.log", ".app.py.swp", "app.py~", ".#app.py",
])
def test_default_exclude_and_non_included(rel: str) -> None:
    assert not path_matches(f"{ROOT}/{rel}", ROOT, INCLUDE, EXCLUDE)


def test_directory_pattern_only_applies_below_root() -> None:
    # Watching a tree that itself lives under node_modules/ still works.
    root = "/home/me/node_modules/pkg"
    assert path_matches(f"{root}/index.py", root, INCLUDE, EXCLUDE)
    # A file (not a directory) called like an excluded directory is not excluded by it.
    assert path_matches(f"{ROOT}/__pycache__", ROOT, ("*",), ("__pycache__/",))


def test_paths_outside_root_and_root_itself_never_match() -> None:
    assert not path_matches("/elsewhere/app.py", ROOT, INCLUDE, EXCLUDE)
    assert not path_matches("/srv/application.py", ROOT, INCLUDE, EXCLUDE)
    assert not path_matches(ROOT, ROOT, ("*",), ())


def test_custom_patterns() -> None:
    assert path_matches(f"{ROOT}/x.txt", ROOT, (), ())  # empty include: everything
    assert not path_matches(f"{ROOT}/x.txt", ROOT, (), ("*.txt",))
    assert path_matches(f"{ROOT}/static/site.css", ROOT, ("static/*.css",), ())
    assert not path_matches(f"{ROOT}/other/site.css", ROOT, ("static/*.css",), ())
    assert not path_matches(f"{ROOT}/build-1/app.py", ROOT, ("*.py",), ("build-*/",))
    assert path_matches(f"{ROOT}/App.PY", ROOT, ("*.PY",), ())
    assert not path_matches(f"{ROOT}/App.PY", ROOT, ("*.py",), ())  # case-sensitive


def test_excluded_dir_name() -> None:
    assert watch.excluded_dir_name(".git", EXCLUDE)
    assert watch.excluded_dir_name("node_modules", EXCLUDE)
    assert not watch.excluded_dir_name("server.log", EXCLUDE)  # file patterns do not prune dirs
    assert not watch.excluded_dir_name("pkg", EXCLUDE)


# --------------------------------------------------------------------------- debouncer


def test_debouncer_burst_is_one_batch_at_last_change_plus_debounce() -> None:
    d = Debouncer(0.3)
    assert d.deadline() is None and d.take(100.0) is None
    for i in range(500):  # a git checkout: 500 writes over 0.5 s
        d.add(10.0 + i * 0.001, [f"/app/f{i}.py"])
    last = 10.0 + 499 * 0.001
    assert d.deadline() == pytest.approx(last + 0.3)
    assert d.take(last + 0.299) is None
    batch = d.take(last + 0.3)
    assert batch == Batch(tuple(f"/app/f{i}.py" for i in range(10)), 500)
    assert d.deadline() is None and d.take(1000.0) is None


def test_debouncer_two_bursts_separated_by_more_than_debounce() -> None:
    d = Debouncer(0.3)
    batches = []
    events = [(0.0, "a.py"), (0.1, "b.py"), (0.2, "a.py"), (1.0, "c.py"), (1.25, "c.py")]
    clock = 0.0
    for at, path in events:
        while clock < at:  # the master's loop: take() whenever it wakes
            batches += [b for b in [d.take(clock)] if b]
            clock = round(clock + 0.05, 2)
        d.add(at, [path])
    while d.deadline() is not None:
        batches += [b for b in [d.take(clock)] if b]
        clock = round(clock + 0.05, 2)
    assert batches == [Batch(("a.py", "b.py"), 2), Batch(("c.py",), 1)]


def test_debouncer_counts_distinct_paths_and_empty_add_is_activity() -> None:
    d = Debouncer(1.0)
    d.add(0.0, ["x", "y", "x"])
    d.add(0.5, [])
    assert d.deadline() == 1.5
    assert d.take(1.5) == Batch(("x", "y"), 2)


def test_debouncer_max_wait_cuts_endless_burst() -> None:
    d = Debouncer(0.3, max_wait=2.0)
    for i in range(100):
        d.add(i * 0.1, ["busy.py"])
    assert d.deadline() == 2.0
    assert d.take(2.0) == Batch(("busy.py",), 1)


# --------------------------------------------------------------------------- protocol and spec


def test_channel_handles_partial_lines_and_garbage() -> None:
    """The master's side of the helper protocol (supervisor.channel)."""
    ours, theirs = socket.socketpair()
    chan = Channel(ours, queue_sends=True)
    data = proto.encode(proto.Changed(["a"])) + b"garbage\n" + b'{"t":"changed","paths":[1]}\n' + \
        proto.encode(proto.Watching("inotify"))
    theirs.sendall(data[:5])
    assert chan.receive() == []  # half a line is not a message
    theirs.sendall(data[5:-3])
    first = wait_until(lambda: chan.receive(), message="first message")
    assert [r.message for r in first] == [proto.Changed(["a"])]
    theirs.sendall(data[-3:])
    second = wait_until(lambda: chan.receive(), message="second message")
    assert [r.message for r in second] == [proto.Watching("inotify")], "garbage and ill-typed lines are dropped"
    theirs.close()
    wait_until(lambda: chan.receive() == [] and chan.closed, message="EOF")

def test_spec_from_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    spec = spec_from_config(resolve(["app", "--chdir", "code"], {}))
    assert spec == WatchSpec(paths=(str(tmp_path / "code"),), include=INCLUDE, exclude=EXCLUDE,
                             poll=False, poll_interval=1.0, touch_files=())
    spec = spec_from_config(resolve(
        ["app", "--chdir", "code", "--watch", "/a", "--watch", "/b", "--watch-poll",
         "--watch-poll-interval", "250ms", "--watch-include", "*.py", "--touch-reload", "t"], {}))
    assert spec is not None
    assert spec.paths == ("/a", "/b") and spec.include == ("*.py",)
    assert spec.poll and spec.poll_interval == 0.25 and spec.touch_files == (str(tmp_path / "t"),)
    assert spec_from_config(resolve(["app"], {})) is None
    assert spec_from_config(resolve(["app", "--chdir", "/c", "--no-watch"], {})) is None
    spec = spec_from_config(resolve(["app", "--chdir", "/c", "--no-watch", "--touch-reload", "/t"], {}))
    assert spec is not None and spec.paths == () and spec.touch_files == ("/t",)


# --------------------------------------------------------------------------- helper process harness


class HelperProcess:
    """A forked helper_main and the parent's end of its socket."""

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid = pid
        self.sock = sock
        self.chan = Channel(sock, queue_sends=True)
        self.selector = selectors.DefaultSelector()
        self.selector.register(sock, selectors.EVENT_READ)
        self.backlog: list[dict[str, Any]] = []
        self.eof = False
        self.status: int | None = None

    def next(self, deadline: float) -> dict[str, Any] | None:
        """The next message, or None at the deadline (or EOF)."""
        while not self.backlog and not self.eof:
            left = deadline - time.monotonic()
            if left <= 0 or not self.selector.select(left):
                return None
            self.backlog += [{"event": r.message.kind, **asdict(r.message)} for r in self.chan.receive()]
            self.eof = self.chan.closed
        return self.backlog.pop(0) if self.backlog else None

    def wait_for(self, event: str, timeout: float = 5.0,
                 where: Callable[[dict[str, Any]], bool] = lambda m: True) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        seen = []
        while (message := self.next(deadline)) is not None:
            if message.get("event") == event and where(message):
                return message
            seen.append(message)
        raise AssertionError(f"no {event!r} message within {timeout}s; got {seen}")

    def collect(self, window: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + window
        messages = []
        while (message := self.next(deadline)) is not None:
            messages.append(message)
        return messages

    def close(self, timeout: float = 5.0) -> int | None:
        """Close our end (EOF for the helper) and wait for the child to exit."""
        if self.status is None:
            self.selector.close()
            self.sock.close()
            self.status = wait_exit(self.pid, timeout)
        return self.status


def fork_helper(spec: WatchSpec, prepare: Callable[[], None] = lambda: None) -> HelperProcess:
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            parent.close()
            prepare()
            watch.helper_main(child, spec)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    child.close()
    return HelperProcess(pid, parent)


@pytest.fixture
def start_helper() -> Iterator[Callable[..., HelperProcess]]:
    """Start a helper and wait for its `watching` handshake; every helper must exit 0 on EOF."""
    helpers: list[HelperProcess] = []

    def start(paths: tuple[str | Path, ...], prepare: Callable[[], None] = lambda: None,
              **kw: Any) -> HelperProcess:
        kw.setdefault("include", INCLUDE)
        kw.setdefault("exclude", EXCLUDE)
        spec = WatchSpec(paths=tuple(str(p) for p in paths), **kw)
        helper = fork_helper(spec, prepare)
        helpers.append(helper)
        helper.handshake = helper.wait_for("watching")  # type: ignore[attr-defined]
        return helper

    yield start
    for helper in helpers:
        assert helper.close() == 0, "the helper did not exit cleanly on EOF"


def changed_paths(messages: list[dict[str, Any]]) -> list[str]:
    return [p for m in messages if m["event"] == "changed" for p in m["paths"]]


@pytest.fixture
def app(tmp_path: Path) -> Path:
    root = tmp_path / "app"
    root.mkdir()
    (root / "app.py").write_text("x = 1\n")
    return Path(os.path.realpath(root))


# --------------------------------------------------------------------------- helper process tests


def test_edit_of_included_file_is_reported(start_helper: Callable[..., HelperProcess], app: Path) -> None:
    helper = start_helper((app,))
    assert helper.handshake == {  # type: ignore[attr-defined]
        "event": "watching", "mode": "inotify", "paths": [str(app)], "touch_files": [], "reason": None}
    (app / "app.py").write_text("x = 2\n")
    message = helper.wait_for("changed")
    assert message["paths"] == [str(app / "app.py")]


def test_touching_a_file_counts(start_helper: Callable[..., HelperProcess], app: Path) -> None:
    helper = start_helper((app,))
    os.utime(app / "app.py")
    assert helper.wait_for("changed")["paths"] == [str(app / "app.py")]


def test_missing_directory_is_watched_once_it_appears(start_helper: Callable[..., HelperProcess],
                                                      tmp_path: Path) -> None:
    later = Path(os.path.realpath(tmp_path)) / "later"
    helper = start_helper((later,))
    assert helper.handshake["paths"] == []  # type: ignore[attr-defined]
    later.mkdir()
    assert helper.wait_for("changed")["paths"] == [str(later)]
    (later / "app.py").write_text("x = 1\n")
    assert helper.wait_for("changed")["paths"] == [str(later / "app.py")]


def test_burst_of_writes_debounces_to_one_batch(start_helper: Callable[..., HelperProcess], app: Path) -> None:
    helper = start_helper((app,))
    for i in range(200):
        (app / f"mod_{i:03}.py").write_text(f"value = {i}\n")
    debouncer = Debouncer(0.3)
    batches: list[Batch] = []
    end = time.monotonic() + 10.0
    while time.monotonic() < end and not batches:  # the master's loop
        deadline = debouncer.deadline()
        message = helper.next(end if deadline is None else min(deadline, end))
        if message is not None and message["event"] == "changed":
            debouncer.add(time.monotonic(), message["paths"])
        batches += [b for b in [debouncer.take(time.monotonic())] if b]
    assert len(batches) == 1, "the burst did not end within 10 s"
    assert batches[0].count == 200
    assert len(batches[0].paths_sample) == 10
    # Nothing trails the burst: no second reload.
    assert changed_paths(helper.collect(0.6)) == []


def test_excluded_paths_never_trigger_but_included_do(start_helper: Callable[..., HelperProcess],
                                                      app: Path) -> None:
    helper = start_helper((app,))
    for rel in ["server.log", "__pycache__/app.cpython-311.pyc", "pkg/__pycache__/deep.py", ".git/HEAD",
                ".git/refs/heads/main.json", "node_modules/lib/index.py", "app.py~", ".#app.py",
                ".app.py.swp", "README.txt"]:
        (app / rel).parent.mkdir(parents=True, exist_ok=True)
        (app / rel).write_text("noise\n")
    os.rename(app / "server.log", app / "server.log.1")  # moved: neither name is included
    assert changed_paths(helper.collect(2.0)) == []
    # Negative control: the same helper is alive and reports an included file.
    (app / "pkg" / "views.py").write_text("y = 1\n")
    message = helper.wait_for("changed")
    assert message["paths"] == [str(app / "pkg" / "views.py")]


def test_move_reports_source_and_destination(start_helper: Callable[..., HelperProcess], app: Path) -> None:
    helper = start_helper((app,))
    os.rename(app / "app.py", app / "main.py")
    message = helper.wait_for("changed")
    assert set(message["paths"]) == {str(app / "app.py"), str(app / "main.py")}


def test_polling_mode_detects_an_edit(start_helper: Callable[..., HelperProcess], app: Path) -> None:
    (app / ".git").mkdir()
    helper = start_helper((app,), poll=True, poll_interval=0.1)
    assert helper.handshake["mode"] == "polling"  # type: ignore[attr-defined]
    assert helper.handshake["reason"] == "--watch-poll"  # type: ignore[attr-defined]
    (app / ".git" / "index.py").write_text("ignored\n")
    (app / "app.py").write_text("x = 3  # a different size\n")
    message = helper.wait_for("changed")
    assert message["paths"] == [str(app / "app.py")]


def test_inotify_failure_falls_back_to_polling(start_helper: Callable[..., HelperProcess], app: Path) -> None:
    helper = start_helper((app,), poll_interval=0.1, prepare=fail_inotify)
    handshake = helper.handshake  # type: ignore[attr-defined]
    assert handshake["mode"] == "polling"
    assert "inotify unavailable" in handshake["reason"] and "watch limit" in handshake["reason"]
    (app / "new.py").write_text("z = 1\n")
    message = helper.wait_for("changed")
    assert message["paths"] == [str(app / "new.py")]


def fail_inotify() -> None:
    """In the forked helper: starting inotify fails as at the watch limit (ENOSPC)."""
    def refuse() -> Any:
        raise OSError(errno.ENOSPC, "inotify watch limit reached (forced by the test)")

    watch._new_inotify_observer = refuse  # type: ignore[assignment]


def limit_inotify_watches(limit: int) -> None:
    """In this (single-threaded, forked) process: enter a new user namespace and cap
    its inotify watches, so the real ENOSPC path runs without touching the host."""
    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(0x10000000) != 0:  # CLONE_NEWUSER
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUSER)")
    Path("/proc/self/setgroups").write_text("deny")
    Path("/proc/self/uid_map").write_text(f"0 {uid} 1")
    Path("/proc/self/gid_map").write_text(f"0 {gid} 1")
    Path("/proc/sys/user/max_inotify_watches").write_text(str(limit))


@functools.cache
def user_namespaces_work() -> bool:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            limit_inotify_watches(3)
            code = 0
        finally:
            os._exit(code)
    return wait_exit(pid, 10.0) == 0


needs_userns = pytest.mark.skipif("not user_namespaces_work()",
                                  reason="cannot create a user namespace to cap inotify watches")


@needs_userns
def test_real_watch_limit_at_start_falls_back_to_polling(start_helper: Callable[..., HelperProcess],
                                                         app: Path) -> None:
    deep = app / "a" / "b" / "c" / "d" / "e" / "f"
    deep.mkdir(parents=True)
    helper = start_helper((app,), poll_interval=0.1, prepare=lambda: limit_inotify_watches(3))
    handshake = helper.handshake  # type: ignore[attr-defined]
    assert handshake["mode"] == "polling"
    assert "inotify watch limit reached" in handshake["reason"]
    (deep / "leaf.py").write_text("x = 1\n")
    assert helper.wait_for("changed")["paths"] == [str(deep / "leaf.py")]


@needs_userns
def test_real_watch_limit_on_new_directories_switches_to_polling(
        start_helper: Callable[..., HelperProcess], app: Path) -> None:
    helper = start_helper((app,), poll_interval=0.1, prepare=lambda: limit_inotify_watches(3))
    assert helper.handshake["mode"] == "inotify"  # type: ignore[attr-defined]
    for name in ("d1", "d2", "d3", "d4"):
        (app / name).mkdir()
    switched = helper.wait_for("watching")
    assert switched["mode"] == "polling" and "watch limit" in switched["reason"]
    assert helper.wait_for("changed")["paths"] == [str(app)]  # what happened meanwhile is unknown
    (app / "d4" / "late.py").write_text("x = 1\n")
    assert helper.wait_for("changed")["paths"] == [str(app / "d4" / "late.py")]


def test_symlink_swap_retargets_and_reloads(start_helper: Callable[..., HelperProcess], tmp_path: Path) -> None:
    base = Path(os.path.realpath(tmp_path))
    for release in ("release-1", "release-2"):
        (base / release).mkdir()
        (base / release / "app.py").write_text(f"RELEASE = {release!r}\n")
    current = base / "current"
    current.symlink_to("release-1")
    helper = start_helper((current,))
    assert helper.handshake["paths"] == [str(base / "release-1")]  # type: ignore[attr-defined]
    # ln -sfn release-2 current, atomically: new link under a temporary name, then rename over.
    os.symlink("release-2", base / "current.tmp")
    os.replace(base / "current.tmp", current)
    retarget = helper.wait_for("retarget")
    assert retarget == {"event": "retarget", "path": str(current), "target": str(base / "release-2")}
    assert helper.wait_for("changed")["paths"] == [str(current)]
    # Now release-2 is watched, release-1 is not.
    (base / "release-1" / "app.py").write_text("old = 1\n")
    (base / "release-2" / "app.py").write_text("new = 1\n")
    message = helper.wait_for("changed")
    assert message["paths"] == [str(base / "release-2" / "app.py")]


def test_watching_a_single_file(start_helper: Callable[..., HelperProcess], app: Path) -> None:
    (app / "other.py").write_text("")
    helper = start_helper((app / "app.py",), include=("*.nothing",))
    (app / "other.py").write_text("ignored\n")
    (app / "app.py").write_text("x = 4\n")
    message = helper.wait_for("changed")
    assert message["paths"] == [str(app / "app.py")]


def test_touch_file_without_watch_paths(start_helper: Callable[..., HelperProcess], tmp_path: Path) -> None:
    touch = tmp_path / "reload.trigger"
    helper = start_helper((), touch_files=(str(touch),))
    assert helper.handshake["mode"] == "polling"  # type: ignore[attr-defined]
    assert helper.handshake["paths"] == []  # type: ignore[attr-defined]
    touch.write_text("")  # creating it counts
    assert helper.wait_for("changed")["paths"] == [str(touch)]
    mtime = touch.stat().st_mtime_ns
    os.utime(touch, ns=(mtime + 10**9, mtime + 10**9))  # touch
    assert helper.wait_for("changed")["paths"] == [str(touch)]


def test_helper_started_by_the_master_exits_when_master_closes_socket(app: Path) -> None:
    """The product's path: supervisor.master.helpers forks helper_main (as the master does)."""
    spec = WatchSpec(paths=(str(app),), include=INCLUDE, exclude=EXCLUDE)
    pid, chan = master_fork_helper(lambda sock: watch.helper_main(sock, spec))
    helper = HelperProcess(pid, chan.sock)
    helper.wait_for("watching")
    started = time.monotonic()
    assert helper.close(timeout=3.0) == 0
    assert time.monotonic() - started < 3.0
