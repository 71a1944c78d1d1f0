"""`supervise`: resolve settings, bind sockets, run the master.  Exit codes:

0 clean shutdown, 1 internal error, 2 bad configuration, 3 the app cannot boot,
4 cannot bind, 5 required Consul KV unreadable.  Every failure a user can cause
is one line on stderr, never a traceback."""

from __future__ import annotations

import os
import socket
import sys
import traceback
from dataclasses import dataclass
from typing import Any, Sequence

from supervisor import logs, proc, settings, sockets
from supervisor.settings import Config, ConfigError

EXIT_OK, EXIT_INTERNAL, EXIT_CONFIG, EXIT_BOOT, EXIT_BIND, EXIT_KV = 0, 1, 2, 3, 4, 5
DOCKER_STOP_TIMEOUT = 10.0
CONTROL_COMMANDS = ("status", "reload", "stop", "workers")  # supervisor.control


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if args and args[0] in CONTROL_COMMANDS:  # an app module of that name: write MODULE:CALLABLE
        from supervisor import control

        return control.main(args, os.environ)
    try:
        config = settings.resolve(args, os.environ)
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
    if config.chdir and not os.access(config.chdir, os.R_OK | os.X_OK):
        raise ConfigError(f"invalid value for --chdir: {config.chdir!r} cannot be read (permission denied)")
    module, sep, attr = config.app.partition(":")
    stem = module[:-3]
    if module.endswith(".py") and os.path.isfile(os.path.join(config.chdir or ".", *stem.split(".")) + ".py"):
        # `app.py` names a file: its module `app` cannot also be a package holding a module `py`.
        raise ConfigError(f"invalid value for APP: {config.app!r} is a file name; give the module: "
                          f"{stem + sep + attr!r}")
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

    proc.set_title(f"master {config.app}")
    subreaper = proc.become_subreaper()
    log.info("started", version=settings.version(), app=config.app, workers=config.workers,
             threads=config.threads, pid1=os.getpid() == 1, subreaper=subreaper)
    if not subreaper:
        log.warning("not_a_subreaper", why="prctl(PR_SET_CHILD_SUBREAPER) failed: orphans of the app "
                    "will not be reaped by supervise")
    stop_budget = config.graceful_timeout + (config.consul_drain_delay if config.consul else config.stop_delay)
    if stop_budget >= DOCKER_STOP_TIMEOUT:
        log.warning("graceful_timeout_too_long", graceful_timeout=config.graceful_timeout,
                    consul_drain_delay=config.consul_drain_delay if config.consul else None,
                    stop_delay=None if config.consul else config.stop_delay,
                    why="docker stop sends SIGKILL after 10 s by default; drains may be cut short "
                        "(lower --graceful-timeout or raise `docker stop --time`)")
    if "*" in config.forwarded_allow_ips:
        log.warning("every_peer_trusted", setting="--forwarded-allow-ips *",
                    why="any client can then set REMOTE_ADDR, the scheme and the host with forwarding headers; "
                        "list the proxies' addresses instead")
    listening = _listen(config, log)
    env = _initial_env(config, log)
    if config.pid_file:
        error = proc.write_pid_file(config.pid_file)
        if error is not None:
            logs.error_line(error)
            return EXIT_CONFIG
    master = Master(config, listening.http, listening.health, env,
                    _helpers(config, listening.port, listening.health_url))
    result = master.run()
    if config.pid_file:
        proc.remove_pid_file(config.pid_file)
    for path in listening.unix_paths:
        sockets.unlink_socket_file(path)
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


@dataclass
class _Listening:
    http: list[socket.socket]
    port: int  # the first HTTP listener's: the one advertised to Consul
    unix_paths: list[str]  # socket files bound here (removed at exit; inherited ones are not ours)
    health: socket.socket | None = None
    health_url: str | None = None


def _listen(config: Config, log: Any) -> _Listening:
    """Bind --bind and --health-bind, or adopt the sockets systemd passed (LISTEN_FDS; one named
    `health` serves the health endpoint unless --health-bind is set)."""
    inherited, names = sockets.systemd_listeners(os.environ, os.getpid())
    health_address = config.health_bind
    if health_address is None:
        health_address = next((f"fd://{fd}" for fd, name in names.items() if name == "health"), None)
    binds = [f"fd://{fd}" for fd in inherited if names.get(fd) != "health"] or list(config.bind)
    if inherited:
        log.info("socket_activation", fds=inherited, names=[names.get(fd, "") for fd in inherited])
        if config.bind != settings.default_of("bind"):
            log.warning("bind_ignored", bind=list(config.bind),
                        why="LISTEN_FDS: serving on the sockets systemd passed instead")
    http, port = _bind_all(binds, config.backlog, log)
    unix_paths = [a.host for a in map(sockets.parse_address, binds) if a.family == socket.AF_UNIX]
    listening = _Listening(http, port, unix_paths)
    if health_address:
        address = sockets.parse_address(health_address)
        listening.health = sockets.bind(address, 64)
        real = sockets.bound_address(listening.health, address)
        log.info("health_bound", address=str(real))
        host = real.host if real.host not in ("0.0.0.0", "::") else "127.0.0.1"
        listening.health_url = f"http://{config.consul_address or host}:{real.port}/health"
    return listening


def _bind_all(binds: list[str], backlog: int, log: Any) -> tuple[list[socket.socket], int]:
    listeners: list[socket.socket] = []
    port = 0
    try:
        for text in binds:
            address = sockets.parse_address(text)
            sock = sockets.bind(address, backlog, defer_accept=True)
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
