"""What the master tells a worker it forks (plain data, read after fork)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class RequestLimits:
    request_line: int
    headers: int  # the whole head
    body: int  # 0: unlimited
    fields: int = 100  # header fields
    field_size: int = 8190  # one field, name and value
    trailer: int = 8192  # the trailer after a chunked body


# The ASGI settings a worker gets as they are (Config field -> WorkerSpec field of the same name).
ASGI_SPEC = ("interface", "lifespan", "limit_concurrency", "websocket_max_message_size", "websocket_drain",
             "websocket_ping_interval")


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
    forwarded_allow_ips: tuple[str, ...] = ("127.0.0.1", "::1")
    proxy_protocol: str = "off"
    request_timeout: float = 0.0
    dump_fd: int = -1  # faulthandler writes every thread's stack here on SIGUSR2 (the master reads it)
    access_log_format: str = "json"  # json (structlog events) or combined (Apache's line, to stdout)
    metrics: bool = True  # count requests for /metrics (--no-metrics: not)
    request_id: bool = True  # X-Request-ID: passed through or generated, echoed, in the environ
    # ASGI (supervisor/worker/asgi): which interface, and its own settings
    interface: str = "auto"  # auto, wsgi or asgi
    lifespan: str = "auto"  # auto, on or off
    limit_concurrency: int = 0  # 0: no limit; else 503 beyond this many requests in flight
    websocket_max_message_size: int = 16 * 1024 * 1024
    websocket_drain: float = 0.0  # on a reload, WebSockets get this long before their 1012
    websocket_ping_interval: float = 20.0  # ping a silent client after this long; drop it after as long again
