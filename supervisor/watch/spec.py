"""The code watcher, the master's part: what to watch (`WatchSpec`, from the settings) and
which changed paths count (`path_matches`).  Pure; the watching itself runs in the helper
process (`supervisor.watch.helper`), and bursts are debounced by the lifecycle
(`supervisor.lifecycle.debounce`)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase

from supervisor.settings import Config


@dataclass(frozen=True)
class WatchSpec:
    """What the helper watches.  Paths are absolute and not resolved (a symlink
    stays a symlink so that re-pointing it is noticed)."""

    paths: tuple[str, ...]
    include: tuple[str, ...]
    exclude: tuple[str, ...]
    poll: bool = False
    poll_interval: float = 1.0
    touch_files: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.poll_interval <= 0:
            raise ValueError("poll_interval must be greater than zero")


def spec_from_config(config: Config) -> WatchSpec | None:
    """Build the spec from a `Config`; None when there is nothing to watch.

    Watched paths are --watch, else --chdir; none with --no-watch (touch files
    still count).  Relative paths are made absolute against the current
    directory, so call this in the master before anything changes directory.
    """
    touch = _absolute(config.touch_reload or ())
    paths: tuple[str, ...] = ()
    if not config.no_watch:
        paths = _absolute(config.watch or ((config.chdir,) if config.chdir else ()))
    if not paths and not touch:
        return None
    return WatchSpec(
        paths=paths,
        include=tuple(config.watch_include or ()),
        exclude=tuple(config.watch_exclude or ()),
        poll=bool(config.watch_poll),
        poll_interval=float(config.watch_poll_interval or 1.0),
        touch_files=touch,
    )


def _absolute(paths: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(os.path.abspath(p) for p in paths))


# --------------------------------------------------------------------------- filters


def path_matches(path: str, root: str, include: Iterable[str], exclude: Iterable[str]) -> bool:
    """Whether a change to `path` (a file under directory `root`) should trigger a reload.

    A pattern ending in "/" names a directory at any depth below root
    (".git/", "__pycache__/"); a pattern containing another "/" is matched
    against the path relative to root; any other pattern is matched against
    the basename.  Exclude wins over include; an empty include list includes
    everything.  Paths outside root never match.
    """
    rel = os.path.relpath(path, root)
    if rel == os.curdir or rel == os.pardir or rel.startswith(os.pardir + os.sep):
        return False
    parts = rel.split(os.sep)
    if any(_pattern_hits(p, parts) for p in exclude):
        return False
    include = tuple(include)
    return not include or any(_pattern_hits(p, parts) for p in include)


def _pattern_hits(pattern: str, parts: list[str]) -> bool:
    if pattern.endswith("/"):
        name = pattern.rstrip("/")
        return any(fnmatchcase(d, name) for d in parts[:-1])
    if "/" in pattern:
        return fnmatchcase("/".join(parts), pattern)
    return fnmatchcase(parts[-1], pattern)


def excluded_dir_name(name: str, exclude: Iterable[str]) -> bool:
    """Whether a directory called `name` is excluded by a trailing-/ pattern."""
    return any(p.endswith("/") and fnmatchcase(name, p.rstrip("/")) for p in exclude)
