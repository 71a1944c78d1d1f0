from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.harness import Supervise, write_app


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    code = tmp_path / "code"
    write_app(code, "1")
    return code


@pytest.fixture
def supervise() -> Iterator[Callable[..., Supervise]]:
    """Factory: start supervise processes; every one is stopped (then killed) at teardown."""
    started: list[Supervise] = []

    def start(*args: str, **kwargs: Any) -> Supervise:
        proc = Supervise(args, **kwargs)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()


from tests.consul_agent import consul_agent, consul_binary  # noqa: E402,F401  (fixtures)
