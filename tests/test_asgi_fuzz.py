"""The HTTP fuzzing of tests/test_fuzz_http.py against the ASGI worker (tests/apps/asgi_echo.py):
arbitrary bytes and mutated valid requests; no worker dies, every response is well-formed,
never more than one per request, nothing after an error."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, strategies as st

from tests.harness import Supervise
from tests.test_fuzz_http import APPS, FUZZ, check, mutated


@pytest.fixture(scope="module")
def server() -> Any:
    sv = Supervise(["asgi_echo", "-w", "1", "--chdir", str(APPS), "--no-watch", "--limit-request-body", "64k",
                    "--header-timeout", "1", "--body-timeout", "1", "--keepalive-timeout", "1"])
    sv.ready()
    yield sv
    assert not sv.find("worker_exited"), "a worker died"
    assert not sv.find("app_exception"), "the echo app never fails"
    assert not sv.find("internal_error") and "Traceback" not in sv.stderr, sv.find("internal_error")
    sv.kill()


@FUZZ
@given(data=st.binary(max_size=2048))
def test_arbitrary_bytes(server: Supervise, data: bytes) -> None:
    check(server, data)


@FUZZ
@given(data=mutated())
def test_mutated_requests(server: Supervise, data: bytes) -> None:
    check(server, data)
