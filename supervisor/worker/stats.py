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
    __slots__ = ("counts", "hist", "seconds")

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}  # "STATUS METHOD" -> requests
        self.hist = [0] * (len(BUCKETS) + 1)
        self.seconds = 0.0

    def record(self, status: int, method: str, seconds: float) -> None:
        key = f"{status} {method if method in METHODS else 'other'}"
        counts = self.counts
        counts[key] = counts.get(key, 0) + 1
        self.hist[bisect_left(BUCKETS, seconds)] += 1
        self.seconds += seconds


class NoStats(RequestStats):
    """--no-metrics: nothing is counted (the heartbeat carries empty totals)."""

    __slots__ = ()

    def record(self, status: int, method: str, seconds: float) -> None:
        pass
