"""`supervise`: resolve settings, bind sockets, run the master.  Exit codes:

0 clean shutdown, 1 internal error, 2 bad configuration, 3 the app cannot boot,
4 cannot bind, 5 required Consul KV unreadable.  Every failure a user can cause
is one line on stderr, never a traceback."""

from __future__ import annotations

import os
import socket
import sys
import traceback
from typing import Any, Sequence

from supervisor import logs, proc, settings, sockets
from supervisor.settings import Config, ConfigError

EXIT_OK, EXIT_INTERNAL, EXIT_CONFIG, EXIT_BOOT, EXIT_BIND, EXIT_KV = 0, 1, 2, 3, 4, 5
DOCKER_STOP_TIMEOUT = 10.0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = settings.resolve(sys.argv[1:] if argv is None else argv, os.environ)
        _validate(config)
    except ConfigError as exc:
        logs.error_line(str(exc))
        return EXIT_CONFIG
    logs.configure(config.log_level, config.log_format, role="master")
    log = logs.get()
    try:
        return _run(config, log)
    except sockets.BindError as exc:
        logs.error_line(str(exc))
        return EXIT_BIND
    except _KVError as exc:
        logs.error_line(str(exc))
        return EXIT_KV
    except Exception as exc:  # a bug of ours: say so in one line, keep the traceback in the log
        log.critical("internal_error", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        logs.error_line(f"internal error: {type(exc).__name__}: {exc}")
        return EXIT_INTERNAL


class _KVError(Exception):
    pass


def _validate(config: Config) -> None:
    if config.chdir and not os.path.isdir(config.chdir):
        raise ConfigError(f"invalid value for --chdir: {config.chdir!r} is not a directory")
    if config.consul_kv_prefix and not config.consul:
        raise ConfigError("--consul-kv-prefix needs --consul (or CONSUL_HTTP_ADDR)")
    if config.consul and config.consul_check == "http" and not config.health_bind:
        raise ConfigError("--consul-check http needs --health-bind (the agent polls it)")
    if config.consul:
        from supervisor.consul.spec import parse_agent_address

        try:
            parse_agent_address(config.consul)
        except ValueError as exc:
            raise ConfigError(f"invalid value for --consul: {exc}") from None
    for path in config.watch:
        if not os.path.isdir(path):
            raise ConfigError(f"invalid value for --watch: {path!r} is not a directory")


def _run(config: Config, log: Any) -> int:
    from supervisor.master.loop import Master  # after config: keep `--help` and errors fast

    subreaper = proc.become_subreaper()
    log.info("started", version=settings._version(), app=config.app, workers=config.workers,
             threads=config.threads, pid1=os.getpid() == 1, subreaper=subreaper)
    if not subreaper:
        log.warning("not_a_subreaper", why="prctl(PR_SET_CHILD_SUBREAPER) failed: orphans of the app "
                    "will not be reaped by supervise")
    stop_budget = config.graceful_timeout + (config.consul_drain_delay if config.consul else 0.0)
    if stop_budget >= DOCKER_STOP_TIMEOUT:
        log.warning("graceful_timeout_too_long", graceful_timeout=config.graceful_timeout,
                    consul_drain_delay=config.consul_drain_delay if config.consul else None,
                    why="docker stop sends SIGKILL after 10 s by default; drains may be cut short "
                        "(lower --graceful-timeout or raise `docker stop --time`)")
    if "*" in config.forwarded_allow_ips:
        log.warning("every_peer_trusted", setting="--forwarded-allow-ips *",
                    why="any client can then set REMOTE_ADDR, the scheme and the host with forwarding headers; "
                        "list the proxies' addresses instead")
    listeners, advertise_port = _bind_all(config, log)
    health = None
    health_url = None
    if config.health_bind:
        address = sockets.parse_address(config.health_bind)
        health = sockets.bind(address, 64)
        real = sockets.bound_address(health, address)
        log.info("health_bound", address=str(real))
        host = real.host if real.host not in ("0.0.0.0", "::") else "127.0.0.1"
        health_url = f"http://{config.consul_address or host}:{real.port}/health"
    env = _initial_env(config, log)
    master = Master(config, listeners, health, env, _helpers(config, advertise_port, health_url))
    result = master.run()
    if result.code == EXIT_BOOT:
        logs.error_line(f"the app cannot boot: {result.reason}")
    return result.code


def _helpers(config: Config, advertise_port: int, health_url: str | None) -> dict[str, Any]:
    """The helper processes this configuration needs, by name, with their bodies."""
    from supervisor.lifecycle.core import CONSUL, WATCHER
    from supervisor.watch.spec import spec_from_config

    helpers: dict[str, Any] = {}
    watch_spec = spec_from_config(config)  # before anything changes directory: paths become absolute
    if watch_spec is not None:
        from supervisor.watch import helper as watcher

        helpers[WATCHER] = lambda sock: watcher.helper_main(sock, watch_spec)
    if config.consul:
        from supervisor.consul import helper as consul
        from supervisor.consul.spec import ConsulSpec

        consul_spec = ConsulSpec.from_config(config, advertise_port, health_url)
        helpers[CONSUL] = lambda sock: consul.helper_main(sock, consul_spec)
    return helpers


def _bind_all(config: Config, log: Any) -> tuple[list[socket.socket], int]:
    listeners: list[socket.socket] = []
    port = 0
    try:
        for text in config.bind:
            address = sockets.parse_address(text)
            sock = sockets.bind(address, config.backlog, defer_accept=True)
            real = sockets.bound_address(sock, address)
            port = port or real.port
            listeners.append(sock)
            log.info("bound", address=str(real))
    except sockets.BindError:
        for sock in listeners:
            sock.close()
        raise
    return listeners, port


def _initial_env(config: Config, log: Any) -> dict[str, str]:
    """Environment for the first generation: Consul KV under the prefix, when configured."""
    if not (config.consul and config.consul_kv_prefix):
        return {}
    from supervisor.consul.spec import ConsulError, ConsulSpec
    from supervisor.consul.startup import fetch_kv_env

    try:
        env = fetch_kv_env(ConsulSpec.from_config(config))
    except ConsulError as exc:
        if config.consul_kv_required:
            raise _KVError(f"cannot read Consul KV {config.consul_kv_prefix!r}: {exc}") from None
        log.warning("consul_kv_unavailable", prefix=config.consul_kv_prefix, error=str(exc),
                    why="starting without it; the watch applies it when Consul answers")
        return {}
    log.info("consul_kv_loaded", prefix=config.consul_kv_prefix, keys=sorted(env))
    return env
