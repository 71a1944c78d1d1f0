"""Fixtures for the end-to-end Docker tests (tests/docker/).

The session builds the image once with scripts/image.sh (engine, base, wheelhouse,
docker build: each step skipped when already done). A machine whose engine cannot
start fails these tests loudly; they are never skipped.
"""

from __future__ import annotations

import sys

import pytest

from tests.docker import helpers


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "docker: end-to-end tests in a real Docker engine")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Every test here needs the engine, except modules that say NEEDS_ENGINE = False (script
    # tests that run in `make test-fast` too).
    for item in items:
        module = getattr(item, "module", None)
        if "tests/docker/" in item.nodeid.replace("\\", "/") and getattr(module, "NEEDS_ENGINE", True):
            item.add_marker(pytest.mark.docker)


def terminal_line(config: pytest.Config):
    """A function that prints one line on the terminal at once, past pytest's output capture
    (session fixtures run with it on): long steps say what they do while they do it."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")

    def write(line: str) -> None:
        if reporter is None or capture is None:
            print(line, file=sys.__stderr__, flush=True)
            return
        with capture.global_and_fixture_disabled():
            reporter.write_line(line)
            reporter.flush()

    return write


@pytest.fixture(scope="session")
def image(pytestconfig: pytest.Config) -> str:
    """The supervise image, built (or found up to date) by scripts/image.sh build; its steps
    (engine, base image, wheelhouse, docker build) are printed live, each with its duration."""
    say = terminal_line(pytestconfig)
    say(f"[docker] scripts/image.sh build: engine, base image, wheelhouse, {helpers.IMAGE} "
        "(cold: about 2 minutes; each step below with its time)")
    try:
        seconds = helpers.build_image(on_line=lambda line: say(f"[docker]   {line}"))
    except helpers.BuildError as exc:
        pytest.fail(str(exc), pytrace=False)
    say(f"[docker] image {helpers.IMAGE} ready in {seconds:.1f} s")
    return helpers.IMAGE


@pytest.fixture(scope="session")
def client(image: str):
    return helpers.docker_client()


@pytest.fixture
def app_dir(tmp_path):
    """A private copy of images/example/app, to bind-mount and edit."""
    return helpers.copy_example_app(tmp_path)


@pytest.fixture
def start(client, image, app_dir, request):
    """Factory: start(env=..., healthcheck=..., entrypoint=...) -> helpers.Service.

    Every container started here is removed at teardown (force, with its anonymous volume)."""
    started: list[helpers.Service] = []

    def _start(**kwargs) -> helpers.Service:
        kwargs.setdefault("app_dir", app_dir)
        service = helpers.start_service(client, image, name_hint=request.node.name, **kwargs)
        started.append(service)
        return service

    yield _start
    for service in started:
        service.remove()
