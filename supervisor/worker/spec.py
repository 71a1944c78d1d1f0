"""What the master tells a worker it forks (plain data, read after fork)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class RequestLimits:
    request_line: int
    headers: int
    body: int  # 0: unlimited


@dataclass(frozen=True)
class WorkerSpec:
    target: str
    chdir: str | None
    generation: int
    slot: int
    env: Mapping[str, str]
    threads: int
    keepalive_timeout: float
    header_timeout: float
    body_timeout: float
    write_timeout: float
    request_buffering: bool
    body_spool_size: int
    worker_connections: int
    limits: RequestLimits
    access_log: bool
    log_level: str
    log_format: str
    master_pid: int
    lifeline_fd: int  # read end of the master's lifeline: EOF when the master is gone
    graceful_timeout: float
