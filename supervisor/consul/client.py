"""Consul, the client: py-consul on requests, with a timeout on every call.  Used by the master
once at start (`fetch_kv_env`) and by the Consul helper process.

The ACL token is always the configured one: `CONSUL_HTTP_TOKEN` is one of consul_token's
environment variables in the settings, so it is honoured there with the usual precedence, and
py-consul's own environment override is switched off.  Requests never go through an HTTP proxy
from the environment: the agent is local.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Iterable, Mapping

import consul
import consul.base
import requests
import structlog

from supervisor.consul.spec import ConsulError, ConsulSpec, go_duration, one_line, parse_agent_address


def _describe_transport_error(exc: requests.RequestException, base_uri: str, timeout: float) -> str:
    if isinstance(exc, requests.Timeout):
        return f"Consul at {base_uri} did not answer within {timeout:g}s"
    reason = re.findall(r"\[Errno -?\d+\] ([^'\")\]]+)", str(exc))
    detail = reason[-1].strip() if reason else type(exc).__name__
    return f"cannot reach Consul at {base_uri}: {detail}"



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

    def __init__(self, spec: ConsulSpec) -> None:
        if not spec.address:
            raise ConsulError("no Consul agent address configured (--consul)")
        try:
            scheme, host, port = parse_agent_address(spec.address)
        except ValueError as exc:
            raise ConsulError(f"invalid Consul address: {exc}") from None
        self._timeout = spec.timeout
        super().__init__(
            host=f"[{host}]" if ":" in host else host,
            port=port,
            scheme=scheme,
            token=spec.token,
            dc=spec.dc,
            verify=spec.cacert,  # None: py-consul reads CONSUL_HTTP_SSL_VERIFY
            cert=(spec.client_cert, spec.client_key) if spec.client_cert and spec.client_key else None,
        )
        # Deliberate: py-consul lets CONSUL_HTTP_TOKEN override the explicit token.  Our settings
        # already read CONSUL_HTTP_TOKEN (after SUPERVISE_CONSUL_TOKEN and the command line), so
        # the configured value is the one to use.
        self.token = spec.token

    def http_connect(self, host: str, port: int, scheme: str, verify: Any = True, cert: Any = None) -> _HTTPClient:
        return _HTTPClient(host, port, scheme, verify, cert, timeout=self._timeout)

    # Raw agent calls: the status code matters (404 vs 500 vs 200), so the callback keeps it.
    # Paths are given unquoted: py-consul's HTTPClient.uri() quotes them.

    def agent_put(self, path: str, params: list[tuple[str, Any]] | None = None, body: Any = None) -> consul.base.Response:
        data = "" if body is None else json.dumps(body)
        return self.http.put(lambda r: r, path, params=params or [], data=data, headers=self.prepare_headers())

    def agent_get(self, path: str) -> consul.base.Response:
        return self.http.get(lambda r: r, path, headers=self.prepare_headers())


def http_error(resp: consul.base.Response, what: str) -> ConsulError:
    body = resp.body.decode("utf-8", "replace") if isinstance(resp.body, bytes) else str(resp.body)
    return ConsulError(one_line(f"{what}: HTTP {resp.code} {body}"))


def log_skipped(skipped: list[str]) -> None:
    if skipped:
        structlog.get_logger().warning("consul_kv_keys_skipped", keys=skipped[:20],
                                       reason="nested or not usable as a variable name")


def kv_query(client: Client, prefix: str, index: int = 0, wait: float | None = None) -> tuple[int, Any]:
    """(index, items) from one recursive read; blocking when index > 0 and wait is given."""
    try:
        raw_index, items = client.kv.get(prefix, recurse=True, index=index or None,
                                         wait=go_duration(wait) if index and wait else None)
    except ConsulError:
        raise
    except consul.ConsulException as exc:
        raise ConsulError(one_line(f"KV read of {prefix!r}: {type(exc).__name__}: {exc}")) from None
    try:
        return int(raw_index), items
    except (TypeError, ValueError):
        raise ConsulError(f"KV read of {prefix!r}: bad X-Consul-Index {raw_index!r}") from None
