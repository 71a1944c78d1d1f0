"""What a worker counts for the metrics: requests by status and method, and a histogram of
their durations.  Cumulative: the worker sends the totals with every heartbeat, and the master
adds what grew since the last one, so a lost or late beat loses nothing and a worker's counts
outlive it (supervisor/lifecycle/metrics.py)."""

from __future__ import annotations

from bisect import bisect_left

from supervisor.proto import DURATION_BUCKETS as BUCKETS
# Methods get their own label; any other (an extension method) is "other": labels stay bounded.
METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"))


class RequestStats:
    """Counted per request with as little work as possible (a tuple key, a bisect); the labels
    are made once per heartbeat by `by_label`."""

    __slots__ = ("counts", "hist", "seconds")

    def __init__(self) -> None:
        self.counts: dict[tuple[int, str], int] = {}  # (status, method) -> requests
        self.hist = [0] * (len(BUCKETS) + 1)
        self.seconds = 0.0

    def record(self, status: int, method: str, seconds: float) -> None:
        counts = self.counts
        key = (status, method)
        counts[key] = counts.get(key, 0) + 1
        self.hist[bisect_left(BUCKETS, seconds)] += 1
        self.seconds += seconds

    def by_label(self) -> dict[str, int]:
        """The counts by "STATUS METHOD", extension methods as "other" (bounded labels: the
        parser knows a fixed set of methods, so the tuple keys are bounded too)."""
        labels: dict[str, int] = {}
        for (status, method), n in list(self.counts.items()):
            key = f"{status} {method if method in METHODS else 'other'}"
            labels[key] = labels.get(key, 0) + n
        return labels


class NoStats(RequestStats):
    """--no-metrics: nothing is counted (the heartbeat carries empty totals)."""

    __slots__ = ()

    def record(self, status: int, method: str, seconds: float) -> None:
        pass
