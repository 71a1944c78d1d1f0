"""GET /metrics: the lifecycle's state and totals in the Prometheus text format.

Exposition is prometheus_client's own (its text format, its process collector for the
master's RSS and CPU); the numbers come from the pure core at scrape time, so nothing is
counted twice and the cost is paid per scrape, not per request.  The request counts are the
workers' own, folded by the master from their heartbeats (supervisor/lifecycle/metrics.py):
they survive a worker's or a generation's retirement and never go down while supervise runs.
"""

from __future__ import annotations

import socket
import struct
import time
from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from supervisor import proto
from supervisor.lifecycle.core import HEARTBEAT_STALE, Lifecycle
from supervisor.lifecycle.metrics import Histogram
from supervisor.lifecycle.pool import RELOAD_BUCKETS, WorkerState
from supervisor.lifecycle.view import Memory

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_TCP_INFO_LEN = 104
INLINE_BUSY_AFTER = 1.5  # --threads 1: a worker whose heartbeat is this late is inside a request


def listen_queue(sock: socket.socket) -> tuple[int, int] | None:
    """(connections waiting in the accept queue, its size) of a listening TCP socket, from
    the kernel (TCP_INFO: tcpi_unacked and tcpi_sacked hold them for a listener)."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    except OSError:
        return None
    unacked, sacked = struct.unpack_from("II", info, 24)
    return unacked, sacked


class _Collector:
    def __init__(self, core: Lifecycle, listeners: list[socket.socket], rss: Callable[[int], int | None],
                 clock: Callable[[], float]) -> None:
        self.core, self.listeners, self.rss, self.clock = core, listeners, rss, clock
        self.memory: Memory | None = None  # rss, uss, pss, shared of a pid (--preload, --max-memory)

    def collect(self) -> Iterator[Metric]:
        core, now = self.core, self.clock()
        pool, totals = core.pool, core.totals
        requests = CounterMetricFamily("supervise_http_requests", "Requests answered, by status code and method.",
                                       labels=["code", "method"])
        for key, value in sorted(totals.requests.items()):
            code, _, method = key.partition(" ")
            requests.add_metric([code, method], value)
        yield requests
        yield _histogram("supervise_http_request_duration_seconds", "Time from a whole request to the end of "
                         "its response.", totals.durations, proto.DURATION_BUCKETS)
        in_flight = sum(w.busy for w in pool.serving_workers())
        if core.plan.threads == 1:
            in_flight += sum(1 for w in pool.serving_workers() if now - w.last_seen > INLINE_BUSY_AFTER)
        yield GaugeMetricFamily("supervise_http_requests_in_flight", "Requests being served (with --threads 1, "
                                "workers whose heartbeat is late, so inside a request).", value=in_flight)
        workers = GaugeMetricFamily("supervise_workers", "Worker processes, by state.", labels=["state"])
        for state in WorkerState:
            workers.add_metric([state.value], sum(1 for w in pool.workers.values() if w.state == state))
        yield workers
        yield GaugeMetricFamily("supervise_workers_target", "Workers per generation (--workers, or as scaled).",
                                value=len(pool.slots))
        yield GaugeMetricFamily("supervise_workers_available", "Serving workers that can take a request now "
                                f"(a heartbeat within {HEARTBEAT_STALE:g} s and a free thread).",
                                value=len(core.available_workers(now)))
        exits = CounterMetricFamily("supervise_worker_exits", "Worker exits, by reason.", labels=["reason"])
        for reason in ("retired", "recycled", "crashed", "boot_failed", "timeout", "killed"):
            exits.add_metric([reason], pool.exits.get(reason, 0))
        yield exits
        reloads = CounterMetricFamily("supervise_reloads", "Reloads, by result.", labels=["result"])
        for result in ("ok", "failed", "superseded"):
            reloads.add_metric([result], pool.reload_results.get(result, 0))
        yield reloads
        phases = HistogramMetricFamily("supervise_reload_duration_seconds", "Reload phases: boot (trigger to "
                                       "new generation ready), drain (ready to old generation gone).",
                                       labels=["phase"])
        for phase, hist in pool.reload_phases.items():
            phases.add_metric([phase], _buckets(hist, RELOAD_BUCKETS), sum_value=hist.total)
        yield phases
        serving = pool.serving_generation()
        yield GaugeMetricFamily("supervise_generation", "The serving generation's number.",
                                value=serving.number if serving else 0)
        yield GaugeMetricFamily("supervise_healthy", "1 while /health answers 200.", value=int(core.can_serve(now)))
        queue = GaugeMetricFamily("supervise_listen_queue", "Connections waiting in the kernel's accept queue.",
                                  labels=["listener"])
        backlog = GaugeMetricFamily("supervise_listen_backlog", "Size of the accept queue.", labels=["listener"])
        for sock in self.listeners:
            got = listen_queue(sock) if sock.family != socket.AF_UNIX else None
            if got is not None:
                name = _address(sock)
                queue.add_metric([name], got[0])
                backlog.add_metric([name], got[1])
        yield queue
        yield backlog
        memory = GaugeMetricFamily("supervise_worker_resident_memory_bytes", "Each worker's resident memory.",
                                   labels=["worker", "generation"])
        for w in pool.workers.values():
            rss = self.rss(w.pid)
            if rss is not None:
                memory.add_metric([str(w.slot), str(w.generation)], rss)
        yield memory
        if self.memory is not None:
            yield from self._memory(pool)

    def _memory(self, pool: Any) -> Iterator[Metric]:
        """--preload / --max-memory: unique and shared memory of each worker, and the zygotes."""
        assert self.memory is not None
        unique = GaugeMetricFamily("supervise_worker_unique_memory_bytes",
                                   "Each worker's unique memory (USS): what it alone holds.",
                                   labels=["worker", "generation"])
        shared = GaugeMetricFamily("supervise_worker_shared_memory_bytes",
                                   "Each worker's resident memory shared with other processes (with --preload, "
                                   "mostly its zygote's heap, copy-on-write).", labels=["worker", "generation"])
        zygote = GaugeMetricFamily("supervise_zygote_memory_bytes",
                                   "Each generation's zygote (--preload): its unique (uss) and proportional (pss) "
                                   "memory.", labels=["generation", "kind"])
        for w in pool.workers.values():
            _, uss, _, sh = self.memory(w.pid)
            if uss is not None:
                unique.add_metric([str(w.slot), str(w.generation)], uss)
            if sh is not None:
                shared.add_metric([str(w.slot), str(w.generation)], sh)
        for z in pool.zygotes.values():
            if z.pid is None:
                continue
            _, uss, pss, _ = self.memory(z.pid)
            for kind, value in (("uss", uss), ("pss", pss)):
                if value is not None:
                    zygote.add_metric([str(z.generation), kind], value)
        yield unique
        yield shared
        yield zygote


def _buckets(hist: Histogram, bounds: tuple[float, ...]) -> list[tuple[str, float]]:
    cumulative, out = 0, []
    for bound, count in zip((*bounds, float("inf")), hist.counts):
        cumulative += count
        out.append(("+Inf" if bound == float("inf") else repr(float(bound)), cumulative))
    return out


def _histogram(name: str, doc: str, hist: Histogram, bounds: tuple[float, ...]) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, doc, buckets=_buckets(hist, bounds), sum_value=hist.total)


def _address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Metrics:
    """The registry the health server renders on GET /metrics."""

    def __init__(self, core: Lifecycle, listeners: list[socket.socket], rss: Callable[[int], int | None],
                 memory: Memory | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        collector = _Collector(core, listeners, rss, time.monotonic)
        collector.memory = memory
        self.registry.register(collector)  # type: ignore[arg-type]
        ProcessCollector(registry=self.registry)  # the master's own RSS, CPU, descriptors

    def render(self) -> bytes:
        return generate_latest(self.registry)

