"""The HTTP corpus (tests/corpus/http, see tests/test_corpus.py) against the ASGI worker: the
same requests, the same statuses, the same view of the request (tests/apps/asgi_echo.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.harness import Supervise
from tests.test_corpus import APPS, CASES, Case, exchange, lookup

# What ASGI has no place for (the WSGI echo reports them from server-specific environ keys).
NOT_IN_ASGI = ("trailers.",)


@pytest.fixture(scope="module")
def server() -> Any:
    sv = Supervise(["asgi_echo", "-w", "1", "--chdir", str(APPS), "--no-watch", "--limit-request-body", "64k",
                    "--header-timeout", "2", "--body-timeout", "2"])
    sv.ready()
    yield sv
    sv.kill()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_corpus_case(server: Supervise, case: Case) -> None:
    got = exchange(server.port, case.data, len(case.expect))
    assert got.statuses == case.expect, f"{case.rfc}\nsent {case.data[:300]!r}\ngot {got.raw[:500]!r}"
    if case.expect[-1] >= 400:
        assert got.closed, "the server closes the connection after an error"
    if case.checks:
        seen = json.loads(got.bodies[case.expect.index(200)])
        for key, value in case.checks:
            if key.startswith(NOT_IN_ASGI):
                continue
            assert str(lookup(seen, key)) == value, f"{key}: {case.rfc}; the app saw {seen}"
