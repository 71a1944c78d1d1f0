"""The master's running totals for the metrics, folded from the workers' heartbeats.

A worker sends its cumulative counts with every heartbeat; `Totals.beat` adds what grew since
that worker's previous beat.  So the totals only ever grow while supervise runs (a Prometheus
counter never goes down), a lost or late beat loses nothing, and a worker's requests stay
counted after it exits or its generation retires."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Histogram:
    """Bucket counts (the last one is +Inf), their sum and count: a Prometheus histogram."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        i = 0
        while i < len(self.bounds) and value > self.bounds[i]:
            i += 1
        self.counts[i] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)


@dataclass
class _Seen:
    counts: dict[str, int]
    hist: list[int]
    seconds: float


class Totals:
    """Requests by "STATUS METHOD" and their duration histogram, over every worker ever."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.requests: dict[str, int] = {}
        self.durations = Histogram(bounds)
        self._seen: dict[int, _Seen] = {}

    def beat(self, pid: int, counts: dict[str, int], hist: list[int], seconds: float) -> None:
        seen = self._seen.get(pid) or _Seen({}, [0] * len(hist), 0.0)
        for key, value in counts.items():
            grew = value - seen.counts.get(key, 0)
            if grew > 0:
                self.requests[key] = self.requests.get(key, 0) + grew
        if len(hist) == len(self.durations.counts):
            for i, value in enumerate(hist):
                grew = value - (seen.hist[i] if i < len(seen.hist) else 0)
                if grew > 0:
                    self.durations.counts[i] += grew
        if seconds > seen.seconds:
            self.durations.total += seconds - seen.seconds
        self._seen[pid] = _Seen(dict(counts), list(hist), seconds)

    def forget(self, pid: int) -> None:
        """The worker is gone; what it counted stays in the totals."""
        self._seen.pop(pid, None)
