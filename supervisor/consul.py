"""Consul: KV environment at start, and service registration from a helper process.

Two entry points for the master:

* `fetch_kv_env(config)`: one synchronous, timed-out recursive KV read, called once at start
  before the first generation is forked.  Raises `ConsulError` (one-line message) on failure.
* `helper_main(sock, config, bound_port, health_url)`: the body of the Consul helper process
  the master forks.  The master never does blocking network I/O itself; it exchanges
  newline-delimited JSON with the helper over a connected AF_UNIX stream socket:

  master -> helper
    {"cmd": "ready"[, "env": {...}]}   first generation ready: register (replace-existing-checks).
                                       Optional "env": the KV environment the master runs with
                                       (baseline for the KV watch; without it the first KV read
                                       is always reported).
    {"cmd": "alive"}                   master loop is alive; send at least every ttl/3.
    {"cmd": "note", "text": "..."}     output of the TTL check (stays passing); "" clears it.
    {"cmd": "stop", "withdraw": bool} deregister (or maintenance); answered with "stopped".
                                       withdraw: the service was ready, so withdraw even if this
                                       helper (restarted) never got `ready`
                                       within consul_timeout, whatever Consul does.
  helper -> master
    {"event": "registered", "service_id": ID}   after every successful (re-)registration
    {"event": "consul_down", "error": "..."}    Consul became unusable (state change only)
    {"event": "consul_up"}                      Consul usable again (state change only)
    {"event": "kv", "env": {...}, "index": N}   KV prefix content differs from the last sent
    {"event": "stopped", "ok": bool, "error": str|None}

  EOF on the socket means the master is gone: `helper_main` returns at once (the caller
  should `os._exit`); its threads are daemons.

Every HTTP call has a timeout (config.consul_timeout; a blocking query adds its wait).  The
ACL token is always the configured one: `CONSUL_HTTP_TOKEN` is one of consul_token's
environment variables in settings, so it is honoured there, with the usual precedence, and
py-consul's own environment override is switched off.  Requests never go through an HTTP
proxy from the environment: the agent is local.
"""

from __future__ import annotations

import contextvars
import json
import os
import re
import signal
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import consul
import consul.base
import requests
import structlog

__all__ = [
    "ConsulError",
    "parse_agent_address",
    "fetch_kv_env",
    "kv_env",
    "service_registration",
    "helper_main",
]

BACKOFF_MIN = 0.25
BACKOFF_MAX = 60.0
KV_WAIT = 60.0  # seconds a KV blocking query may be held by the agent
KV_MIN_INTERVAL = 1.0  # at least this long between the starts of two KV watch cycles
MAX_LINE = 1 << 20  # longest protocol line accepted from the master


class ConsulError(Exception):
    """Consul could not be used (unreachable, timeout, ACL denial, bad answer...).  One line."""


# --------------------------------------------------------------------------- small helpers


def _one_line(text: object, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def go_duration(seconds: float) -> str:
    """Seconds as a Go duration string: 10 -> "10s", 0.25 -> "250ms"."""
    if float(seconds).is_integer():
        return f"{int(seconds)}s"
    return f"{max(1, round(seconds * 1000))}ms"


def parse_agent_address(text: str) -> tuple[str, str, int]:
    """`host:port`, `http://host:port` or `https://host:port` -> (scheme, host, port).

    IPv6 hosts are written in brackets (`[::1]:8500`) and returned without them.  A missing
    port means Consul's default: 8500 for http, 8501 for https.  Raises ValueError.
    """
    raw = text.strip()
    if not raw:
        raise ValueError("empty Consul address")
    url = raw if "://" in raw else "http://" + raw
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"{text!r}: scheme must be http or https")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ValueError(f"{text!r} is not HOST:PORT or http(s)://HOST:PORT")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{text!r}: invalid port") from None
    host = parts.hostname
    if not host:
        raise ValueError(f"{text!r}: missing host")
    return scheme, host, port if port is not None else (8501 if scheme == "https" else 8500)


def _describe_transport_error(exc: requests.RequestException, base_uri: str, timeout: float) -> str:
    if isinstance(exc, requests.Timeout):
        return f"Consul at {base_uri} did not answer within {timeout:g}s"
    reason = re.findall(r"\[Errno -?\d+\] ([^'\")\]]+)", str(exc))
    detail = reason[-1].strip() if reason else type(exc).__name__
    return f"cannot reach Consul at {base_uri}: {detail}"


# --------------------------------------------------------------------------- client


class Unreachable(ConsulError):
    """No HTTP answer at all: connection refused, reset, timed out."""


class _HTTPClient(consul.base.HTTPClient):
    """py-consul's HTTP client contract, on requests, with a timeout on every call.

    A blocking query (one with `index`) gets its `wait` plus the agent's jitter (wait/16) on
    top.  Transport errors become `Unreachable`.  The session ignores proxy settings from
    the environment.
    """

    def __init__(self, host: str, port: int, scheme: str, verify: Any, cert: Any, *, timeout: float) -> None:
        super().__init__(host, port, scheme, verify, cert)
        self.timeout = timeout
        self.session = requests.Session()
        self.session.trust_env = False

    def timeout_for(self, params: Iterable[tuple[str, Any]] | None) -> float:
        values = dict(params or ())
        if not values.get("index"):
            return self.timeout
        wait = _parse_go_duration(str(values.get("wait", "5m")))
        return self.timeout + wait + wait / 16

    def _send(self, method: str, callback: Callable[[Any], Any], path: str, params: Any,
              headers: Mapping[str, str] | None, data: Any = None, raw: bool = False) -> Any:
        uri = self.uri(path, params)
        timeout = self.timeout_for(params)
        try:
            resp = self.session.request(method, uri, headers=dict(headers or {}), data=data,
                                        verify=self.verify, cert=self.cert, timeout=timeout)
        except requests.RequestException as exc:
            raise Unreachable(_describe_transport_error(exc, self.base_uri, timeout)) from None
        if raw:
            return callback(consul.base.Response(resp.status_code, resp.headers, resp.content))
        resp.encoding = "utf-8"
        return callback(consul.base.Response(resp.status_code, resp.headers, resp.text))

    def get(self, callback, path, params=None, headers=None, raw=False, **_ignored):  # type: ignore[override]
        return self._send("GET", callback, path, params, headers, raw=raw)

    def put(self, callback, path, params=None, data="", headers=None, **_ignored):  # type: ignore[override]
        return self._send("PUT", callback, path, params, headers, data=data)

    def delete(self, callback, path, params=None, data="", headers=None, **_ignored):  # type: ignore[override]
        return self._send("DELETE", callback, path, params, headers, data=data)

    def post(self, callback, path, params=None, data="", headers=None, **_ignored):  # type: ignore[override]
        return self._send("POST", callback, path, params, headers, data=data)

    def close(self) -> None:
        self.session.close()


_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def _parse_go_duration(text: str) -> float:
    return sum(float(n) * _GO_UNITS[u] for n, u in re.findall(r"([\d.]+)(ns|us|µs|ms|s|m|h)", text))


class Client(consul.base.Consul):
    """A py-consul client bound to the configured agent, token and datacenter, with timeouts."""

    def __init__(self, config: Any) -> None:
        if not config.consul:
            raise ConsulError("no Consul agent address configured (--consul)")
        try:
            scheme, host, port = parse_agent_address(config.consul)
        except ValueError as exc:
            raise ConsulError(f"invalid Consul address: {exc}") from None
        self._timeout = float(config.consul_timeout or 5.0)
        cert_file, key_file = os.environ.get("CONSUL_CLIENT_CERT"), os.environ.get("CONSUL_CLIENT_KEY")
        super().__init__(
            host=f"[{host}]" if ":" in host else host,
            port=port,
            scheme=scheme,
            token=config.consul_token or None,
            dc=config.consul_dc or None,
            verify=os.environ.get("CONSUL_CACERT") or None,  # None: py-consul reads CONSUL_HTTP_SSL_VERIFY
            cert=(cert_file, key_file) if cert_file and key_file else None,
        )
        # Deliberate: py-consul lets CONSUL_HTTP_TOKEN override the explicit token.  Our settings
        # already read CONSUL_HTTP_TOKEN (after SUPERVISE_CONSUL_TOKEN and the command line), so
        # the configured value is the one to use.
        self.token = config.consul_token or None

    def http_connect(self, host: str, port: int, scheme: str, verify: Any = True, cert: Any = None) -> _HTTPClient:
        return _HTTPClient(host, port, scheme, verify, cert, timeout=self._timeout)

    # Raw agent calls: the status code matters (404 vs 500 vs 200), so the callback keeps it.
    # Paths are given unquoted: py-consul's HTTPClient.uri() quotes them.

    def agent_put(self, path: str, params: list[tuple[str, Any]] | None = None, body: Any = None) -> consul.base.Response:
        data = "" if body is None else json.dumps(body)
        return self.http.put(lambda r: r, path, params=params or [], data=data, headers=self.prepare_headers())

    def agent_get(self, path: str) -> consul.base.Response:
        return self.http.get(lambda r: r, path, headers=self.prepare_headers())


def _http_error(resp: consul.base.Response, what: str) -> ConsulError:
    body = resp.body.decode("utf-8", "replace") if isinstance(resp.body, bytes) else str(resp.body)
    return ConsulError(_one_line(f"{what}: HTTP {resp.code} {body}"))


# --------------------------------------------------------------------------- KV


def kv_prefix(config: Any) -> str | None:
    """The configured KV prefix as a folder: no leading '/', one trailing '/' ('' = whole store)."""
    prefix = config.consul_kv_prefix
    if prefix is None:
        return None
    prefix = prefix.strip().lstrip("/")
    return prefix if not prefix or prefix.endswith("/") else prefix + "/"


class KVContentError(ConsulError):
    """The KV prefix was read but holds a value that cannot go into the environment."""


def _split_kv(prefix: str, items: list[dict[str, Any]] | None) -> tuple[dict[str, str], list[str]]:
    env: dict[str, str] = {}
    skipped: list[str] = []
    for item in items or ():
        key = item.get("Key", "")
        if key.endswith("/") or not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if not name or "/" in name or "=" in name or "\0" in name:
            skipped.append(key)
            continue
        value = item.get("Value")
        try:
            text = "" if value is None else value.decode("utf-8") if isinstance(value, bytes) else str(value)
        except UnicodeDecodeError:
            raise KVContentError(f"KV key {key!r}: value is not UTF-8") from None
        if "\0" in text:
            raise KVContentError(f"KV key {key!r}: value contains a NUL byte")
        env[name] = text
    return dict(sorted(env.items())), skipped


def kv_env(prefix: str, items: list[dict[str, Any]] | None) -> dict[str, str]:
    """Recursive KV read result -> {NAME: value}, NAME being the key with `prefix` stripped.

    Folder keys (ending in '/') are skipped, and so are keys that cannot be environment
    variable names (nested deeper, or containing '=' or NUL).  Values are UTF-8; one that is
    not raises KVContentError (a ConsulError).
    """
    return _split_kv(prefix, items)[0]


def _log_skipped(skipped: list[str]) -> None:
    if skipped:
        structlog.get_logger().warning("consul_kv_keys_skipped", keys=skipped[:20],
                                       reason="nested or not usable as a variable name")


def _kv_query(client: Client, prefix: str, index: int = 0, wait: float | None = None) -> tuple[int, Any]:
    """(index, items) from one recursive read; blocking when index > 0 and wait is given."""
    try:
        raw_index, items = client.kv.get(prefix, recurse=True, index=index or None,
                                         wait=go_duration(wait) if index and wait else None)
    except ConsulError:
        raise
    except consul.ConsulException as exc:
        raise ConsulError(_one_line(f"KV read of {prefix!r}: {type(exc).__name__}: {exc}")) from None
    try:
        return int(raw_index), items
    except (TypeError, ValueError):
        raise ConsulError(f"KV read of {prefix!r}: bad X-Consul-Index {raw_index!r}") from None


def fetch_kv_env(config: Any) -> dict[str, str]:
    """Every key under config.consul_kv_prefix as {NAME: value}.  One read; ConsulError on failure."""
    prefix = kv_prefix(config)
    if prefix is None:
        return {}
    client = Client(config)
    try:
        env, skipped = _split_kv(prefix, _kv_query(client, prefix)[1])
    except ConsulError as exc:
        raise type(exc)(_one_line(exc)) from None
    finally:
        client.http.close()
    _log_skipped(skipped)
    return env


# --------------------------------------------------------------------------- registration


def default_service_name(app: str) -> str:
    """The app target's top-level module name: "pkg.web:app" -> "pkg"."""
    return app.split(":")[0].split(".")[0]


def service_registration(config: Any, bound_port: int | None, health_url: str | None) -> dict[str, Any]:
    """The body of PUT /v1/agent/service/register for this instance (pure)."""
    name = config.consul_service or default_service_name(config.app)
    port = config.consul_port if config.consul_port is not None else bound_port
    service_id = config.consul_service_id or f"{name}-{socket.gethostname()}-{port if port is not None else 0}"
    check: dict[str, Any] = {
        "CheckID": f"service:{service_id}",
        "Name": f"supervise {config.consul_check or 'ttl'} check",
        "Status": "passing",
        "DeregisterCriticalServiceAfter": go_duration(config.consul_deregister_after),
    }
    if (config.consul_check or "ttl") == "http":
        if not health_url:
            raise ValueError("--consul-check=http needs the health endpoint (--health-bind)")
        check["HTTP"] = health_url
        check["Method"] = "GET"
        check["Interval"] = go_duration(config.consul_check_interval)
        check["Timeout"] = go_duration(min(config.consul_check_interval, config.consul_timeout))
    else:
        check["TTL"] = go_duration(config.consul_ttl)
        check["Notes"] = "heartbeat from the supervise master"
    payload: dict[str, Any] = {
        "ID": service_id,
        "Name": name,
        "Tags": list(config.consul_tag or ()),
        "Meta": dict(config.consul_meta or ()),
        "Check": check,
    }
    if config.consul_address:
        payload["Address"] = config.consul_address
    if port is not None:
        payload["Port"] = port
    return payload


# --------------------------------------------------------------------------- helper process


class _Channel:
    """Thread-safe writer of protocol lines to the master."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._lock = threading.Lock()
        self.broken = False

    def send(self, message: dict[str, Any]) -> None:
        data = (json.dumps(message, separators=(",", ":")) + "\n").encode("utf-8")
        with self._lock:
            if self.broken:
                return
            try:
                self._sock.sendall(data)
            except OSError:
                self.broken = True


@dataclass
class _State:
    """What the master told us, shared by the helper's threads (guarded by `cond`)."""

    ttl: float
    cond: threading.Condition = field(default_factory=threading.Condition)
    ready: bool = False
    stopping: bool = False
    closed: bool = False
    last_alive: float = float("-inf")
    note: str = ""
    beat_now: bool = False
    baseline_env: dict[str, str] | None = None

    def alive_recently(self, now: float) -> bool:
        return now - self.last_alive <= self.ttl / 2

    def finished(self) -> bool:
        return self.stopping or self.closed

    def sleep(self, seconds: float, wake: Callable[[], bool] = lambda: False) -> None:
        """Wait up to `seconds`; returns early on stop, EOF or `wake()`.  Call with `cond` held."""
        deadline = time.monotonic() + seconds
        while not (self.finished() or wake()):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.cond.wait(left)


class _Backoff:
    def __init__(self, low: float = BACKOFF_MIN, high: float = BACKOFF_MAX) -> None:
        self.low, self.high, self.current = low, high, low

    def next(self) -> float:
        value, self.current = self.current, min(self.current * 2, self.high)
        return value

    def reset(self) -> None:
        self.current = self.low


class _Link:
    """Consul usable or not, from the helper's point of view: events on state change only.

    Each activity ("service", "kv") reports success or failure; Consul is down while any of
    them fails, up again when all succeed.  Each activity's trouble is logged once.
    """

    def __init__(self, channel: _Channel) -> None:
        self._channel = channel
        self._lock = threading.Lock()
        self._failing: dict[str, str] = {}
        self._down = False
        self._log = structlog.get_logger()

    def failed(self, activity: str, error: ConsulError) -> None:
        message = _one_line(error)
        with self._lock:
            if activity not in self._failing:
                event = "consul_unreachable" if isinstance(error, Unreachable) else "consul_error"
                self._log.warning(event, activity=activity, error=message)
            self._failing[activity] = message
            if not self._down:
                self._down = True
                self._channel.send({"event": "consul_down", "error": message})

    def succeeded(self, activity: str) -> None:
        with self._lock:
            if self._failing.pop(activity, None) is not None:
                self._log.info("consul_reachable", activity=activity)
            if self._down and not self._failing:
                self._down = False
                self._channel.send({"event": "consul_up"})


def _service_lost(resp: consul.base.Response) -> bool:
    """A TTL update answered "no such check": the agent lost its state (1.8.7: 500, newer: 404)."""
    body = resp.body if isinstance(resp.body, str) else str(resp.body)
    return resp.code == 404 or (resp.code == 500 and "does not have associated TTL" in body)


def _thread(target: Callable[[], None], name: str) -> None:
    """Start a daemon thread that runs in a copy of the current context, so the structlog
    context variables bound for this process (pid, role...) tag its log events too."""
    threading.Thread(target=contextvars.copy_context().run, args=(target,), name=name, daemon=True).start()


class _Helper:
    def __init__(self, sock: socket.socket, config: Any, registration: dict[str, Any]) -> None:
        self.sock = sock
        self.config = config
        self.registration = registration
        self.service_id: str = registration["ID"]
        self.check_id: str = registration["Check"]["CheckID"]
        self.kind = "http" if "HTTP" in registration["Check"] else "ttl"
        self.timeout = float(config.consul_timeout)
        self.state = _State(ttl=float(config.consul_ttl))
        self.channel = _Channel(sock)
        self.link = _Link(self.channel)
        self.service_lock = threading.Lock()  # one service mutation at a time: stop waits for it
        self.prefix = kv_prefix(config)
        self.log = structlog.get_logger()

    # ---------------------------------------------------------------- master side

    def run(self) -> None:
        _thread(self._service_loop, "consul-service")
        if self.prefix is not None:
            _thread(self._kv_loop, "consul-kv")
        reader = self.sock.makefile("rb")
        try:
            while True:
                try:
                    line = reader.readline(MAX_LINE)
                except OSError:
                    line = b""
                if not line:
                    break
                self._handle_line(line)
        finally:
            with self.state.cond:
                self.state.closed = True
                self.state.cond.notify_all()

    def _handle_line(self, line: bytes) -> None:
        try:
            message = json.loads(line)
            cmd = message["cmd"]
        except (ValueError, KeyError, TypeError):
            self.log.warning("consul_helper_bad_message", line=_one_line(line[:200]))
            return
        if cmd == "stop":
            self._stop(withdraw=bool(message.get("withdraw")))
            return
        with self.state.cond:
            self.state.last_alive = time.monotonic()  # any command proves the master loop runs
            if cmd == "ready" and not self.state.ready:
                self.state.ready = True
                env = message.get("env")
                if isinstance(env, dict):
                    self.state.baseline_env = {str(k): str(v) for k, v in env.items()}
            elif cmd == "note":
                self.state.note = str(message.get("text") or "")
                self.state.beat_now = True
            elif cmd == "alive":
                pass
            elif cmd != "ready":
                self.log.warning("consul_helper_unknown_command", cmd=_one_line(cmd))
            self.state.cond.notify_all()

    def _stop(self, withdraw: bool = False) -> None:
        """Withdraw the instance.  `withdraw`: the master was serving, so do it even if this
        helper never got `ready` (it was restarted after a crash and had not re-registered)."""
        with self.state.cond:
            self.state.stopping = True
            was_ready = self.state.ready or withdraw
            self.state.cond.notify_all()
        result: dict[str, Any] = {}
        done = threading.Event()

        def withdraw() -> None:
            try:
                with self.service_lock:
                    result.update(self._withdraw() if was_ready else {"ok": True, "error": None})
            finally:
                done.set()

        _thread(withdraw, "consul-stop")
        if not done.wait(max(0.05, self.timeout - 0.05)):
            result = {"ok": False, "error": f"Consul did not answer within {self.timeout:g}s"}
            self.log.warning("consul_deregister_failed", service_id=self.service_id, error=result["error"])
        self.channel.send({"event": "stopped", "ok": bool(result.get("ok")), "error": result.get("error")})

    def _withdraw(self) -> dict[str, Any]:
        client = Client(self.config)
        maintenance = self.config.consul_on_stop == "maintenance"
        try:
            if maintenance:
                resp = client.agent_put(f"/v1/agent/service/maintenance/{self.service_id}",
                                        [("enable", "true"), ("reason", "supervise is shutting down")])
            else:
                resp = client.agent_put(f"/v1/agent/service/deregister/{self.service_id}")
            # 404: unknown service (newer Consul; 1.8.7 answers 200 to a deregister): it is gone.
            if resp.code not in (200, 404):
                raise _http_error(resp, "maintenance" if maintenance else "deregister")
        except ConsulError as exc:
            self.log.warning("consul_deregister_failed", service_id=self.service_id, error=_one_line(exc))
            return {"ok": False, "error": _one_line(exc)}
        finally:
            client.http.close()
        self.log.info("consul_maintenance" if maintenance else "consul_deregistered", service_id=self.service_id)
        return {"ok": True, "error": None}

    # ---------------------------------------------------------------- service

    def _service_loop(self) -> None:
        client = Client(self.config)
        backoff = _Backoff()
        registrations = 0
        with self.state.cond:
            while not (self.state.ready or self.state.finished()):
                self.state.cond.wait()
        while True:
            with self.state.cond:
                # A TTL check is registered passing: only while the master loop is alive.
                while self.kind == "ttl" and not (self._alive() or self.state.finished()):
                    self.state.sleep(self.state.ttl / 3, wake=self._alive)
                if self.state.finished():
                    return
            try:
                self._register(client)
            except ConsulError as exc:
                self.link.failed("service", exc)
                with self.state.cond:
                    self.state.sleep(backoff.next())
                continue
            if self.state.finished():
                return
            registrations += 1
            backoff.reset()
            self.link.succeeded("service")
            self.log.info("consul_registered" if registrations == 1 else "consul_reregistered",
                          service_id=self.service_id, check=self.kind)
            self.channel.send({"event": "registered", "service_id": self.service_id})
            self._keep_registered(client, backoff)
            # returns when the agent lost the service (re-register now) or on stop/EOF

    def _register(self, client: Client) -> None:
        with self.service_lock:
            if self.state.finished():
                return
            resp = client.agent_put("/v1/agent/service/register", [("replace-existing-checks", "true")],
                                    self.registration)
        if resp.code != 200:
            raise _http_error(resp, "register")

    def _keep_registered(self, client: Client, backoff: _Backoff) -> None:
        """Heartbeats (ttl) or presence checks (http) until the agent lost the service."""
        period = self.state.ttl / 3 if self.kind == "ttl" else float(self.config.consul_check_interval)
        delay = period
        withheld = False
        while True:
            with self.state.cond:
                self.state.sleep(delay, wake=lambda: self.state.beat_now or (withheld and self._alive()))
                if self.state.finished():
                    return
                self.state.beat_now = False
                alive, note = self._alive(), self.state.note
            if self.kind == "ttl" and not alive:
                if not withheld:
                    self.log.warning("consul_heartbeat_withheld", reason="master loop silent",
                                     seconds=round(self.state.ttl / 2, 3))
                withheld, delay = True, period
                continue
            if withheld:
                self.log.info("consul_heartbeat_resumed")
                withheld = False
            try:
                lost = self._heartbeat(client, note) if self.kind == "ttl" else self._service_missing(client)
            except ConsulError as exc:
                self.link.failed("service", exc)
                delay = min(backoff.next(), period)
                continue
            if lost:
                self.log.warning("consul_service_lost", service_id=self.service_id,
                                 reason="the agent no longer knows the service (restarted?)")
                return
            backoff.reset()
            self.link.succeeded("service")
            delay = period

    def _alive(self) -> bool:
        return self.state.alive_recently(time.monotonic())

    def _heartbeat(self, client: Client, note: str) -> bool:
        """PUT check/pass; True when the agent does not know the check any more."""
        params = [("note", note)] if note else []
        with self.service_lock:
            if self.state.finished():
                return False
            resp = client.agent_put(f"/v1/agent/check/pass/{self.check_id}", params)
        if resp.code == 200:
            return False
        if _service_lost(resp):
            return True
        raise _http_error(resp, "TTL heartbeat")

    def _service_missing(self, client: Client) -> bool:
        resp = client.agent_get(f"/v1/agent/service/{self.service_id}")
        if resp.code == 200:
            return False
        if resp.code == 404:
            return True
        raise _http_error(resp, "service lookup")

    # ---------------------------------------------------------------- KV

    def _kv_loop(self) -> None:
        """Watch the KV prefix; send `kv` when its content differs from the last sent env.

        Each cycle is a plain read (index 0: never block on it) followed by a blocking read on
        the index it returned.  Starting every cycle at 0 is the "index went backwards: reset
        to 0" rule made unconditional: a blocking query on an index from before an agent
        restart would otherwise hang for the whole wait.  Cycles start at least
        KV_MIN_INTERVAL apart; errors back off 250 ms doubling to 60 s.
        """
        assert self.prefix is not None
        client = Client(self.config)
        backoff = _Backoff()
        with self.state.cond:
            while not (self.state.ready or self.state.finished()):
                self.state.cond.wait()
            watch = _KVWatch(self.prefix, self.state.baseline_env)
        last_start = float("-inf")
        while True:
            with self.state.cond:
                self.state.sleep(last_start + KV_MIN_INTERVAL - time.monotonic())
                if self.state.finished():
                    return
            last_start = time.monotonic()
            try:
                index, items = _kv_query(client, self.prefix)
                self._kv_deliver(watch, index, items)
                if index > 0 and not self.state.finished():
                    new_index, items = _kv_query(client, self.prefix, index, KV_WAIT)
                    if new_index != index:
                        self._kv_deliver(watch, new_index, items)
            except ConsulError as exc:
                self.link.failed("kv", exc)
                with self.state.cond:
                    self.state.sleep(backoff.next())
                continue
            backoff.reset()

    def _kv_deliver(self, watch: "_KVWatch", index: int, items: Any) -> None:
        self.link.succeeded("kv")
        if self.state.finished():
            return
        env = watch.update(items, self.log)
        if env is not None:
            self.log.info("consul_kv_changed", keys=len(env), index=index)
            self.channel.send({"event": "kv", "env": env, "index": index})


class _KVWatch:
    """The env last sent to the master, and the last invalid-content error (logged once)."""

    def __init__(self, prefix: str, baseline: dict[str, str] | None) -> None:
        self.prefix = prefix
        self.last_env = baseline
        self.invalid = ""

    def update(self, items: Any, log: Any) -> dict[str, str] | None:
        """The new env when it differs from the last one sent, else None."""
        try:
            env, skipped = _split_kv(self.prefix, items)
        except KVContentError as exc:
            if str(exc) != self.invalid:
                log.warning("consul_kv_invalid", error=_one_line(exc))
            self.invalid = str(exc)
            return None
        self.invalid = ""
        if env == self.last_env:
            return None
        _log_skipped(skipped)
        self.last_env = env
        return env


def _reset_signals() -> None:
    """Undo the master's signal setup inherited through fork (same choices as
    supervisor.helpers, so running helper_main from there or from a test is alike).

    The master's wakeup fd must not receive our signals; Ctrl-C or SIGHUP sent to the whole
    process group must not kill the helper before the master asks it to deregister.
    """
    try:
        signal.set_wakeup_fd(-1)
    except (ValueError, OSError):
        pass
    for sig in (signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    for sig in (signal.SIGTERM, signal.SIGQUIT, signal.SIGCHLD, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_DFL)


def helper_main(sock: socket.socket, config: Any, bound_port: int | None, health_url: str | None) -> None:
    """Body of the Consul helper process (forked by the master; may use threads, never forks).

    Returns when the master closes its end of `sock`; the caller should then `os._exit(0)`.
    """
    if threading.current_thread() is threading.main_thread():
        _reset_signals()
    sock.setblocking(True)
    # Inherited from the master through fork: tag our events as this process's.
    structlog.contextvars.bind_contextvars(pid=os.getpid(), role="consul")
    registration = service_registration(config, bound_port, health_url)
    structlog.get_logger().info("consul_helper_started", service_id=registration["ID"],
                                service=registration["Name"], check="http" if "HTTP" in registration["Check"] else "ttl")
    _Helper(sock, config, registration).run()
