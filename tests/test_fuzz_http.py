"""Property-based fuzzing of the HTTP layer (hypothesis): arbitrary bytes and mutations of
valid requests, against one real worker.  Whatever arrives:

* no worker dies;
* every response is well-formed HTTP/1.1, and none is a 5xx but the protocol's own (501, 505):
  the app (tests/apps/echo.py) never fails;
* never more than one response per request (a request line with an HTTP-version, or one
  HTTP/0.9 line);
* nothing follows an error response (the connection is closed after it).
"""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Any

import httptools
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tests.harness import Supervise
from tests.test_corpus import CASES

APPS = Path(__file__).resolve().parent / "apps"
VALID = [c.data for c in CASES if c.expect == [200]][:40]
ALLOWED = {100, 200, 400, 408, 413, 414, 431, 501, 505}
FUZZ = settings(max_examples=250, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def server() -> Any:
    sv = Supervise(["echo", "-w", "1", "--chdir", str(APPS), "--no-watch", "--limit-request-body", "64k",
                    "--header-timeout", "1", "--body-timeout", "1", "--keepalive-timeout", "1"])
    sv.ready()
    yield sv
    assert not sv.find("worker_exited"), "a worker died"
    sv.kill()


class _Responses:
    def __init__(self) -> None:
        self.parser: Any = None
        self.statuses: list[int] = []

    def on_message_complete(self) -> None:
        self.statuses.append(self.parser.get_status_code())


def send(port: int, data: bytes) -> tuple[list[int], bytes]:
    """Send, half-close, read to the end: (statuses, everything received)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may close first, on a hopeless request
        raw = b""
        try:
            while chunk := sock.recv(65536):
                raw += chunk
        except ConnectionResetError:
            pass
    got = _Responses()
    parser = got.parser = httptools.HttpResponseParser(got)
    parser.feed_data(raw)  # raises on anything that is not well-formed HTTP/1.1
    return got.statuses, raw


_HTTP09 = re.compile(rb"(?m)^[!-~]+ [!-~]+\r?$")  # a request line without an HTTP-version


def requests_in(data: bytes) -> int:
    """How many requests `data` can hold at most: request lines with an HTTP-version, plus
    HTTP/0.9-style lines (each gets its own 400); at least one (garbage gets a 400)."""
    return max(1, data.count(b" HTTP/") + len(_HTTP09.findall(data)))


def check(server: Supervise, data: bytes) -> None:
    statuses, raw = send(server.port, data)
    final = [s for s in statuses if s != 100]
    assert set(statuses) <= ALLOWED, (statuses, data[:200])
    assert len(final) <= requests_in(data), (statuses, data[:200])
    errors = [i for i, s in enumerate(final) if s >= 400]
    if errors:
        assert errors[0] == len(final) - 1, f"a response after an error: {final}"
    assert not server.find("worker_exited")


@FUZZ
@given(data=st.binary(max_size=2048))
def test_arbitrary_bytes(server: Supervise, data: bytes) -> None:
    check(server, data)


_NASTY = [b"\x00", b"\r", b"\n", b" ", b"\t", b":", b"\r\n", b"\r\n\r\n", b"0\r\n\r\n", b"Host: x\r\n",
          b"Transfer-Encoding: chunked\r\n", b"Content-Length: 5\r\n", b"\xff", b"%", b"?", b"*",
          b"HTTP/1.1", b"HTTP/1.0", b";", b"\"", b"Expect: 100-continue\r\n", b"Connection: close\r\n"]


@st.composite
def mutated(draw: Any) -> bytes:
    """A valid request (or two pipelined), with insertions, deletions and replacements."""
    data = bytearray(draw(st.sampled_from(VALID)))
    if draw(st.booleans()):
        data += draw(st.sampled_from(VALID))
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["insert", "delete", "replace", "duplicate-line"]))
        if op == "insert":
            data[pos:pos] = draw(st.sampled_from(_NASTY) | st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 8))]
        elif op == "replace" and pos < len(data):
            data[pos] = draw(st.integers(0, 255))
        else:
            start = data.rfind(b"\r\n", 0, pos) + 2
            end = data.find(b"\r\n", pos)
            if start >= 2 and end > start:
                data[end:end] = data[start - 2:end]
    return bytes(data)


@FUZZ
@given(data=mutated())
def test_mutated_requests(server: Supervise, data: bytes) -> None:
    check(server, data)


def test_negative_control_an_unsolicited_response_fails_the_check() -> None:
    """The same checks against a worker that answers an error with two responses."""
    sv = Supervise(["echo", "-w", "1", "--chdir", str(APPS), "--no-watch"], inject=["unsolicited-response"])
    try:
        sv.ready()
        with pytest.raises(AssertionError):
            check(sv, b"GET / HTTP/1.1\r\n\r\n")  # no Host: a 400, preceded by a stray 200
    finally:
        sv.kill()
