"""Consul, the pure part: the narrow settings the Consul code gets, the registration body,
and how KV keys become environment variables.  Used by the master (KV fetch at start) and by
the Consul helper process."""

from __future__ import annotations

import socket
import urllib.parse
from dataclasses import dataclass
from typing import Any

from supervisor.settings import Config


class ConsulError(Exception):
    """Consul could not be used (unreachable, timeout, ACL denial, bad answer...).  One line."""


@dataclass(frozen=True)
class ConsulSpec:
    """What the Consul code needs from the settings, resolved (service name, ID and port)."""

    address: str
    token: str | None
    dc: str | None
    timeout: float
    cacert: str | None
    client_cert: str | None
    client_key: str | None
    service: str
    service_id: str
    tags: tuple[str, ...]
    meta: tuple[tuple[str, str], ...]
    advertise_address: str | None
    port: int | None
    check: str  # "ttl" | "http"
    ttl: float
    check_interval: float
    deregister_after: float
    on_stop: str  # "deregister" | "maintenance"
    kv_prefix: str | None  # as a folder: no leading '/', one trailing '/' ('' = whole store)
    health_url: str | None

    @classmethod
    def from_config(cls, config: Config, bound_port: int | None = None, health_url: str | None = None,
                    hostname: str | None = None) -> "ConsulSpec":
        name = config.consul_service or default_service_name(config.app)
        port = config.consul_port if config.consul_port is not None else bound_port
        service_id = config.consul_service_id or \
            f"{name}-{hostname or socket.gethostname()}-{port if port is not None else 0}"
        return cls(
            address=config.consul or "", token=config.consul_token or None, dc=config.consul_dc or None,
            timeout=config.consul_timeout, cacert=config.consul_cacert, client_cert=config.consul_client_cert,
            client_key=config.consul_client_key, service=name, service_id=service_id,
            tags=tuple(config.consul_tag), meta=tuple(config.consul_meta),
            advertise_address=config.consul_address, port=port, check=config.consul_check, ttl=config.consul_ttl,
            check_interval=config.consul_check_interval, deregister_after=config.consul_deregister_after,
            on_stop=config.consul_on_stop, kv_prefix=_folder(config.consul_kv_prefix), health_url=health_url)


def _folder(prefix: str | None) -> str | None:
    if prefix is None:
        return None
    prefix = prefix.strip().lstrip("/")
    return prefix if not prefix or prefix.endswith("/") else prefix + "/"


def one_line(text: object, limit: int = 300) -> str:
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



def default_service_name(app: str) -> str:
    """The app target's top-level module name: "pkg.web:app" -> "pkg"."""
    return app.split(":")[0].split(".")[0]


def service_registration(spec: ConsulSpec) -> dict[str, Any]:
    """The body of PUT /v1/agent/service/register for this instance."""
    check: dict[str, Any] = {
        "CheckID": f"service:{spec.service_id}",
        "Name": f"supervise {spec.check} check",
        "Status": "passing",
        "DeregisterCriticalServiceAfter": go_duration(spec.deregister_after),
    }
    if spec.check == "http":
        if not spec.health_url:
            raise ValueError("--consul-check=http needs the health endpoint (--health-bind)")
        check["HTTP"] = spec.health_url
        check["Method"] = "GET"
        check["Interval"] = go_duration(spec.check_interval)
        check["Timeout"] = go_duration(min(spec.check_interval, spec.timeout))
    else:
        check["TTL"] = go_duration(spec.ttl)
        check["Notes"] = "heartbeat from the supervise master"
    payload: dict[str, Any] = {
        "ID": spec.service_id,
        "Name": spec.service,
        "Tags": list(spec.tags),
        "Meta": dict(spec.meta),
        "Check": check,
    }
    if spec.advertise_address:
        payload["Address"] = spec.advertise_address
    if spec.port is not None:
        payload["Port"] = spec.port
    return payload


class KVContentError(ConsulError):
    """The KV prefix was read but holds a value that cannot go into the environment."""


def split_kv(prefix: str, items: list[dict[str, Any]] | None) -> tuple[dict[str, str], list[str]]:
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
    return split_kv(prefix, items)[0]


