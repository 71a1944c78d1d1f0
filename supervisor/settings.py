"""Every setting declared once.

Each `Setting` record carries its name, CLI flag, environment variables, parser
(type and validation in one callable), default and help text.  The argparse
parser, the frozen `Config` object and `docs/configuration.md` are all derived
from `SETTINGS`; nothing else in the package names a flag or an env var.

Precedence: command line, then environment, then default.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping, Sequence


class ConfigError(Exception):
    """A setting has a value we cannot use.  Reported as one line, exit 2."""


# --------------------------------------------------------------------------- parsers
# A parser turns one string into a value or raises ValueError with a message
# that reads well after "invalid value for --flag: ".


def parse_app(text: str) -> str:
    module, sep, attr = text.partition(":")
    ident = r"[A-Za-z_][A-Za-z0-9_]*"
    if not re.fullmatch(rf"{ident}(\.{ident})*", module):
        raise ValueError(f"{text!r} is not MODULE or MODULE:CALLABLE")
    if sep and not attr:
        raise ValueError(f"{text!r}: nothing after ':' (write MODULE, or MODULE:CALLABLE with the callable's name)")
    if attr and not re.fullmatch(rf"{ident}(\.{ident})*", attr):
        raise ValueError(f"{text!r}: {attr!r} is not a Python name")
    return text


def parse_bind(text: str) -> str:
    # Validated here; turned into an address by supervisor.sockets.parse_address.
    from supervisor.sockets import parse_address

    parse_address(text)
    return text


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"{text} is not a positive integer")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"{text} is negative")
    return value


_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*$")


def duration(text: str) -> float:
    """Seconds, as a plain number or with a unit: 250ms, 8s, 1m, 1h."""
    match = _DURATION.match(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a duration (examples: 8, 8s, 250ms, 1m)")
    scale = {"ms": 0.001, "s": 1.0, None: 1.0, "m": 60.0, "h": 3600.0}[match.group(2)]
    return float(match.group(1)) * scale


def positive_duration(text: str) -> float:
    value = duration(text)
    if value <= 0:
        raise ValueError(f"{text!r} must be greater than zero")
    return value


_SIZE = re.compile(r"^\s*(\d+)\s*([kKmMgG]i?[bB]?|[bB])?\s*$")


def size(text: str) -> int:
    """Bytes, as a plain number or with a unit: 64k, 10M, 1G (powers of 1024)."""
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a size (examples: 8192, 64k, 10M)")
    unit = (match.group(2) or "b")[0].lower()
    return int(match.group(1)) * {"b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[unit]


def choice(*options: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in options:
            raise ValueError(f"{text!r} is not one of {', '.join(options)}")
        return text

    parse.choices = options  # type: ignore[attr-defined]
    return parse


def boolean(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{text!r} is not a boolean (use 1/0, true/false, yes/no)")


def key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"{text!r} is not KEY=VALUE")
    return key, value


def parse_network(text: str) -> str:
    """An IP address, a CIDR network, or * (every peer)."""
    import ipaddress

    text = text.strip()
    if text != "*":
        try:
            ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(f"{text!r} is not an IP address, a CIDR network or *") from None
    return text


def text_value(text: str) -> str:
    return text


def path_value(text: str) -> str:
    if not text:
        raise ValueError("empty path")
    return text


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity, and the cgroup's CPU quota when one is set."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()
        if quota != "max":
            cpus = max(1, min(cpus, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return cpus


def usable_memory() -> int:
    """Bytes of memory this process may use: the machine's, or the cgroup's limit when lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        if limit != "max":
            total = min(total, int(limit))
    except (OSError, ValueError):
        pass
    return total


UNLIMITED = 1 << 62  # cgroup v1 says "no limit" with a huge number


def cgroup_memory_limit() -> int:
    """The memory limit of this process's cgroup in bytes, the lowest along its ancestors (v2
    memory.max, or v1 memory.limit_in_bytes); 0 when none is set."""
    try:
        lines = open("/proc/self/cgroup").read().splitlines()
    except OSError:
        return 0
    limits = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            root, name = "/sys/fs/cgroup", "memory.max"
        elif "memory" in controllers.split(","):
            root, name = "/sys/fs/cgroup/memory", "memory.limit_in_bytes"
        else:
            continue
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts), -1, -1):  # the cgroup itself, then each parent up to the mount
            limit = _read_limit(os.path.join(root, *parts[:depth], name))
            if limit:
                limits.append(limit)
    return min(limits, default=0)


def _read_limit(path: str) -> int:
    try:
        text = open(path).read().strip()
        limit = 0 if text == "max" else int(text)
    except (OSError, ValueError):
        return 0
    return limit if 0 < limit < UNLIMITED else 0


WORKERS_PER_CPU = 32
MEMORY_PER_WORKER = 64 * 1024 * 1024  # a small app's worker; the bound only stops absurd counts
THREADS_PER_CPU = 64


def default_max_workers() -> int:
    return max(1, min(WORKERS_PER_CPU * usable_cpus(), usable_memory() // MEMORY_PER_WORKER))


def default_max_threads() -> int:
    return max(16, min(1024, THREADS_PER_CPU * usable_cpus()))


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Setting:
    """How one Config field is set: its flags, environment variables, parser and help."""

    name: str
    parse: Callable[[str], Any]
    default: Any
    help: str
    section: str
    flags: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    multiple: bool = False  # repeatable flag; env value is comma-separated
    switch: bool = False  # a flag that takes no value (--flag sets True)
    positional: bool = False
    metavar: str | None = None
    default_doc: str | None = None  # how the default reads in docs, when computed

    def __post_init__(self) -> None:
        if not self.flags and not self.positional:
            object.__setattr__(self, "flags", ("--" + self.name.replace("_", "-"),))
        if not self.env:
            object.__setattr__(self, "env", ("SUPERVISE_" + self.name.upper(),))

    def default_value(self) -> Any:
        value = self.default() if callable(self.default) else self.default
        return tuple(value) if self.multiple else value

    def describe_default(self) -> str:
        if self.default_doc is not None:
            return self.default_doc
        value = self.default_value()
        if value in (None, [], ()):
            return "unset"
        if isinstance(value, bool):
            return "on" if value else "off"
        if isinstance(value, tuple):
            return ", ".join(str(v) for v in value)
        return str(value)


_SETTING = "setting"


def setting(parse: Callable[[str], Any], default: Any, help: str, section: str, **kw: Any) -> Any:
    """A Config field declared with everything about its setting (the name is the field's)."""
    meta = {_SETTING: dict(parse=parse, default=default, help=help, section=section, **kw)}
    if callable(default):
        return field(default_factory=default, metadata=meta)
    if kw.get("multiple"):
        return field(default=tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


WATCH_INCLUDE = ("*.py", "*.html", "*.json", "*.yaml", "*.yml", "*.toml", "*.ini", "*.cfg")
WATCH_EXCLUDE = (".git/", "__pycache__/", "*.pyc", "*.log", "*.swp", "*~", ".#*", "node_modules/")


@dataclass(frozen=True)
class Config:
    """The resolved settings: each field is declared once, here, with its setting."""

    # ---------------------------------------------------------------- application
    app: str = setting(
        parse_app, "", "The WSGI application: MODULE (callable `application`) or MODULE:CALLABLE.",
        "Application", positional=True, metavar="APP", default_doc="required")
    chdir: str | None = setting(
        path_value, None,
        "Code directory. Workers resolve its real path at start (so a re-pointed symlink takes effect on the "
        "next generation), chdir into it and put it first on sys.path. Watched for changes by default.",
        "Application", metavar="DIR")
    env: tuple[tuple[str, str], ...] = setting(
        key_value, (), "Extra environment variable for the workers, KEY=VALUE (repeatable).",
        "Application", multiple=True, metavar="KEY=VALUE")
    # ---------------------------------------------------------------- server
    bind: tuple[str, ...] = setting(
        parse_bind, ("127.0.0.1:8000",),
        "Address to listen on (repeatable): HOST:PORT, [IPv6]:PORT, unix:/path or fd://N (a listening "
        "socket passed by the parent). Port 0 picks a free port; the real one is logged in the `bound` "
        "event. Bound once by the master and inherited by every generation. Ignored when systemd passes "
        "sockets (LISTEN_FDS).", "Server", flags=("-b", "--bind"), multiple=True, metavar="ADDRESS")
    backlog: int = setting(positive_int, 2048, "Listen queue length of each bound socket.", "Server",
                           metavar="N")
    workers: int = setting(positive_int, usable_cpus, "Number of worker processes per generation.", "Server",
                           flags=("-w", "--workers"), metavar="N", default_doc="number of usable CPUs")
    max_workers: int = setting(
        positive_int, default_max_workers, "Upper bound for --workers: a larger count is refused at start "
        "(exit 2) instead of forking the machine out of memory.", "Server", metavar="N",
        default_doc=f"{WORKERS_PER_CPU} per usable CPU, at most one per {MEMORY_PER_WORKER >> 20} MiB of "
                    "usable memory (the cgroup's limit when set)")
    threads: int = setting(
        positive_int, 1,
        "Threads per worker that run the application. With 1 the app runs on the worker's event loop thread.",
        "Server", metavar="N")
    max_threads: int = setting(
        positive_int, default_max_threads, "Upper bound for --threads (refused at start, exit 2, above it).",
        "Server", metavar="N", default_doc=f"{THREADS_PER_CPU} per usable CPU, between 16 and 1024")
    keepalive_timeout: float = setting(duration, 5.0, "Close a keep-alive connection idle this long.",
                                       "Server", metavar="DURATION")
    header_timeout: float = setting(
        positive_duration, 10.0, "A request head must arrive whole within this time of its first byte; "
        "otherwise 408 and the connection closes (slowloris).", "Server", metavar="DURATION")
    body_timeout: float = setting(
        positive_duration, 30.0, "Longest pause while a request body arrives; then 408 and the connection "
        "closes.", "Server", metavar="DURATION")
    write_timeout: float = setting(
        positive_duration, 30.0, "Longest time a response makes no progress because the client does not "
        "read it; then the connection is dropped.", "Server", metavar="DURATION")
    request_buffering: bool = setting(
        boolean, True, "Read each request body whole before calling the app (in memory up to "
        "--body-spool-size, then in a temporary file), so a slow upload never holds a worker. Turn off "
        "(0) to stream bodies to the app as they arrive: the app then waits on the client, up to "
        "--body-timeout per pause, holding its worker (or thread) meanwhile.", "Server", metavar="BOOL")
    body_spool_size: int = setting(
        size, 256 * 1024, "Request bodies larger than this are buffered in a temporary file instead of "
        "memory.", "Server", metavar="SIZE", default_doc="256k")
    worker_connections: int = setting(
        positive_int, 1000, "Most client connections one worker holds open; at the limit it stops "
        "accepting (others, or the listen queue, take the rest).", "Server", metavar="N")
    limit_request_line: int = setting(
        positive_int, 8190, "Longest request line (method, target, version) in bytes; longer gets 414.",
        "Server", metavar="BYTES")
    limit_request_headers: int = setting(
        size, 65536, "Largest request head (request line and headers) in bytes; larger gets 431.", "Server",
        metavar="SIZE")
    limit_request_fields: int = setting(
        positive_int, 100, "Most header fields in a request; more gets 431.", "Server", metavar="N")
    limit_request_field_size: int = setting(
        positive_int, 8190, "Largest header field (name and value) in bytes; larger gets 431.", "Server",
        metavar="BYTES")
    limit_request_trailer: int = setting(
        size, 8192, "Largest trailer after a chunked request body; larger gets 431.", "Server", metavar="SIZE")
    limit_request_body: int = setting(
        size, 100 * 1024 * 1024, "Largest request body; larger gets 413. 0 means no limit.", "Server",
        metavar="SIZE", default_doc="100M")
    forwarded_allow_ips: tuple[str, ...] = setting(
        parse_network, ("127.0.0.1", "::1"),
        "Peers trusted as proxies (repeatable; IPs or CIDRs, `*` for every peer, which is logged as a "
        "warning). From them only, Forwarded (RFC 7239) or X-Forwarded-For/-Proto/-Host set REMOTE_ADDR "
        "(the right-most address that is not itself trusted), wsgi.url_scheme and HTTP_HOST, and the "
        "PROXY protocol header is read.", "Proxies", multiple=True, metavar="CIDR",
        env=("SUPERVISE_FORWARDED_ALLOW_IPS", "FORWARDED_ALLOW_IPS"))
    proxy_protocol: str = setting(
        choice("off", "v1", "v2", "auto"), "off",
        "PROXY protocol (HAProxy send-proxy, AWS NLB): v1, v2 or auto (either, or none) before the "
        "request on connections from trusted peers; with v1 or v2 it is required from them (a missing or "
        "malformed header closes the connection). REMOTE_ADDR and REMOTE_PORT come from it.", "Proxies",
        metavar="MODE")
    access_log: bool = setting(boolean, False, "Log one `request` event per request.", "Logging",
                               switch=True)
    access_log_format: str = setting(
        choice("json", "combined"), "json",
        "json: the `request` event (method, path, query, protocol, status, bytes, duration, remote, "
        "user_agent, referer, request_id). combined: Apache's combined line plus the duration in seconds and "
        "the request id, written to stdout as it is; values escaped as \\xHH (see docs/operations.md).",
        "Logging", metavar="FORMAT")
    no_request_id: bool = setting(
        boolean, False, "Do not give requests an id. By default the client's X-Request-ID (1-200 printable "
        "ASCII characters, no space, quote or backslash) or else a fresh one (32 hex digits) is set as "
        "HTTP_X_REQUEST_ID and supervise.request_id in the environ, sent back as X-Request-ID (unless the app "
        "sets its own) and logged.", "Logging", switch=True)
    log_level: str = setting(choice("debug", "info", "warning", "error"), "info", "Lowest level logged.",
                             "Logging", metavar="LEVEL")
    log_format: str = setting(
        choice("auto", "json", "console"), "auto",
        "json: one JSON object per line; console: human-readable. auto picks json unless stdout is a TTY.",
        "Logging", metavar="FORMAT")
    # ---------------------------------------------------------------- lifecycle
    graceful_timeout: float = setting(
        duration, 7.0,
        "How long draining workers may finish in-flight requests before they are killed. Keep it, plus "
        "--consul-drain-delay or --stop-delay, under the container's stop timeout (Docker: 10 s).", "Lifecycle",
        metavar="DURATION")
    stop_delay: float = setting(
        duration, 0.0,
        "Without --consul: on SIGTERM, answer 503 on /health and keep serving this long before draining, so "
        "a load balancer that finds this instance another way (a Kubernetes Service, a health-polling LB) "
        "stops sending traffic first; Kubernetes then needs no preStop sleep. With --consul, "
        "--consul-drain-delay applies after the withdrawal instead.", "Lifecycle", metavar="DURATION")
    boot_timeout: float = setting(
        positive_duration, 30.0,
        "How long a new worker may take to import the app and report ready. A first generation that misses "
        "it makes supervise exit 3; a reload that misses it is abandoned and the old generation keeps "
        "serving.", "Lifecycle", metavar="DURATION")
    request_timeout: float = setting(
        duration, 0.0, "Longest time the app may spend on one request (0: no limit). Past it, the request's "
        "stack and those of its worker's other threads are logged (`request_timeout`), the client gets 504 if "
        "nothing was sent yet, and the worker is replaced (ready before it retires).", "Lifecycle",
        metavar="DURATION")
    worker_timeout: float = setting(
        duration, 30.0, "Kill and replace a worker whose heartbeat is silent this long. 0 disables.",
        "Lifecycle", metavar="DURATION")
    reload_strategy: str = setting(
        choice("generation", "rolling"), "generation",
        "generation: the whole new generation is ready before the old one drains. rolling: one worker at a "
        "time, never more than workers+1 alive.", "Lifecycle", metavar="STRATEGY")
    max_requests: int = setting(
        non_negative_int, 0, "Recycle a worker after this many requests (0: never). The replacement is "
        "ready before the old worker retires.", "Lifecycle", metavar="N")
    max_requests_jitter: int = setting(
        non_negative_int, 0, "Add a random 0..N to --max-requests per worker so workers do not all recycle "
        "at once.", "Lifecycle", metavar="N")
    max_memory: int = setting(
        size, cgroup_memory_limit,
        "Memory budget of the whole service (0: none), e.g. 2G. Before a reload, supervise measures the "
        "serving generation (PSS, so shared pages count once) and, when a second full generation would not "
        "fit beside it, reloads with the rolling strategy instead (one worker at a time) and logs why "
        "(reload_strategy_fallback).", "Lifecycle", metavar="SIZE",
        default_doc="the cgroup's memory limit (memory.max; memory.limit_in_bytes on cgroup v1) when one is "
                    "set, else 0")
    preload: bool = setting(
        boolean, False, "Import the app once per generation in a zygote process (forked from the master, "
        "which still never imports it), freeze its heap (gc.freeze) and fork the generation's workers from "
        "it: they share the imported memory copy-on-write and boot in a fork's time. A reload starts a new "
        "zygote on the new code; a zygote that fails to import is a failed boot (the old generation serves "
        "on). See \"Preloading\" in docs/operations.md for what an app must not do at import.",
        "Lifecycle", switch=True)
    max_rss: int = setting(
        size, 0, "Recycle a worker whose resident memory exceeds this (0: never), e.g. 512M. Checked by the "
        "master every few seconds. With --preload its unique memory (USS) is compared instead: the pages "
        "it shares with its zygote are not its own.", "Lifecycle", metavar="SIZE")
    health_bind: str | None = setting(
        parse_bind, None,
        "Address of the master's health endpoint (GET /health: 200 while a generation is ready, 503 once "
        "shutdown begins; JSON state; GET /metrics: Prometheus). Used by Docker HEALTHCHECK, Consul HTTP "
        "checks, Prometheus and `supervise status|reload|workers`. fd://N: a socket passed by the parent.",
        "Lifecycle", metavar="ADDRESS")
    pid_file: str | None = setting(
        path_value, None, "Write the master's pid to this file at start (removed at exit), for "
        "`supervise reload|stop|workers` and other tools.", "Lifecycle", metavar="PATH")
    no_metrics: bool = setting(
        boolean, False, "Do not count requests for GET /metrics (it then answers 404).", "Lifecycle",
        switch=True)
    # ---------------------------------------------------------------- asgi
    interface: str = setting(
        choice("auto", "wsgi", "asgi"), "auto",
        "How to call the app. auto: an `async def` callable, or an object whose `__call__` is `async def`, "
        "is ASGI 3, and a class whose instances have an `async def __call__` is ASGI 2 (double callable); "
        "anything else is WSGI. asgi also takes a plain callable of one argument (ASGI 2) or three. A "
        "mismatch (an ASGI app with wsgi, a two-argument callable with asgi) is a boot error (exit 3). "
        "See docs/asgi.md.", "ASGI", metavar="INTERFACE")
    lifespan: str = setting(
        choice("auto", "on", "off"), "auto",
        "ASGI lifespan protocol. Startup runs before a worker reports ready: a failure is a boot failure "
        "(exit 3 at start; at a reload the new generation is abandoned and the old one keeps serving). "
        "Shutdown runs when the worker drains, within --graceful-timeout. auto: an app that raises before "
        "it takes the startup message has no lifespan (logged); on: that is a boot failure too; off: never "
        "run.", "ASGI", metavar="MODE")
    limit_concurrency: int = setting(
        non_negative_int, 0, "ASGI: most requests and WebSockets in flight per worker; more are answered "
        "503 at once (0: no limit). The worker's capacity in the health view.", "ASGI", metavar="N")
    websocket_max_message_size: int = setting(
        size, 16 * 1024 * 1024, "Largest WebSocket message (its fragments together); a larger one closes "
        "the connection with 1009. 0 means no limit.", "ASGI", metavar="SIZE", default_doc="16M")
    websocket_ping_interval: float = setting(
        duration, 20.0, "Ping a WebSocket client that sent nothing for this long; one that still sends nothing "
        "(no pong) for as long again is dropped (a dead peer costs nothing for long). 0: never ping.", "ASGI",
        metavar="DURATION")
    websocket_drain: float = setting(
        duration, 0.0, "On a reload (or a recycle, or scaling in), how long the old workers' WebSockets may "
        "go on once the new generation serves; then they are closed with 1012 (service restart) so that "
        "clients reconnect to the new code. Capped so that the close handshake ends within "
        "--graceful-timeout (at 7 s: 3.25 s). On shutdown they close at once with 1001 (going away).", "ASGI",
        metavar="DURATION")
    # ---------------------------------------------------------------- watch
    watch: tuple[str, ...] = setting(
        path_value, (), "Directory to watch for code changes (repeatable). Defaults to --chdir when one is "
        "given.", "Code watcher", multiple=True, metavar="PATH")
    no_watch: bool = setting(boolean, False, "Do not watch for code changes.", "Code watcher", switch=True)
    watch_include: tuple[str, ...] = setting(
        text_value, WATCH_INCLUDE, "Glob of files whose change triggers a reload (repeatable; replaces the "
        "default list).", "Code watcher", multiple=True, metavar="GLOB")
    watch_exclude: tuple[str, ...] = setting(
        text_value, WATCH_EXCLUDE, "Glob of paths never to react to (repeatable; replaces the default "
        "list). A pattern ending in / excludes a directory at any depth.", "Code watcher", multiple=True,
        metavar="GLOB")
    watch_debounce: float = setting(
        duration, 0.3, "Quiet time after the last change of a burst before the reload starts.",
        "Code watcher", metavar="DURATION")
    watch_poll: bool = setting(
        boolean, False, "Poll the file system instead of using inotify (for mounts that deliver no events).",
        "Code watcher", switch=True)
    watch_poll_interval: float = setting(
        positive_duration, 1.0, "Polling interval with --watch-poll or the automatic polling fallback.",
        "Code watcher", metavar="DURATION")
    touch_reload: tuple[str, ...] = setting(
        path_value, (), "Reload when this file's mtime changes (repeatable). Works with --no-watch.",
        "Code watcher", multiple=True, metavar="FILE")
    # ---------------------------------------------------------------- consul
    consul: str | None = setting(
        text_value, None, "Consul agent address (host:port or http://host:port). Enables Consul.", "Consul",
        env=("SUPERVISE_CONSUL", "CONSUL_HTTP_ADDR"), metavar="ADDRESS")
    consul_token: str | None = setting(text_value, None, "ACL token.", "Consul",
                                       env=("SUPERVISE_CONSUL_TOKEN", "CONSUL_HTTP_TOKEN"), metavar="TOKEN")
    consul_cacert: str | None = setting(
        path_value, None, "CA certificate (PEM) that verifies an https agent address.", "Consul",
        env=("SUPERVISE_CONSUL_CACERT", "CONSUL_CACERT"), metavar="FILE",
        default_doc="the system's CAs (CONSUL_HTTP_SSL_VERIFY=false turns verification off)")
    consul_client_cert: str | None = setting(
        path_value, None, "Client certificate (PEM) for an agent that verifies clients; needs "
        "--consul-client-key.", "Consul", env=("SUPERVISE_CONSUL_CLIENT_CERT", "CONSUL_CLIENT_CERT"),
        metavar="FILE")
    consul_client_key: str | None = setting(
        path_value, None, "Private key (PEM) of --consul-client-cert.", "Consul",
        env=("SUPERVISE_CONSUL_CLIENT_KEY", "CONSUL_CLIENT_KEY"), metavar="FILE")
    consul_dc: str | None = setting(text_value, None, "Datacenter.", "Consul", metavar="DC")
    consul_timeout: float = setting(positive_duration, 5.0, "Timeout of every Consul HTTP call.", "Consul",
                                    metavar="DURATION")
    consul_service: str | None = setting(text_value, None, "Service name to register.", "Consul",
                                         metavar="NAME", default_doc="the app's top-level module name")
    consul_service_id: str | None = setting(text_value, None, "Service ID.", "Consul", metavar="ID",
                                            default_doc="NAME-HOSTNAME-PORT")
    consul_tag: tuple[str, ...] = setting(text_value, (), "Service tag (repeatable).", "Consul", multiple=True,
                                          metavar="TAG")
    consul_meta: tuple[tuple[str, str], ...] = setting(
        key_value, (), "Service meta KEY=VALUE (repeatable).", "Consul", multiple=True, metavar="KEY=VALUE")
    consul_address: str | None = setting(text_value, None, "Address to advertise.", "Consul", metavar="HOST",
                                         default_doc="the agent's address for this node")
    consul_port: int | None = setting(non_negative_int, None, "Port to advertise.", "Consul", metavar="PORT",
                                      default_doc="the first --bind port")
    consul_check: str = setting(
        choice("ttl", "http"), "ttl", "ttl: the master sends heartbeats. http: the agent polls --health-bind.",
        "Consul", metavar="KIND")
    consul_ttl: float = setting(positive_duration, 10.0, "TTL of the ttl check; heartbeats go at a third "
                                "of it.", "Consul", metavar="DURATION")
    consul_check_interval: float = setting(positive_duration, 5.0, "Interval of the http check.", "Consul",
                                           metavar="DURATION")
    consul_deregister_after: float = setting(
        positive_duration, 60.0,
        "DeregisterCriticalServiceAfter: the agent removes an instance critical this long (minimum 1m).",
        "Consul", metavar="DURATION")
    consul_on_stop: str = setting(
        choice("deregister", "maintenance"), "deregister",
        "What shutdown does first: remove the instance, or put it in maintenance.", "Consul", metavar="MODE")
    consul_drain_delay: float = setting(
        duration, 2.0,
        "Wait after deregistering before draining, so DNS caches and load balancers stop sending traffic.",
        "Consul", metavar="DURATION")
    consul_kv_prefix: str | None = setting(
        text_value, None,
        "Load every key under this KV prefix into the workers' environment before the first generation; a "
        "change reloads gracefully with the new environment.", "Consul", metavar="PREFIX")
    consul_kv_required: bool = setting(boolean, False, "Exit (code 5) when the KV prefix cannot be read at "
                                       "start.", "Consul", switch=True)


SETTINGS: tuple[Setting, ...] = tuple(Setting(name=f.name, **f.metadata[_SETTING]) for f in fields(Config))


def default_of(name: str) -> Any:
    return next(s for s in SETTINGS if s.name == name).default_value()


# --------------------------------------------------------------------------- CLI


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, never the usage block
        raise ConfigError(f"{message} (see supervise --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="supervise",
        description="Run a WSGI app in a pre-fork worker pool that reloads by generations with zero "
        "failed requests. Designed to be a container's PID 1.",
        epilog="Every option can also be set with the environment variable shown. Exit codes: 0 clean "
        "shutdown, 1 internal error, 2 bad configuration, 3 the app cannot boot, 4 cannot bind, "
        "5 required Consul KV unreadable.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"supervise {version()}")
    groups: dict[str, Any] = {}
    for s in SETTINGS:
        group = groups.setdefault(s.section, parser.add_argument_group(s.section))
        help_text = f"{s.help} [env: {', '.join(s.env)}; default: {s.describe_default()}]"
        help_text = help_text.replace("%", "%%")
        if s.positional:
            group.add_argument(s.name, nargs="?", metavar=s.metavar, help=help_text)
        elif s.switch:
            group.add_argument(*s.flags, dest=s.name, action="store_const", const="1", default=None,
                               help=help_text)
        else:
            group.add_argument(*s.flags, dest=s.name, metavar=s.metavar, default=None,
                               action="append" if s.multiple else "store", help=help_text)
    return parser


def version() -> str:
    try:
        from importlib.metadata import version

        return version("supervise")
    except Exception:  # not installed (running from a checkout)
        return "0+unknown"


def _convert(s: Setting, raw: Any, origin: str) -> Any:
    items = raw if isinstance(raw, list) else [raw]
    try:
        values = [s.parse(item) for item in items]
    except ValueError as exc:
        raise ConfigError(f"invalid value for {origin}: {exc}") from None
    return values if s.multiple else values[0]


def _value(s: Setting, raw: Any, environ: Mapping[str, str]) -> Any:
    """A setting's value: from its flag (raw), else its environment variable, else its default."""
    if raw is not None:
        return _convert(s, raw, s.flags[-1] if s.flags else s.metavar or s.name)
    env_name = next((e for e in s.env if environ.get(e, "") != ""), None)
    if env_name is None:
        return s.default_value()
    raw_env = environ[env_name]
    if s.multiple:
        raw_env = [part.strip() for part in raw_env.split(",") if part.strip()]
    return _convert(s, raw_env, env_name)


def add_flags(parser: argparse.ArgumentParser, names: Sequence[str]) -> None:
    """Some settings' flags on another command's parser (`supervise status` and the others)."""
    for s in SETTINGS:
        if s.name in names:
            parser.add_argument(*s.flags, dest=s.name, metavar=s.metavar, default=None,
                                help=f"{s.help} [env: {', '.join(s.env)}]".replace("%", "%%"))


def values_of(ns: argparse.Namespace, names: Sequence[str], environ: Mapping[str, str]) -> dict[str, Any]:
    """Those settings' values, resolved as for the master (flag, environment, default)."""
    return {s.name: _value(s, getattr(ns, s.name), environ) for s in SETTINGS if s.name in names}


def resolve(argv: Sequence[str], environ: Mapping[str, str]) -> Config:
    """Turn command line and environment into a `Config`, or raise ConfigError."""
    ns = build_parser().parse_args(list(argv))
    values = {s.name: _value(s, getattr(ns, s.name), environ) for s in SETTINGS}
    if not values["app"]:
        raise ConfigError("missing APP: give MODULE or MODULE:CALLABLE (see supervise --help)")
    for s in SETTINGS:
        if s.multiple:
            values[s.name] = tuple(values[s.name])
    if values["workers"] > values["max_workers"]:
        raise ConfigError(
            f"--workers {values['workers']} is more than this machine can run: the limit is "
            f"{values['max_workers']} ({usable_cpus()} CPUs, {usable_memory() >> 20} MiB); "
            "set --max-workers to raise it")
    if values["threads"] > values["max_threads"]:
        raise ConfigError(f"--threads {values['threads']} is above the limit of {values['max_threads']} "
                          "per worker; set --max-threads to raise it")
    if values["consul_deregister_after"] < 60:
        raise ConfigError("invalid value for --consul-deregister-after: Consul's minimum is 1m")
    if bool(values["consul_client_cert"]) != bool(values["consul_client_key"]):
        raise ConfigError("--consul-client-cert and --consul-client-key go together")
    return Config(**values)


# --------------------------------------------------------------------------- docs


def markdown() -> str:
    """docs/configuration.md, generated from SETTINGS (tests/test_settings.py checks it is current)."""
    lines = [
        "# Configuration",
        "",
        "<!-- Generated from supervisor/settings.py by `python -m supervisor.settings`. Do not edit. -->",
        "",
        "Every setting can be given on the command line or in the environment. The command line wins over "
        "the environment, which wins over the default. Repeatable settings take a comma-separated list "
        "in the environment. Durations accept `250ms`, `8s`, `1m`; sizes accept `64k`, `10M`, `1G`.",
        "",
    ]
    section = None
    for s in SETTINGS:
        if s.section != section:
            section = s.section
            lines += [f"## {section}", "", "| setting | environment | default | meaning |", "|---|---|---|---|"]
        if s.positional:
            flag = f"`{s.metavar}` (positional)"
        else:
            arg = "" if s.switch else f" {s.metavar or 'VALUE'}"
            flag = ", ".join(f"`{f}{arg}`" for f in s.flags)
            if s.multiple:
                flag += " (repeatable)"
        choices = getattr(s.parse, "choices", None)
        meaning = s.help + (f" One of: {', '.join(f'`{c}`' for c in choices)}." if choices else "")
        env = ", ".join(f"`{e}`" for e in s.env)
        meaning = meaning.replace("|", "\\|")
        lines.append(f"| {flag} | {env} | {s.describe_default()} | {meaning} |")
        nxt = SETTINGS.index(s) + 1
        if nxt == len(SETTINGS) or SETTINGS[nxt].section != section:
            lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(markdown())
