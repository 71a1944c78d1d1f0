from pathlib import Path

import pytest

from supervisor import settings
from supervisor.settings import ConfigError, resolve

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def test_configuration_doc_is_generated_from_the_settings():
    assert DOC.read_text() == settings.markdown(), (
        "docs/configuration.md is stale: run `python -m supervisor.settings > docs/configuration.md`")


def test_command_line_beats_environment_beats_default():
    assert resolve(["app"], {}).workers >= 1
    assert resolve(["app"], {"SUPERVISE_WORKERS": "3"}).workers == 3
    assert resolve(["app", "-w", "5"], {"SUPERVISE_WORKERS": "3"}).workers == 5
    assert resolve(["app"], {"CONSUL_HTTP_ADDR": "127.0.0.1:8500"}).consul == "127.0.0.1:8500"
    assert resolve(["app"], {"SUPERVISE_BIND": "127.0.0.1:1, unix:/tmp/x"}).bind == ("127.0.0.1:1", "unix:/tmp/x")


def test_units():
    c = resolve(["app", "--graceful-timeout", "250ms", "--limit-request-body", "10M", "--no-watch"], {})
    assert c.graceful_timeout == 0.25 and c.limit_request_body == 10 * 1024 * 1024 and c.no_watch is True


def test_invalid_values_name_the_flag_or_env_var():
    with pytest.raises(ConfigError, match="SUPERVISE_THREADS"):
        resolve(["app"], {"SUPERVISE_THREADS": "many"})
    with pytest.raises(ConfigError, match="--log-format"):
        resolve(["app", "--log-format", "xml"], {})
