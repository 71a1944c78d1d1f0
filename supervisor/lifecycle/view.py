"""The health JSON: the lifecycle's state as an operator reads it (GET /health)."""

from __future__ import annotations

from typing import Any, Callable

from supervisor.lifecycle.core import Lifecycle
from supervisor.lifecycle.pool import GenState


Memory = Callable[[int], "tuple[int | None, int | None, int | None, int | None]"]  # rss, uss, pss, shared


def health(core: Lifecycle, now: float, started: float, pid: int,
           rss: Callable[[int], int | None], memory: Memory | None = None) -> tuple[bool, dict[str, Any]]:
    """(healthy, body).  Healthy: no shutdown has begun and some worker can take a request
    (a serving worker whose loop answered recently and that has a free thread)."""
    pool = core.pool
    serving = pool.serving_generation()
    last = pool.last_reload
    available = core.available_workers(now)
    if not core.shutdown.running:
        status = "stopping"
    elif serving is None:
        status = "starting"
    else:
        status = "ok" if available else "unavailable"  # nobody can take a request right now
    body: dict[str, Any] = {
        "status": status,
        "pid": pid,
        "uptime": round(now - started, 3),
        "generation": serving.number if serving else None,
        "generations": [{"number": g.number, "state": g.state.value, "reason": g.reason,
                         "age": round(now - g.started_at, 3)}
                        for g in pool.generations.values()
                        if g.state in (GenState.STARTING, GenState.SERVING, GenState.DRAINING)],
        "available_workers": len(available),
        "workers": [{"pid": w.pid, "worker": w.slot, "generation": w.generation, "state": w.state.value,
                     "requests": w.requests, "busy": w.busy, "rss": rss(w.pid),
                     "heartbeat_age": round(now - w.last_seen, 3)}
                    for w in sorted(pool.workers.values(), key=lambda w: (w.generation, w.slot))],
        "last_reload": None if last is None or last.first else {
            "generation": last.number, "state": last.state.value, "reason": last.reason,
            "error": last.error, "seconds_ago": round(now - last.started_at, 3)},
        "workers_target": len(pool.slots),
        "workers_max": pool.limits.max_workers or pool.limits.workers,
        "reloads": [_reload(r, now) for r in pool.reloads],
        "shutdown": core.shutdown.phase.value,
        "helpers": [{"name": h.name, "pid": h.pid, "failures": h.failures} for h in core.helpers.values()],
    }
    if memory is not None:
        # Unique (USS), proportional (PSS) and shared memory of each worker and zygote: with
        # --preload a worker's heap is mostly its zygote's, shared copy-on-write.
        for entry in body["workers"]:
            entry.update(_memory(memory(entry["pid"])))
        body["zygotes"] = [{"pid": z.pid, "generation": z.generation, "state": z.state.value,
                            "threads_at_fork": list(z.threads), **_memory(memory(z.pid))}
                           for z in sorted(pool.zygotes.values(), key=lambda z: z.generation) if z.pid is not None]
    if core.consul is not None:
        body["consul"] = core.consul.view()
    return core.shutdown.running and bool(available), body


def _memory(measured: tuple[int | None, int | None, int | None, int | None]) -> dict[str, int | None]:
    rss, uss, pss, shared = measured
    return {"rss": rss, "uss": uss, "pss": pss, "shared": shared}


def _reload(record: dict[str, Any], now: float) -> dict[str, Any]:
    """One of the last reloads: its trigger, result, phases (seconds) and how long ago it began."""
    out = {k: v for k, v in record.items() if k != "started_at"}
    out["seconds_ago"] = round(now - record["started_at"], 3)
    return out
