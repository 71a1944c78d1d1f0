"""Behind a proxy: who the client is, as trusted proxies tell it.

* `Trust`: the peers --forwarded-allow-ips trusts (CIDRs; `*` for all).
* `apply`: from a trusted peer, `Forwarded` (RFC 7239), else `X-Forwarded-For`,
  `X-Forwarded-Proto` and `X-Forwarded-Host`, set REMOTE_ADDR, wsgi.url_scheme and HTTP_HOST.
  The client is the right-most address that is not itself a trusted proxy: every trusted hop
  appends the address it received the request from, so what lies left of the first untrusted
  hop was written by the client and may be forged.
* `read_proxy_header`: the PROXY protocol header (v1 text, v2 binary) that HAProxy or an AWS
  NLB sends before the request, parsed by the `proxy-protocol` library.

Pure apart from the library call: tested with plain data.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from proxyprotocol import ProxyProtocol, ProxyProtocolIncompleteError, ProxyProtocolSyntaxError
from proxyprotocol.detect import ProxyProtocolDetect
from proxyprotocol.v1 import ProxyProtocolV1
from proxyprotocol.v2 import ProxyProtocolV2

CACHE_LIMIT = 1024
PROXY_HEADER_LIMIT = 4096  # longer than any header HAProxy or an NLB sends (v1: 107 bytes)
_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


class Trust:
    """Which peers are trusted proxies."""

    def __init__(self, allow: tuple[str, ...]) -> None:
        self.everyone = "*" in allow
        self.networks = [ipaddress.ip_network(a, strict=False) for a in allow if a != "*"]
        self._cache: dict[str, bool] = {}

    def __call__(self, address: str) -> bool:
        if self.everyone:
            return True
        hit = self._cache.get(address)
        if hit is None:
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                return False
            if ip.version == 6 and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            hit = any(ip in net for net in self.networks)
            if len(self._cache) >= CACHE_LIMIT:
                self._cache.clear()
            self._cache[address] = hit
        return hit


# RFC 7239 section 4: forwarded-element = [ forwarded-pair ] *( ";" [ forwarded-pair ] ),
# forwarded-pair = token "=" value, value = token / quoted-string; elements separated by ",".
_PAIR = re.compile(r'\s*([!#$%&\'*+\-.^_`|~0-9A-Za-z]+)=("(?:[^"\\]|\\.)*"|[!#$%&\'*+\-.^_`|~0-9A-Za-z:\[\]]*)\s*')


def parse_forwarded(value: str) -> list[dict[str, str]] | None:
    """The elements of a Forwarded field, or None when it is malformed (then it is ignored)."""
    elements: list[dict[str, str]] = []
    for element in _split_outside_quotes(value, ","):
        pairs: dict[str, str] = {}
        for pair in _split_outside_quotes(element, ";"):
            if not pair.strip():
                continue
            match = _PAIR.fullmatch(pair)
            if match is None:
                return None
            raw = match.group(2)
            if raw.startswith('"'):
                raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
            pairs[match.group(1).lower()] = raw
        elements.append(pairs)
    return elements


def _split_outside_quotes(text: str, sep: str) -> list[str]:
    parts, current, quoted, escaped = [], [], False, False
    for ch in text:
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == sep and not quoted:
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    parts.append("".join(current))
    return parts


def _node(value: str | None) -> tuple[str | None, str | None]:
    """A node (RFC 7239 6): '192.0.2.43', '"[2001:db8::17]:47011"', 'unknown', '_hidden' ->
    (ip or None, port or None)."""
    if not value:
        return None, None
    value = value.strip()
    port = None
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        if rest.startswith(":"):
            port = rest[1:]
    elif value.count(":") == 1:
        host, port = value.split(":")
    else:
        host = value
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None, None  # "unknown", an obfuscated identifier: no address
    return host, port if port and port.isdigit() else None


def apply(environ: dict[str, Any], trust: Trust) -> None:
    """The request came from a trusted peer: take the client from its forwarding headers."""
    forwarded = environ.get("HTTP_FORWARDED")
    if forwarded is not None:
        elements = parse_forwarded(forwarded)
        if elements:
            hops = [_node(e.get("for")) for e in elements]
            i = _client_index([h[0] for h in hops], trust)
            address, port = hops[i]
            if address is not None:
                environ["REMOTE_ADDR"], environ["REMOTE_PORT"] = address, port or "0"
            _set_scheme_and_host(environ, elements[i].get("proto"), elements[i].get("host"))
        return
    xff = environ.get("HTTP_X_FORWARDED_FOR")
    hops_xff = [h.strip() for h in xff.split(",")] if xff else []
    i = _client_index(hops_xff, trust) if hops_xff else 0
    if hops_xff:
        address = _node(hops_xff[i])[0]
        if address is not None:
            environ["REMOTE_ADDR"], environ["REMOTE_PORT"] = address, "0"
    skipped = len(hops_xff) - 1 - i if hops_xff else 0  # trusted hops right of the client
    _set_scheme_and_host(environ, _pick(environ.get("HTTP_X_FORWARDED_PROTO"), skipped),
                         _pick(environ.get("HTTP_X_FORWARDED_HOST"), skipped))


def _client_index(addresses: list[str | None], trust: Trust) -> int:
    """From the right, the first address that is not a trusted proxy (the left-most when all are)."""
    i = len(addresses) - 1
    while i > 0 and addresses[i] is not None and trust(addresses[i]):  # type: ignore[arg-type]
        i -= 1
    return i


def _pick(value: str | None, skipped: int) -> str | None:
    """The entry of a list-valued X-Forwarded-* field written by the hop that saw the client."""
    if not value:
        return None
    entries = [v.strip() for v in value.split(",")]
    return entries[max(0, len(entries) - 1 - skipped)]


def _set_scheme_and_host(environ: dict[str, Any], proto: str | None, host: str | None) -> None:
    if proto:
        proto = proto.lower()
        if proto in ("http", "https"):
            environ["wsgi.url_scheme"] = proto
    if host and re.fullmatch(r"[A-Za-z0-9.\-]+(:[0-9]+)?|\[[0-9A-Fa-f:.]+\](:[0-9]+)?", host):
        environ["HTTP_HOST"] = host


# --------------------------------------------------------------------------- PROXY protocol

PROTOCOLS: dict[str, ProxyProtocol] = {"v1": ProxyProtocolV1(), "v2": ProxyProtocolV2(),
                                       "auto": ProxyProtocolDetect()}


def proxy_header_ahead(data: bytes) -> bool | None:
    """Whether `data` starts with a PROXY protocol header (True), cannot (False), or may
    (None: too few bytes yet to tell)."""
    for signature in (b"PROXY ", _V2_SIGNATURE):
        if data.startswith(signature):
            return True
        if signature.startswith(data[:len(signature)]) and len(data) < len(signature):
            return None
    return False


def client_address(result: Any) -> tuple[str, int] | None:
    """The proxied client (source) of a PROXY header, or None when the header says the
    connection is the proxy's own (a health check: LOCAL, UNKNOWN)."""
    if not getattr(result, "proxied", False):
        return None
    source = result.source
    if isinstance(source, tuple) and len(source) >= 2 and isinstance(source[0], ipaddress._BaseAddress):
        return str(source[0]), int(source[1])
    return None


def read_proxy_header(mode: str, data: bytes) -> tuple[Any, int] | None:
    """(result, bytes it took) once `data` holds a whole header, None while it does not yet.
    ValueError (one line) when the header is malformed or too long.  Follows the library's
    own reading protocol (`want_read`) over bytes already received."""
    pp = PROTOCOLS[mode]
    taken = 0
    header = b""
    while True:
        try:
            return pp.unpack(header), taken
        except ProxyProtocolIncompleteError as exc:
            want = exc.want_read
            if want.want_bytes is not None:
                end = taken + want.want_bytes
                if end > len(data):
                    return _incomplete(data)
            elif want.want_line:
                newline = data.find(b"\n", taken)
                if newline < 0:
                    return _incomplete(data)
                end = newline + 1
            else:
                raise ValueError("PROXY protocol: nothing more to read, yet incomplete") from None
            header += data[taken:end]
            taken = end
        except (ProxyProtocolSyntaxError, ValueError, KeyError) as exc:
            raise ValueError(f"malformed PROXY protocol header: {exc or type(exc).__name__}") from None


def _incomplete(data: bytes) -> None:
    if len(data) > PROXY_HEADER_LIMIT:
        raise ValueError("PROXY protocol header too long")
    return None
