"""Trusted proxies and the PROXY protocol, the pure part (supervisor/worker/forwarded.py)."""

from __future__ import annotations

import pytest
from proxyprotocol.result import ProxyResultIPv4, ProxyResultIPv6
from proxyprotocol.v1 import ProxyProtocolV1
from proxyprotocol.v2 import ProxyProtocolV2
from ipaddress import IPv4Address, IPv6Address

from supervisor.worker import forwarded
from supervisor.worker.forwarded import Trust, apply, parse_forwarded, read_proxy_header

LOOPBACK = Trust(("127.0.0.1", "::1"))


def environ(**headers: str) -> dict:
    return {"REMOTE_ADDR": "127.0.0.1", "REMOTE_PORT": "5000", "wsgi.url_scheme": "http",
            "HTTP_HOST": "internal:8000", **{f"HTTP_{k.upper()}": v for k, v in headers.items()}}


def test_the_issue_example_right_most_untrusted_address():
    env = environ(x_forwarded_for="203.0.113.7, 198.51.100.9")
    apply(env, Trust(("127.0.0.1",)))
    assert env["REMOTE_ADDR"] == "198.51.100.9"


def test_negative_control_the_left_most_address_can_be_forged():
    """A client sends its own X-Forwarded-For; the proxy appends the address it saw.  Taking the
    left-most would believe the forgery; the right-most untrusted does not."""
    env = environ(x_forwarded_for="1.2.3.4, 198.51.100.9")  # 1.2.3.4: written by the client
    apply(env, Trust(("127.0.0.1",)))
    assert env["REMOTE_ADDR"] != "1.2.3.4"


def test_trusted_hops_are_skipped_and_cidrs_work():
    trust = Trust(("10.0.0.0/8", "127.0.0.1"))
    env = environ(x_forwarded_for="192.0.2.1, 10.1.2.3, 10.9.9.9", x_forwarded_proto="https, http, http",
                  x_forwarded_host="public.example, lb.internal, lb2.internal")
    apply(env, trust)
    assert env["REMOTE_ADDR"] == "192.0.2.1" and env["REMOTE_PORT"] == "0"
    assert env["wsgi.url_scheme"] == "https" and env["HTTP_HOST"] == "public.example"


def test_star_trusts_everyone_and_all_trusted_gives_the_left_most():
    env = environ(x_forwarded_for="10.0.0.1, 10.0.0.2")
    apply(env, Trust(("*",)))
    assert env["REMOTE_ADDR"] == "10.0.0.1"


def test_ipv4_mapped_peers_are_matched_as_ipv4():
    assert Trust(("127.0.0.1",))("::ffff:127.0.0.1") and not Trust(("127.0.0.1",))("::ffff:127.0.0.2")


def test_rfc7239_forwarded_wins_over_x_forwarded():
    env = environ(forwarded='for=192.0.2.60;proto=https;host="shop.example", for=127.0.0.1',
                  x_forwarded_for="9.9.9.9")
    apply(env, LOOPBACK)
    assert (env["REMOTE_ADDR"], env["wsgi.url_scheme"], env["HTTP_HOST"]) == ("192.0.2.60", "https", "shop.example")


@pytest.mark.parametrize("value, expected", [
    ("for=192.0.2.43", [{"for": "192.0.2.43"}]),
    ('for="[2001:db8:cafe::17]:4711"', [{"for": "[2001:db8:cafe::17]:4711"}]),
    ("for=192.0.2.43, for=198.51.100.17;by=203.0.113.60;proto=http;host=example.com",
     [{"for": "192.0.2.43"}, {"for": "198.51.100.17", "by": "203.0.113.60", "proto": "http", "host": "example.com"}]),
    ('For="\\"quoted\\""', [{"for": '"quoted"'}]),
    ("for=a;;", [{"for": "a"}]),
    ("=x", None), ("for", None), ('for="unterminated', None),
])
def test_parse_forwarded(value, expected):
    assert parse_forwarded(value) == expected


def test_bogus_scheme_and_host_are_ignored():
    env = environ(x_forwarded_proto="javascript", x_forwarded_host="evil.example/path?x")
    apply(env, LOOPBACK)
    assert env["wsgi.url_scheme"] == "http" and env["HTTP_HOST"] == "internal:8000"


def test_proxy_header_v1_and_v2_and_the_request_after_it():
    v1 = ProxyProtocolV1().pack(ProxyResultIPv4((IPv4Address("192.0.2.7"), 4242), (IPv4Address("10.0.0.1"), 80)))
    result, taken = read_proxy_header("v1", v1 + b"GET / HTTP/1.1\r\n")
    assert forwarded.client_address(result) == ("192.0.2.7", 4242) and taken == len(v1)
    v2 = ProxyProtocolV2().pack(ProxyResultIPv6((IPv6Address("2001:db8::7"), 5151), (IPv6Address("::1"), 80)))
    result, taken = read_proxy_header("auto", v2 + b"GET")
    assert forwarded.client_address(result) == ("2001:db8::7", 5151) and taken == len(v2)
    assert read_proxy_header("v2", v2[:10]) is None, "incomplete: wait for more"


def test_malformed_or_endless_proxy_headers_are_errors():
    with pytest.raises(ValueError, match="malformed"):
        read_proxy_header("v1", b"PROXY TCP4 not-an-ip 10.0.0.1 1 2\r\n")
    with pytest.raises(ValueError):
        read_proxy_header("v2", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises(ValueError, match="too long"):
        read_proxy_header("v1", b"PROXY " + b"x" * 5000)


def test_proxy_header_ahead():
    assert forwarded.proxy_header_ahead(b"PROXY TCP4 ...") is True
    assert forwarded.proxy_header_ahead(b"PRO") is None
    assert forwarded.proxy_header_ahead(b"\r\n\r\n\x00") is None
    assert forwarded.proxy_header_ahead(b"GET / HTTP/1.1") is False
