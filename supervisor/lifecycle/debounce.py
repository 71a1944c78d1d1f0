"""Debouncer: a burst of file changes becomes one reload."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

SAMPLE_SIZE = 10  # paths kept in Batch.paths_sample


@dataclass(frozen=True)
class Batch:
    """One burst of changes: the first few paths and how many distinct paths changed."""

    paths_sample: tuple[str, ...]
    count: int


class Debouncer:
    """Turns a burst of changes into one reload.  Pure: the caller passes the time.

    The burst is over `debounce` seconds after its last change.  With
    `max_wait`, a burst that never goes quiet is cut `max_wait` seconds after
    its first change (None: wait for quiet however long it takes).
    """

    def __init__(self, debounce: float, max_wait: float | None = None, sample_size: int = SAMPLE_SIZE) -> None:
        self._debounce = debounce
        self._max_wait = max_wait
        self._sample_size = sample_size
        self._first: float | None = None
        self._last: float | None = None
        self._paths: dict[str, None] = {}

    def add(self, now: float, paths: Iterable[str]) -> None:
        """Record a change at `now` (an empty `paths` still counts as activity)."""
        if self._first is None:
            self._first = now
        self._last = now if self._last is None else max(self._last, now)
        self._paths.update(dict.fromkeys(paths))

    def deadline(self) -> float | None:
        """When the current burst will be over, or None when nothing is pending."""
        if self._first is None or self._last is None:
            return None
        quiet = self._last + self._debounce
        return quiet if self._max_wait is None else min(quiet, self._first + self._max_wait)

    def take(self, now: float) -> Batch | None:
        """The finished burst (and forget it), or None while it is still going on."""
        deadline = self.deadline()
        if deadline is None or now < deadline:
            return None
        batch = Batch(tuple(list(self._paths)[: self._sample_size]), len(self._paths))
        self._first = self._last = None
        self._paths = {}
        return batch
