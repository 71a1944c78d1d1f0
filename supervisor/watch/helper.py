"""The code watcher, the helper process: reports file changes to the master.

The master is single-threaded and forks workers, so the watchdog Observer (which runs
threads) lives in this helper process, forked from the master.  `helper_main` is its body.
It sends the master (`supervisor.proto`):

    Watching(mode, paths, touch_files, reason)
        the observer (re)started; `paths` are the real directories watched,
        `reason` says why polling is used (None with inotify)
    Changed(paths)
        files that passed the include/exclude filters (events arriving within
        BATCH_WINDOW are sent as one message; the lifecycle debounces)
    Retarget(path, target)
        watched path P now resolves to T (a re-pointed symlink, or a path
        that appeared); the watch moved there and a Changed follows
    HelperWarning(message)
        something the master should log (watchdog warnings, a missing path)
    HelperFailing(message)
        the helper is about to die of an unexpected exception

The master sends nothing; the helper exits when the channel reaches EOF.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import select
import socket
import stat
import sys
import threading
import time
import warnings
from typing import Any, NamedTuple

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver
from watchdog.observers.inotify import InotifyEmitter, InotifyObserver
from watchdog.observers.polling import PollingObserverVFS

from supervisor import proto
from supervisor.channel import Channel
from supervisor.watch.spec import WatchSpec, excluded_dir_name, path_matches

try:  # watchdog >= 7: one inotify instance per observer, which we can wrap
    from watchdog.observers.inotify_c import InotifyFD
except ImportError:  # pragma: no cover - older watchdog: limits hit below the root go unnoticed
    InotifyFD = None  # type: ignore[assignment,misc]

CHECK_INTERVAL = 0.5  # seconds between symlink-target and touch-file checks
BATCH_WINDOW = 0.05  # seconds the helper gathers events into one `changed` message
# watchdog walks a tree with os.walk, recursive before Python 3.12: one frame per level.  A path
# is at most PATH_MAX (4096) bytes, so no tree it can watch is deeper than 2048 levels.
WALK_RECURSION_LIMIT = 2048 + 500
WARNING_CHARS = 300  # a forwarded warning's text is cut here (watchdog's repr whole watch tables)

# Event types that mean "content changed".  Opened / closed-no-write are left
# out so that workers importing modules do not wake the helper.  Directory
# types are listed only so that watchdog keeps watching new subdirectories and
# reports moves of whole trees as per-file moves; directory events themselves
# never trigger.
_EVENT_FILTER: list[type[FileSystemEvent]] = [
    FileCreatedEvent, FileModifiedEvent, FileDeletedEvent, FileMovedEvent, FileAttribEvent,
    DirCreatedEvent, DirDeletedEvent, DirMovedEvent,
]


# --------------------------------------------------------------------------- protocol


class _Target(NamedTuple):
    """What a watched path resolves to.  A changed value means: watch again."""

    real: str
    dev: int
    ino: int  # 0 for a file: editors replace files, only the name matters
    is_dir: bool


def _resolve(path: str) -> _Target | None:
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError:
        return None
    is_dir = stat.S_ISDIR(st.st_mode)
    return _Target(real, st.st_dev, st.st_ino if is_dir else 0, is_dir)


def _mtime(path: str) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


# An inbox item: ("paths", [str]), ("check", None), ("warning", str) or ("eof", None).
_Item = tuple[str, Any]


class _ChangeHandler(FileSystemEventHandler):
    """Runs on the observer thread: filters events of one root into the inbox."""

    def __init__(self, target: _Target, spec: WatchSpec, inbox: queue.Queue[_Item]) -> None:
        self._target = target
        self._spec = spec
        self._inbox = inbox

    def dispatch(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            return
        candidates = [os.fsdecode(p) for p in (event.src_path, event.dest_path) if p]
        hits = [p for p in candidates if self._accepts(p)]
        if hits:
            self._inbox.put(("paths", hits))

    def _accepts(self, path: str) -> bool:
        if not self._target.is_dir:
            return path == self._target.real
        return path_matches(path, self._target.real, self._spec.include, self._spec.exclude)


class _LinkHandler(FileSystemEventHandler):
    """Watches a symlink's directory: a re-pointed link triggers an immediate check."""

    def __init__(self, link: str, inbox: queue.Queue[_Item]) -> None:
        self._link = link
        self._inbox = inbox

    def dispatch(self, event: FileSystemEvent) -> None:
        if self._link in (os.fsdecode(event.src_path), os.fsdecode(event.dest_path)):
            self._inbox.put(("check", None))


class _WarningForwarder(logging.Handler):
    """Forwards watchdog's warnings to the master.  A lost-events overflow counts as a change."""

    def __init__(self, inbox: queue.Queue[_Item], roots: list[str]) -> None:
        super().__init__(logging.WARNING)
        self._inbox = inbox
        self.roots = roots

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:
            message = str(record.msg)
        self._inbox.put(("warning", f"watchdog: {message}"))
        if "overflow" in message.lower() and self.roots:
            self._inbox.put(("paths", list(self.roots)))


class _PythonWarnings:
    """Python warnings raised in this process (watchdog's RuntimeWarnings about its watch table,
    seen with deep trees created while watched) go to the master, which logs them as events,
    instead of printing plain text into the JSON log.  Each source line is reported once: the
    same warning repeats for every directory of a tree."""

    def __init__(self, inbox: queue.Queue[_Item]) -> None:
        self._inbox = inbox
        self._seen: set[tuple[str, int, str]] = set()

    def show(self, message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: Any = None, line: str | None = None) -> None:
        """Replaces warnings.showwarning in the watcher process."""
        key = (filename, lineno, category.__name__)
        if key in self._seen:
            return
        self._seen.add(key)
        text = " ".join(str(message).split())
        if len(text) > WARNING_CHARS:
            text = text[:WARNING_CHARS] + "..."
        self._inbox.put(("warning", f"{category.__name__}: {text} ({os.path.basename(filename)}:{lineno}; "
                                    "reported once per source line)"))


_LIMIT_ERRNOS = (errno.ENOSPC, errno.EMFILE, errno.ENOMEM)


def _new_inotify_observer() -> BaseObserver:
    return _RecordingInotifyObserver() if InotifyFD is not None else InotifyObserver()


if InotifyFD is not None:

    class _RecordingInotifyFD(InotifyFD):
        """Remembers a watch-limit error.  watchdog swallows errors on subdirectories
        (at start and when a new directory appears), which would leave part of
        the tree silently unwatched."""

        limit_error: OSError | None = None

        def add_callback(self, path: bytes, mask: Any, callback: Any, id_: Any) -> Any:
            try:
                return super().add_callback(path, mask, callback, id_)
            except OSError as exc:
                if exc.errno in _LIMIT_ERRNOS and self.limit_error is None:
                    self.limit_error = exc
                raise

    class _RecordingInotifyObserver(BaseObserver):
        """watchdog's InotifyObserver with a _RecordingInotifyFD."""

        def __init__(self) -> None:
            self.inotify_fd = _RecordingInotifyFD()
            self.inotify_fd.start()
            super().__init__(InotifyEmitter, inotify_fd=self.inotify_fd)

        def on_thread_stop(self) -> None:
            super().on_thread_stop()
            self.inotify_fd.stop()
            self.inotify_fd.join()


def _limit_error(observer: BaseObserver | None) -> OSError | None:
    """The watch-limit error an inotify observer hit, if any (start or later)."""
    fd = getattr(observer, "inotify_fd", None)
    return getattr(fd, "limit_error", None)


class Watcher:
    """The watcher process's state, used only by its main thread."""

    def __init__(self, chan: Channel, spec: WatchSpec, inbox: queue.Queue[_Item]) -> None:
        self._chan = chan
        self._spec = spec
        self._inbox = inbox
        self._observer: BaseObserver | None = None
        self._poll_reason: str | None = "--watch-poll" if spec.poll else None
        self._targets: dict[str, _Target | None] = {}
        self._mtimes: dict[str, int | None] = {}
        self._forwarder = _WarningForwarder(inbox, [])
        self._pending: dict[str, None] = {}  # paths gathered for the next `changed`
        self._flush_at: float | None = None

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        warnings.showwarning = _PythonWarnings(self._inbox).show  # this process is ours alone
        watchdog_logger = logging.getLogger("watchdog")
        watchdog_logger.propagate = False  # only to the master, not to inherited handlers
        watchdog_logger.addHandler(self._forwarder)
        self._mtimes = {f: _mtime(f) for f in self._spec.touch_files}
        self._targets = {p: _resolve(p) for p in self._spec.paths}
        self._restart()

    def close(self) -> None:
        logging.getLogger("watchdog").removeHandler(self._forwarder)
        self._stop_observer()

    def run(self) -> None:
        """Main loop: gather events into `changed` messages, check links and touch files."""
        next_check = time.monotonic() + CHECK_INTERVAL
        while True:
            wake = next_check if self._flush_at is None else min(next_check, self._flush_at)
            kind, payload = _get(self._inbox, wake - time.monotonic())
            if kind == "eof":
                return
            if kind == "check":
                next_check = time.monotonic()
            self._receive(kind, payload)
            if self._flush_at is not None and time.monotonic() >= self._flush_at:
                self._send_changed(list(self._pending))
                self._pending, self._flush_at = {}, None
            if time.monotonic() >= next_check:
                self._check()
                next_check = time.monotonic() + CHECK_INTERVAL

    def _receive(self, kind: str, payload: Any) -> None:
        if kind == "paths":
            self._pending.update(dict.fromkeys(payload))
            if self._flush_at is None:
                self._flush_at = time.monotonic() + BATCH_WINDOW
        elif kind == "warning":
            self._send(proto.HelperWarning(payload))

    # ---------------------------------------------------------------- periodic checks

    def _check(self) -> None:
        self._check_inotify_limit()
        self._check_targets()
        self._check_touch_files()

    def _check_inotify_limit(self) -> None:
        """A new directory could not be watched: switch to polling, and reload once,
        since what was written there meanwhile is unknown."""
        error = _limit_error(self._observer)
        if error is not None and self._poll_reason is None:
            self._poll_reason = f"inotify unavailable ({error}); polling every {self._spec.poll_interval:g}s"
            self._restart()
            self._send_changed([p for p, t in self._targets.items() if t is not None])

    def _check_targets(self) -> None:
        current = {p: _resolve(p) for p in self._spec.paths}
        if current == self._targets:
            return
        moved = [p for p in self._spec.paths if current[p] != self._targets.get(p)]
        for path in moved:
            old, new = self._targets.get(path), current[path]
            if new is not None and (old is None or old.real != new.real):
                self._send(proto.Retarget(path, new.real))
        self._targets = current
        self._restart()
        self._send_changed(moved)

    def _check_touch_files(self) -> None:
        touched = []
        for path in self._spec.touch_files:
            mtime = _mtime(path)
            if mtime is not None and mtime != self._mtimes.get(path):
                touched.append(path)
            self._mtimes[path] = mtime
        if touched:
            self._send_changed(touched)

    # ---------------------------------------------------------------- observer

    def _restart(self) -> None:
        self._stop_observer()
        targets = [t for t in self._targets.values() if t is not None]
        self._forwarder.roots = [t.real for t in targets]
        for path, target in self._targets.items():
            if target is None:
                self._send(proto.HelperWarning(f"watched path does not exist: {path}"))
        if not self._spec.paths:
            self._send_watching("polling", "only touch files", targets)
            return
        if self._poll_reason is None and self._start_inotify(targets):
            self._send_watching("inotify", None, targets)
            return
        if self._poll_reason is not None and self._start_polling(targets):
            self._send_watching("polling", self._poll_reason, targets)

    def _start_inotify(self, targets: list[_Target]) -> bool:
        """Start inotify; on failure set the polling reason, or warn when a path vanished."""
        try:
            self._observer = self._launch(_new_inotify_observer(), targets, link_watches=True)
            error = _limit_error(self._observer)
            if error is not None:
                raise error
            return True
        except OSError as exc:
            self._stop_observer()
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):  # raced with a deploy: next check retries
                self._send(proto.HelperWarning(f"watched path vanished while starting: {exc}"))
                return False
            self._poll_reason = f"inotify unavailable ({exc}); polling every {self._spec.poll_interval:g}s"
            return False

    def _start_polling(self, targets: list[_Target]) -> bool:
        exclude = self._spec.exclude

        def listdir(path: str | None) -> list[os.DirEntry[str]]:
            with os.scandir(path) as entries:
                return [e for e in entries if not (e.is_dir(follow_symlinks=False)
                                                   and excluded_dir_name(e.name, exclude))]

        observer = PollingObserverVFS(os.lstat, listdir, polling_interval=self._spec.poll_interval)  # type: ignore[arg-type]
        try:
            self._observer = self._launch(observer, targets, link_watches=False)
            return True
        except OSError as exc:
            self._send(proto.HelperWarning(f"cannot watch by polling: {exc}"))
            return False

    def _launch(self, observer: BaseObserver, targets: list[_Target], link_watches: bool) -> BaseObserver:
        try:
            for target in targets:
                handler = _ChangeHandler(target, self._spec, self._inbox)
                where = target.real if target.is_dir else os.path.dirname(target.real)
                observer.schedule(handler, where, recursive=target.is_dir, event_filter=_EVENT_FILTER)
            if link_watches:
                self._schedule_link_watches(observer)
            observer.start()
        except BaseException:
            _stop(observer)
            raise
        return observer

    def _schedule_link_watches(self, observer: BaseObserver) -> None:
        for path in self._spec.paths:
            parent = os.path.dirname(path)
            if os.path.islink(path) and os.path.isdir(parent):
                observer.schedule(_LinkHandler(path, self._inbox), parent, recursive=False,
                                  event_filter=_EVENT_FILTER)

    def _stop_observer(self) -> None:
        if self._observer is not None:
            _stop(self._observer)
            self._observer = None

    # ---------------------------------------------------------------- messages

    def _send_watching(self, mode: str, reason: str | None, targets: list[_Target]) -> None:
        self._send(proto.Watching(mode, [t.real for t in targets], list(self._spec.touch_files), reason))

    def _send_changed(self, paths: list[str]) -> None:
        if paths:
            self._send(proto.Changed(paths))

    def _send(self, message: proto.Message) -> None:
        if not self._chan.send(message):
            raise BrokenPipeError("the master is gone")


def _stop(observer: BaseObserver) -> None:
    try:
        observer.stop()
        if observer.is_alive():
            observer.join(timeout=2.0)
    except Exception:  # stopping is best effort: the helper may be about to exit
        pass


def _get(inbox: queue.Queue[_Item], timeout: float) -> _Item:
    try:
        return inbox.get(timeout=max(0.0, timeout))
    except queue.Empty:
        return ("idle", None)


def _watch_eof(chan: Channel, inbox: queue.Queue[_Item]) -> threading.Thread:
    """A thread that waits for the master to close the channel (it sends the watcher
    nothing) and reports it."""

    def run() -> None:
        poller = select.poll()
        poller.register(chan.sock, select.POLLIN)
        while not chan.closed:
            poller.poll()
            chan.receive()
        inbox.put(("eof", None))

    thread = threading.Thread(target=run, name="watch-eof", daemon=True)
    thread.start()
    return thread


def helper_main(sock: socket.socket, spec: WatchSpec) -> None:
    """Body of the watcher process: watch, report on `sock`, return at EOF.

    Call it in a freshly forked child and `os._exit` when it returns.  It runs
    threads (the observer's) and never forks.
    """
    sys.setrecursionlimit(max(sys.getrecursionlimit(), WALK_RECURSION_LIMIT))  # this process is ours
    chan = Channel(sock, queue_sends=False)
    inbox: queue.Queue[_Item] = queue.Queue()
    _watch_eof(chan, inbox)
    watcher = Watcher(chan, spec, inbox)
    try:
        watcher.start()
        watcher.run()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the master is gone
    except Exception as exc:
        chan.send(proto.HelperFailing(f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        watcher.close()
