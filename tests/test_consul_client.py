"""supervisor.consul against a real Consul agent (tests/consul_agent.py), plus its pure parts.

The helper process is exercised the way the master runs it: `helper_main` in a forked child,
talking newline-delimited JSON over a socketpair.  No fixed sleeps: every wait has a deadline.
"""

from __future__ import annotations

import http.server
import json
import os
import select
import signal
import socket
import threading
import time
import traceback
import urllib.parse
from dataclasses import asdict
from typing import Any, Iterator

import pytest

from supervisor import proto, settings
from supervisor.channel import Channel
from supervisor.consul.helper import helper_main
from supervisor.consul.spec import (
    ConsulError, ConsulSpec, KVContentError, default_service_name, go_duration, kv_env, parse_agent_address,
    service_registration,
)
from supervisor.consul.startup import fetch_kv_env as fetch_spec_kv_env
from tests.consul_agent import ConsulAgent, wait_until  # fixtures come from tests/conftest.py
from tests.harness import wait_exit


def fetch_kv_env(config: Any) -> dict[str, str]:
    return fetch_spec_kv_env(ConsulSpec.from_config(config))


def registration(config: Any, port: int | None, health_url: str | None) -> dict[str, Any]:
    return service_registration(ConsulSpec.from_config(config, port, health_url))

HOST = socket.gethostname()
TTL = 1.5  # short TTL: heartbeats every 0.5 s, the "alive" window is 0.75 s
ACL_HCL = 'acl {\n enabled = true\n default_policy = "deny"\n tokens { master = "root" }\n}'


def make_config(address: str | None, *args: str, app: str = "web.app:app") -> Any:
    argv = [app, *args]
    if address is not None:
        argv += ["--consul", address]
    return settings.resolve(argv, {})


def helper_config(agent: ConsulAgent | str, *args: str) -> Any:
    address = agent.addr if isinstance(agent, ConsulAgent) else agent
    return make_config(address, "--consul-ttl", str(TTL), "--consul-timeout", "2", *args)


# --------------------------------------------------------------------------- helper harness


MESSAGES = {"ready": proto.Register, "alive": proto.Alive, "note": proto.Note, "stop": proto.Withdraw}


class Helper:
    """`helper_main` in a forked child; the test plays the master."""

    def __init__(self, config: Any, bound_port: int | None = 8000, health_url: str | None = None) -> None:
        spec = ConsulSpec.from_config(config, bound_port, health_url)
        parent, child = socket.socketpair()
        pid = os.fork()
        if pid == 0:  # the helper process
            code = 0
            try:
                parent.close()
                helper_main(child, spec)
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        child.close()
        self.pid = pid
        self.chan = Channel(parent, queue_sends=False)
        self.events: list[dict[str, Any]] = []
        self._taken: set[int] = set()
        self._alive_stop: threading.Event | None = None
        self._lock = threading.Lock()
        registration = service_registration(spec)
        self.service_id, self.service = registration["ID"], registration["Name"]

    # ---------------------------------------------------------------- master -> helper

    def send(self, cmd: str, **fields: Any) -> None:
        with self._lock:
            if not self.chan.send(MESSAGES[cmd](**fields)):
                raise OSError("the helper is gone")

    def keep_alive(self, interval: float = TTL / 5) -> None:
        """A healthy master loop: `alive` every `interval` from a thread."""
        stop = self._alive_stop = threading.Event()

        def pump() -> None:
            while not stop.is_set():
                try:
                    self.send("alive")
                except OSError:
                    return
                stop.wait(interval)

        threading.Thread(target=pump, daemon=True).start()

    def stop_alive(self) -> None:
        if self._alive_stop is not None:
            self._alive_stop.set()

    # ---------------------------------------------------------------- helper -> master

    def _read(self, timeout: float) -> None:
        ready, _, _ = select.select([self.chan.sock], [], [], max(0.0, timeout))
        if not ready:
            return
        received = self.chan.receive()
        if self.chan.closed and not received:
            raise AssertionError("helper closed its socket")
        self.events.extend({"event": r.message.kind, **asdict(r.message)} for r in received)

    def next_event(self, name: str, timeout: float = 10.0) -> dict[str, Any]:
        """The next `name` event not yet returned (events are also kept in `self.events`)."""
        deadline = time.monotonic() + timeout
        while True:
            for i, event in enumerate(self.events):
                if i not in self._taken and event.get("event") == name:
                    self._taken.add(i)
                    return event
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {name!r} event within {timeout:g}s; events: {self.events}")
            self._read(left)

    def drain(self) -> list[dict[str, Any]]:
        """Read whatever is already buffered, without waiting."""
        self._read(0)
        return self.events

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == name]

    # ---------------------------------------------------------------- life cycle

    def close(self) -> None:
        self.stop_alive()
        try:
            self.chan.close()
        except OSError:
            pass

    def wait_exit(self, timeout: float) -> int | None:
        """The helper's exit code, or None when it outlived the timeout (then it is killed)."""
        return wait_exit(self.pid, timeout)

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


@pytest.fixture
def spawn() -> Iterator[Any]:
    helpers: list[Helper] = []

    def start(config: Any, bound_port: int | None = 8000, health_url: str | None = None) -> Helper:
        helper = Helper(config, bound_port, health_url)
        helpers.append(helper)
        return helper

    yield start
    for helper in helpers:
        helper.close()
        helper.kill()


def passing_ids(agent: ConsulAgent, service: str) -> list[str]:
    return [entry["Service"]["ID"] for entry in agent.passing(service)]


def check_of(agent: ConsulAgent, service_id: str) -> dict[str, Any] | None:
    status, checks = agent.request("GET", "/v1/agent/checks")
    assert status == 200
    return checks.get(f"service:{service_id}")


class Blackhole:
    """A TCP port that accepts connections (kernel backlog) and never answers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.addr = f"127.0.0.1:{self.sock.getsockname()[1]}"

    def close(self) -> None:
        self.sock.close()


class Slammer:
    """A TCP port that accepts and closes at once, counting the attempts and their times."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.addr = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.times: list[float] = []
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.times.append(time.monotonic())
            conn.close()

    def close(self) -> None:
        self.sock.close()


# =========================================================================== pure functions


@pytest.mark.parametrize(
    "text, expected",
    [
        ("127.0.0.1:8500", ("http", "127.0.0.1", 8500)),
        ("consul.service:18500", ("http", "consul.service", 18500)),
        ("http://10.0.0.1:8500", ("http", "10.0.0.1", 8500)),
        ("https://consul.local:8501", ("https", "consul.local", 8501)),
        ("HTTPS://consul.local", ("https", "consul.local", 8501)),
        ("localhost", ("http", "localhost", 8500)),
        ("[::1]:8500", ("http", "::1", 8500)),
        ("http://[fe80::1]:9", ("http", "fe80::1", 9)),
        ("http://h:8500/", ("http", "h", 8500)),
    ],
)
def test_parse_agent_address(text: str, expected: tuple[str, str, int]) -> None:
    assert parse_agent_address(text) == expected


@pytest.mark.parametrize("text", ["", "ftp://h:21", "h:notaport", "http://h:8500/v1", "h:99999", "http://:8500"])
def test_parse_agent_address_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_agent_address(text)


def test_go_duration() -> None:
    assert go_duration(10) == "10s"
    assert go_duration(60.0) == "60s"
    assert go_duration(0.25) == "250ms"
    assert go_duration(1.5) == "1500ms"


def test_default_service_name() -> None:
    assert default_service_name("web.app:application") == "web"
    assert default_service_name("hello") == "hello"
    assert default_service_name("pkg.sub.mod") == "pkg"


def test_registration_ttl_defaults() -> None:
    config = make_config("127.0.0.1:8500", app="shop.wsgi:app")
    payload = registration(config, 8000, None)
    assert payload == {
        "ID": f"shop-{HOST}-8000",
        "Name": "shop",
        "Tags": [],
        "Meta": {},
        "Port": 8000,
        "Check": {
            "CheckID": f"service:shop-{HOST}-8000",
            "Name": "supervise ttl check",
            "Notes": "heartbeat from the supervise master",
            "TTL": "10s",
            "Status": "passing",
            "DeregisterCriticalServiceAfter": "60s",
        },
    }
    assert "Address" not in payload  # the agent's own address for this node
    json.dumps(payload)


def test_registration_overrides_and_http_check() -> None:
    config = make_config(
        "127.0.0.1:8500",
        "--consul-service", "api", "--consul-service-id", "api-1", "--consul-tag", "v2",
        "--consul-tag", "blue", "--consul-meta", "team=core", "--consul-meta", "rev=abc",
        "--consul-address", "10.1.2.3", "--consul-port", "443", "--consul-check", "http",
        "--consul-check-interval", "3s", "--consul-timeout", "2", "--consul-deregister-after", "2m",
    )
    payload = registration(config, 8000, "http://10.1.2.3:9000/health")
    assert payload["ID"] == "api-1" and payload["Name"] == "api"
    assert payload["Tags"] == ["v2", "blue"] and payload["Meta"] == {"team": "core", "rev": "abc"}
    assert payload["Address"] == "10.1.2.3" and payload["Port"] == 443
    assert payload["Check"] == {
        "CheckID": "service:api-1",
        "Name": "supervise http check",
        "HTTP": "http://10.1.2.3:9000/health",
        "Method": "GET",
        "Interval": "3s",
        "Timeout": "2s",
        "Status": "passing",
        "DeregisterCriticalServiceAfter": "120s",
    }


def test_registration_id_uses_advertised_port_and_http_needs_health_url() -> None:
    config = make_config("127.0.0.1:8500", "--consul-port", "9999")
    assert registration(config, 8000, None)["ID"] == f"web-{HOST}-9999"
    with pytest.raises(ValueError, match="health"):
        registration(make_config("127.0.0.1:8500", "--consul-check", "http"), 8000, None)


def test_kv_env_pure() -> None:
    items = [
        {"Key": "cfg/", "Value": None},
        {"Key": "cfg/DB_URL", "Value": b"postgres://db/x"},
        {"Key": "cfg/EMPTY", "Value": None},
        {"Key": "cfg/UNICODE", "Value": "héllo".encode()},
        {"Key": "cfg/nested/", "Value": None},
        {"Key": "cfg/nested/DEEP", "Value": b"1"},
        {"Key": "cfg/A=B", "Value": b"1"},
    ]
    assert kv_env("cfg/", items) == {"DB_URL": "postgres://db/x", "EMPTY": "", "UNICODE": "héllo"}
    assert kv_env("cfg/", None) == {}
    with pytest.raises(KVContentError, match="UTF-8"):
        kv_env("cfg/", [{"Key": "cfg/BIN", "Value": b"\xff\xfe"}])


# =========================================================================== fetch_kv_env


@pytest.mark.consul
def test_fetch_kv_env_reads_keys_and_strips_prefix(consul_agent: ConsulAgent) -> None:
    consul_agent.kv_put("svc/web/DATABASE_URL", "postgres://db/web")
    consul_agent.kv_put("svc/web/GREETING", "grüezi")
    consul_agent.kv_put("svc/web/folder/", "")
    consul_agent.kv_put("svc/webby/OTHER", "not under the prefix")
    for prefix in ("svc/web", "svc/web/", "/svc/web"):
        env = fetch_kv_env(make_config(consul_agent.addr, "--consul-kv-prefix", prefix))
        assert env == {"DATABASE_URL": "postgres://db/web", "GREETING": "grüezi"}, prefix
    # A prefix with no keys is an empty environment, not an error.
    assert fetch_kv_env(make_config(consul_agent.addr, "--consul-kv-prefix", "nothing/here")) == {}


@pytest.mark.consul
def test_fetch_kv_env_raises_when_agent_down(consul_agent: ConsulAgent) -> None:
    config = make_config(consul_agent.addr, "--consul-kv-prefix", "svc/web", "--consul-timeout", "1")
    assert fetch_kv_env(config) == {}  # control: the same config works while the agent is up
    consul_agent.stop()
    started = time.monotonic()
    with pytest.raises(ConsulError) as info:
        fetch_kv_env(config)
    assert time.monotonic() - started < 1.5
    message = str(info.value)
    assert "\n" not in message and consul_agent.addr in message and "refused" in message.lower()


def test_fetch_kv_env_times_out_on_a_silent_agent() -> None:
    hole = Blackhole()
    try:
        config = make_config(hole.addr, "--consul-kv-prefix", "svc/web", "--consul-timeout", "300ms")
        started = time.monotonic()
        with pytest.raises(ConsulError, match="did not answer within 0.3s"):
            fetch_kv_env(config)
        assert time.monotonic() - started < 2.0
    finally:
        hole.close()


@pytest.mark.consul
def test_fetch_kv_env_acl_token(consul_binary: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    with ConsulAgent(consul_binary, str(tmp_path), hcl=(ACL_HCL,)) as agent:
        agent.token = "root"
        agent.kv_put("secret/API_KEY", "s3cr3t")
        good = make_config(agent.addr, "--consul-kv-prefix", "secret", "--consul-token", "root")
        assert fetch_kv_env(good) == {"API_KEY": "s3cr3t"}
        # py-consul would let CONSUL_HTTP_TOKEN override the explicit token; ours does not.
        monkeypatch.setenv("CONSUL_HTTP_TOKEN", "bogus")
        assert fetch_kv_env(good) == {"API_KEY": "s3cr3t"}
        bad = make_config(agent.addr, "--consul-kv-prefix", "secret", "--consul-token", "bogus")
        with pytest.raises(ConsulError, match="403|ACL not found|denied"):
            fetch_kv_env(bad)


# =========================================================================== helper: registration


@pytest.mark.consul
def test_ready_registers_passing_and_stop_deregisters(consul_agent: ConsulAgent, spawn: Any) -> None:
    helper = spawn(helper_config(consul_agent))
    # Negative control: a twin helper that gets everything but "ready" is never registered,
    # even after the first one was (so it had every chance to).
    twin = spawn(helper_config(consul_agent, "--consul-service-id", "web-twin"))
    for h in (helper, twin):
        h.keep_alive()
    helper.send("ready")
    assert helper.next_event("registered")["service_id"] == helper.service_id
    assert "web-twin" not in consul_agent.services() and not twin.drain()
    assert helper.service_id == f"web-{HOST}-8000"
    wait_until(lambda: passing_ids(consul_agent, "web") == [helper.service_id], 5, "instance passing")
    check = check_of(consul_agent, helper.service_id)
    assert check is not None and check["Status"] == "passing" and check["ServiceName"] == "web"

    helper.send("stop")
    stopped = helper.next_event("withdrawn", timeout=3)
    assert stopped == {"event": "withdrawn", "ok": True, "error": None}
    assert helper.service_id not in consul_agent.services()
    assert consul_agent.instances("web") == []
    assert not helper.named("consul_down")


@pytest.mark.consul
def test_heartbeats_keep_passing_and_lapse_without_alive(consul_agent: ConsulAgent, spawn: Any) -> None:
    helper = spawn(helper_config(consul_agent))
    helper.keep_alive()
    helper.send("ready")
    helper.next_event("registered")
    # With `alive` coming in, the check stays passing well past its TTL.
    deadline = time.monotonic() + 3 * TTL
    while time.monotonic() < deadline:
        check = check_of(consul_agent, helper.service_id)
        assert check is not None and check["Status"] == "passing", check
        helper._read(0.2)
    # Negative control: the master loop wedges (no more `alive`): heartbeats stop, the check lapses.
    helper.stop_alive()
    lapsed = wait_until(
        lambda: (c := check_of(consul_agent, helper.service_id)) and c["Status"] == "critical" and c,
        2 * TTL + 3, "the TTL check to go critical",
    )
    assert "TTL expired" in lapsed["Output"]
    assert passing_ids(consul_agent, "web") == []
    # The loop recovers: `alive` again, heartbeats resume at once.
    helper.keep_alive()
    wait_until(lambda: passing_ids(consul_agent, "web") == [helper.service_id], 3, "passing again")
    assert not helper.named("consul_down")


@pytest.mark.consul
def test_note_sets_output_and_stays_passing(consul_agent: ConsulAgent, spawn: Any) -> None:
    helper = spawn(helper_config(consul_agent))
    helper.keep_alive()
    helper.send("ready")
    helper.next_event("registered")
    helper.send("note", text="reload failed: SyntaxError in app.py; old generation serving")
    wait_until(lambda: (check_of(consul_agent, helper.service_id) or {}).get("Output", "").startswith("reload failed"),
               3, "the note in the check output")
    assert check_of(consul_agent, helper.service_id)["Status"] == "passing"
    assert passing_ids(consul_agent, "web") == [helper.service_id]
    helper.send("note", text="")
    wait_until(lambda: (check_of(consul_agent, helper.service_id) or {}).get("Output") == "", 3, "note cleared")


@pytest.mark.consul
def test_stop_maintenance_mode(consul_agent: ConsulAgent, spawn: Any) -> None:
    helper = spawn(helper_config(consul_agent, "--consul-on-stop", "maintenance"))
    helper.keep_alive()
    helper.send("ready")
    helper.next_event("registered")
    wait_until(lambda: passing_ids(consul_agent, "web"), 5, "instance passing")
    helper.send("stop")
    assert helper.next_event("withdrawn", timeout=3)["ok"] is True
    # Out of `?passing` at once, but still registered, with the maintenance check.
    assert passing_ids(consul_agent, "web") == []
    assert helper.service_id in consul_agent.services()
    check_ids = {c["CheckID"] for c in consul_agent.checks("web")}
    assert f"_service_maintenance:{helper.service_id}" in check_ids


@pytest.mark.consul
def test_stop_replies_when_consul_is_down(consul_agent: ConsulAgent, spawn: Any) -> None:
    helper = spawn(helper_config(consul_agent))
    helper.keep_alive()
    helper.send("ready")
    helper.next_event("registered")
    consul_agent.stop()
    started = time.monotonic()
    helper.send("stop")
    stopped = helper.next_event("withdrawn", timeout=3)
    assert time.monotonic() - started < 2  # consul_timeout
    assert stopped["ok"] is False and "refused" in stopped["error"].lower()


def test_stop_replies_within_consul_timeout_on_a_silent_agent(spawn: Any) -> None:
    hole = Blackhole()
    try:
        helper = spawn(helper_config(hole.addr, "--consul-timeout", "2"))
        helper.keep_alive()
        helper.send("ready")  # the registration call hangs until its timeout
        helper.send("stop")
        # One timeout (2 s) answers the stop; waiting out the registration and then a deregister
        # call in turn would take two (4 s): the deadline tells them apart with room for a busy
        # machine, without timing the answer.
        stopped = helper.next_event("withdrawn", timeout=3.5)
        assert stopped["ok"] is False and "within 2s" in stopped["error"]
    finally:
        hole.close()


@pytest.mark.consul
def test_stop_before_ready_does_not_touch_consul(consul_agent: ConsulAgent, spawn: Any) -> None:
    helper = spawn(helper_config(consul_agent))
    helper.send("stop")
    assert helper.next_event("withdrawn", timeout=3) == {"event": "withdrawn", "ok": True, "error": None}
    helper.send("ready")  # too late: a stopped helper never registers
    helper.send("alive")
    helper.close()
    assert helper.wait_exit(3) == 0
    assert consul_agent.services() == {}


# =========================================================================== helper: failures


@pytest.mark.consul
def test_agent_restart_reregisters(consul_agent: ConsulAgent, spawn: Any) -> None:
    helper = spawn(helper_config(consul_agent))
    helper.keep_alive()
    helper.send("ready")
    helper.next_event("registered")
    wait_until(lambda: passing_ids(consul_agent, "web") == [helper.service_id], 5, "instance passing")
    # Control: a service registered behind the helper's back is lost by the restart for good.
    status, _ = consul_agent.request("PUT", "/v1/agent/service/register", json.dumps({"Name": "control"}).encode())
    assert status == 200 and "control" in consul_agent.services()

    consul_agent.restart()  # all agent state gone

    assert helper.next_event("registered", timeout=10)["service_id"] == helper.service_id
    wait_until(lambda: passing_ids(consul_agent, "web") == [helper.service_id], 5, "passing after restart")
    assert "control" not in consul_agent.services()
    # Outage events come in pairs, never one per retry.
    helper.drain()
    assert len(helper.named("consul_down")) == len(helper.named("consul_up")) <= 1


@pytest.mark.consul
def test_agent_down_at_start_registers_when_it_comes_up(consul_agent: ConsulAgent, spawn: Any) -> None:
    consul_agent.stop()
    helper = spawn(helper_config(consul_agent))
    helper.keep_alive()
    helper.send("ready")
    down = helper.next_event("consul_down", timeout=5)
    assert "refused" in down["error"].lower() and "\n" not in down["error"]
    consul_agent.start()
    helper.next_event("registered", timeout=10)
    helper.next_event("consul_up", timeout=5)
    wait_until(lambda: passing_ids(consul_agent, "web") == [helper.service_id], 5, "instance passing")
    assert len(helper.named("consul_down")) == 1


def test_outage_reported_once_and_retries_back_off(spawn: Any) -> None:
    slam = Slammer()  # every connection is accepted and dropped
    try:
        helper = spawn(helper_config(slam.addr))
        helper.keep_alive()
        helper.send("ready")
        helper.next_event("consul_down", timeout=5)
        wait_until(lambda: len(slam.times) >= 5, 10, "five registration attempts")
        gaps = [b - a for a, b in zip(slam.times, slam.times[1:])]
        # 250 ms doubling: each wait at least about the one before, the fourth about 2 s.
        assert gaps[0] >= 0.2 and gaps[1] >= 0.45 and gaps[2] >= 0.9 and gaps[3] >= 1.8, gaps
        helper.drain()
        assert len(helper.named("consul_down")) == 1 and not helper.named("registered")
    finally:
        slam.close()


@pytest.mark.consul
def test_acl_denied_registration_reports_consul_down(consul_binary: str, tmp_path: Any, spawn: Any) -> None:
    with ConsulAgent(consul_binary, str(tmp_path), hcl=(ACL_HCL,)) as agent:
        helper = spawn(helper_config(agent))  # no token
        helper.keep_alive()
        helper.send("ready")
        down = helper.next_event("consul_down", timeout=5)
        assert "403" in down["error"]
        good = spawn(helper_config(agent, "--consul-token", "root", "--consul-service-id", "web-ok"))
        good.keep_alive()
        good.send(cmd="ready")
        assert good.next_event("registered")["service_id"] == "web-ok"


@pytest.mark.consul
def test_master_gone_helper_exits_promptly(consul_agent: ConsulAgent, spawn: Any) -> None:
    helper = spawn(helper_config(consul_agent, "--consul-kv-prefix", "svc/web"))
    helper.keep_alive()
    helper.send("ready")
    helper.next_event("registered")
    helper.close()  # EOF
    assert helper.wait_exit(2) == 0


# =========================================================================== helper: KV watch


@pytest.mark.consul
def test_kv_change_sends_event_with_new_env(consul_agent: ConsulAgent, spawn: Any) -> None:
    consul_agent.kv_put("svc/web/COLOR", "blue")
    helper = spawn(helper_config(consul_agent, "--consul-kv-prefix", "svc/web"))
    helper.keep_alive()
    # The master loaded {"COLOR": "blue"} at start and says so: no event for unchanged content.
    helper.send("ready", env={"COLOR": "blue"})
    helper.next_event("registered")

    consul_agent.kv_put("svc/web/COLOR", "blue")  # same content, new index: no event
    consul_agent.kv_put("svc/other/X", "1")  # outside the prefix: no event
    consul_agent.kv_put("svc/web/COLOR", "green")
    event = helper.next_event("kv", timeout=5)
    assert event["env"] == {"COLOR": "green"} and event["index"] > 0
    # Negative control for the two writes above: that was the first kv event.
    assert len(helper.named("kv")) == 1

    consul_agent.kv_put("svc/web/SIZE", "xl")
    assert helper.next_event("kv", timeout=5)["env"] == {"COLOR": "green", "SIZE": "xl"}
    consul_agent.kv_delete("svc/web", recurse=True)
    assert helper.next_event("kv", timeout=5)["env"] == {}


@pytest.mark.consul
def test_kv_first_read_is_sent_without_baseline(consul_agent: ConsulAgent, spawn: Any) -> None:
    consul_agent.kv_put("svc/web/COLOR", "blue")
    helper = spawn(helper_config(consul_agent, "--consul-kv-prefix", "svc/web"))
    helper.keep_alive()
    helper.send("ready")
    assert helper.next_event("kv", timeout=5)["env"] == {"COLOR": "blue"}


@pytest.mark.consul
def test_kv_watch_survives_agent_restart(consul_agent: ConsulAgent, spawn: Any) -> None:
    consul_agent.kv_put("svc/web/COLOR", "blue")
    helper = spawn(helper_config(consul_agent, "--consul-kv-prefix", "svc/web"))
    helper.keep_alive()
    helper.send("ready", env={"COLOR": "blue"})
    helper.next_event("registered")
    consul_agent.restart()  # KV gone, and the agent's index starts over (lower)
    assert helper.next_event("kv", timeout=10)["env"] == {}
    consul_agent.kv_put("svc/web/COLOR", "red")
    assert helper.next_event("kv", timeout=10)["env"] == {"COLOR": "red"}


@pytest.mark.consul
def test_no_kv_events_without_prefix(consul_agent: ConsulAgent, spawn: Any) -> None:
    consul_agent.kv_put("svc/web/COLOR", "blue")
    helper = spawn(helper_config(consul_agent))
    helper.keep_alive()
    helper.send("ready")
    helper.next_event("registered")
    helper.send("stop")
    helper.next_event("withdrawn")
    assert not helper.named("kv")


# =========================================================================== helper: http check


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802
        body = json.dumps({"status": "ok"}).encode()
        self.send_response(type(self).status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.consul
def test_http_check_registers_and_survives_agent_restart(consul_agent: ConsulAgent, spawn: Any) -> None:
    handler = type("Handler", (_Health,), {"status": 200})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    health_url = f"http://127.0.0.1:{server.server_address[1]}/health"
    try:
        helper = spawn(helper_config(consul_agent, "--consul-check", "http", "--consul-check-interval", "1s"),
                       health_url=health_url)
        helper.send("ready")
        helper.next_event("registered")
        check = wait_until(lambda: (c := check_of(consul_agent, helper.service_id)) and "HTTP GET" in c["Output"]
                           and c, 5, "the first HTTP check run")
        assert check["Status"] == "passing"
        # Control: the agent really polls the endpoint: a 503 turns the check critical.
        handler.status = 503
        wait_until(lambda: passing_ids(consul_agent, "web") == [], 5, "critical on 503")
        handler.status = 200
        wait_until(lambda: passing_ids(consul_agent, "web") == [helper.service_id], 5, "passing again")

        consul_agent.restart()
        helper.next_event("registered", timeout=10)
        wait_until(lambda: passing_ids(consul_agent, "web") == [helper.service_id], 5, "passing after restart")
    finally:
        server.shutdown()
        server.server_close()


# =========================================================================== KV watch rules (fake agent)


class FakeConsul:
    """A minimal agent that answers every request at once: KV reads (blocking or not) return
    `[]` with X-Consul-Index `index`; PUTs succeed.  Records KV requests as (time, params)."""

    def __init__(self) -> None:
        self.index = 5
        self.kv: list[tuple[float, dict[str, str]]] = []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _reply(self, body: bytes, index: int | None = None) -> None:
                self.send_response(200)
                if index is not None:
                    self.send_header("X-Consul-Index", str(index))
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802
                path, _, query = self.path.partition("?")
                if path.startswith("/v1/kv/"):
                    index = fake.index
                    fake.kv.append((time.monotonic(), dict(urllib.parse.parse_qsl(query, keep_blank_values=True))))
                    self._reply(b"[]", index)
                else:
                    self._reply(b"{}")

            def do_PUT(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self._reply(b"true")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.addr = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_kv_watch_rate_limited_and_never_blocks_on_index_zero(spawn: Any) -> None:
    fake = FakeConsul()  # every blocking query returns at once: the loop must pace itself
    try:
        helper = spawn(helper_config(fake.addr, "--consul-kv-prefix", "svc/web"))
        helper.keep_alive()
        helper.send("ready")
        wait_until(lambda: len(fake.kv) >= 8, 10, "four KV watch cycles")
        requests_ = list(fake.kv)
        assert "index" not in requests_[0][1]  # the first read does not block
        assert all(params.get("index") != "0" for _, params in requests_)
        # Each cycle: a plain read, then a blocking read on the index it returned.
        for (_, plain), (_, blocking) in zip(requests_[0::2], requests_[1::2]):
            assert "index" not in plain and "wait" not in plain
            assert blocking.get("index") == "5" and blocking.get("wait") == "60s"
        starts = [t for t, _ in requests_[0::2]]
        assert all(b - a >= 0.95 for a, b in zip(starts, starts[1:])), starts
        assert helper.next_event("kv")["env"] == {}  # the first read (no baseline given)
        helper.drain()
        assert len(helper.named("kv")) == 1  # content never changed after the first read
    finally:
        fake.close()


def test_kv_watch_resets_when_index_goes_backwards(spawn: Any) -> None:
    fake = FakeConsul()
    fake.index = 1000
    try:
        helper = spawn(helper_config(fake.addr, "--consul-kv-prefix", "svc/web"))
        helper.keep_alive()
        helper.send("ready")
        wait_until(lambda: any(p.get("index") == "1000" for _, p in fake.kv), 5, "a blocking read on 1000")
        fake.index = 7  # the agent's state was reset
        seen = len(fake.kv)
        wait_until(lambda: any(p.get("index") == "7" for _, p in fake.kv[seen:]), 5, "a blocking read on 7")
        first_7 = next(i for i, (_, p) in enumerate(fake.kv) if i >= seen and p.get("index") == "7")
        assert all(p.get("index") in (None, "7") for _, p in fake.kv[first_7:])
    finally:
        fake.close()
