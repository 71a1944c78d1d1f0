"""The HTTP corpus: tests/corpus/http, one request per file, valid and invalid, each with the
RFC text it follows, the statuses expected and what the app must see.

File format: `# the RFC text`, `expect: STATUS [STATUS...]` (one per response, in order),
`check: FIELD=VALUE` lines (what tests/apps/echo.py reports for the first 200; escapes as
below), `---`, then the
bytes to send: line breaks in the file are for reading only; \\r, \\n, \\t, \\xHH and \\\\ are
the bytes.  After an error status the server must close the connection.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httptools
import pytest

from tests.harness import Supervise

CORPUS = Path(__file__).resolve().parent / "corpus" / "http"
APPS = Path(__file__).resolve().parent / "apps"


@dataclass
class Case:
    name: str
    rfc: str
    expect: list[int]
    checks: list[tuple[str, str]]
    data: bytes


def load(path: Path) -> Case:
    head, _, body = path.read_text(encoding="latin-1").partition("\n---\n")
    rfc, expect, checks = "", [], []
    for line in head.splitlines():
        if line.startswith("# "):
            rfc = line[2:]
        elif line.startswith("expect: "):
            expect = [int(s) for s in line[8:].split()]
        elif line.startswith("check: "):
            key, _, value = line[7:].partition("=")
            checks.append((key, value.encode("latin-1").decode("unicode_escape")))
    data = body.replace("\n", "").encode("latin-1").decode("unicode_escape").encode("latin-1")
    return Case(path.stem, rfc, expect, checks, data)


CASES = [load(p) for p in sorted(CORPUS.glob("*.txt"))]


def test_the_corpus_is_large_and_covers_both_sides():
    assert len(CASES) >= 150
    assert sum("-valid-" in c.name for c in CASES) >= 60 and sum("-invalid-" in c.name for c in CASES) >= 90
    assert all(c.expect and c.rfc for c in CASES)


@pytest.fixture(scope="module")
def server() -> Any:
    sv = Supervise(["echo", "-w", "1", "--chdir", str(APPS), "--no-watch", "--limit-request-body", "64k",
                    "--header-timeout", "2", "--body-timeout", "2"])
    sv.ready()
    yield sv
    sv.kill()


@dataclass
class Responses:
    statuses: list[int] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    closed: bool = False
    raw: bytes = b""


class _Collector:
    def __init__(self, head_only: bool) -> None:
        self.body = b""
        self.parser: Any = None
        self.head_only = head_only
        self.done: list[tuple[int, bytes]] = []

    def on_headers_complete(self) -> None:
        if self.head_only:  # a response to HEAD has no body, whatever its Content-Length says
            self.done.append((self.parser.get_status_code(), b""))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        if not self.head_only:
            self.done.append((self.parser.get_status_code(), self.body))
        self.body = b""


def exchange(port: int, data: bytes, expected: int, timeout: float = 5.0) -> Responses:
    """Send `data`, read responses until `expected` arrived (and, after an error status, until
    the server closes), or the connection ends."""
    out = Responses()
    collector = _Collector(head_only=data.startswith(b"HEAD "))
    parser = collector.parser = httptools.HttpResponseParser(collector)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        while True:
            if len(collector.done) >= expected and collector.done and collector.done[-1][0] < 400:
                break  # a keep-alive connection: the server rightly keeps it open
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                out.closed = True
                break
            out.raw += chunk
            parser.feed_data(chunk)
    out.statuses = [s for s, _ in collector.done]
    out.bodies = [b for _, b in collector.done]
    return out


def lookup(seen: dict[str, Any], path: str) -> Any:
    value: Any = seen
    for part in path.split("."):
        value = value[int(part)] if isinstance(value, list) else value[part]
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value):
        return f"{value[0]}:{value[1]}"
    if isinstance(value, bool):
        return str(value).lower()
    return value


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_corpus_case(server: Supervise, case: Case) -> None:
    got = exchange(server.port, case.data, len(case.expect))
    assert got.statuses == case.expect, f"{case.rfc}\nsent {case.data[:300]!r}\ngot {got.raw[:500]!r}"
    if case.expect[-1] >= 400:
        assert got.closed, "the server closes the connection after an error"
    if case.checks:
        seen = json.loads(got.bodies[case.expect.index(200)])
        for key, value in case.checks:
            assert str(lookup(seen, key)) == value, f"{key}: {case.rfc}; the app saw {seen}"
