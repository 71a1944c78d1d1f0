"""Fixtures for the fleet tests (tests/fleet/): a whole fleet in the real Docker engine.

One fleet per module (scripts/fleet.sh up, with its own name, work dir, network and
loopback ports chosen by Docker, so it never meets `make fleet-demo`), removed at the end (scripts/fleet.sh
down).  Fleets left behind by a test session that died are removed first (their containers
carry the owner's pid).  Every test here is marked `fleet` (and `docker`, `consul` and
`haproxy`, so the existing `-m "not docker ..."` selections leave them out).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.fleet.load import LbLoad, Watcher
from tests.harness import wait_until

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"
sys.path.insert(0, str(SCRIPTS / "fleet"))
import fleetlib  # noqa: E402

_spec = importlib.util.spec_from_file_location("fleet_tool", SCRIPTS / "fleet" / "fleet.py")
fleet_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fleet_tool)

FIGURES: dict[str, Any] = {}  # measured figures, printed at the end of the session


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/fleet/" in item.nodeid.replace("\\", "/"):
            for marker in ("fleet", "docker", "consul", "haproxy"):
                item.add_marker(getattr(pytest.mark, marker))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES:
        terminalreporter.section("fleet figures")
        for name, value in FIGURES.items():
            terminalreporter.write_line(f"{name}: {json.dumps(value, sort_keys=True)}")
        out = os.environ.get("FLEET_FIGURES")
        if out:
            Path(out).write_text(json.dumps(FIGURES, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- helpers


def remove_orphaned_fleets() -> None:
    """Fleets whose owning test process is gone (a killed session) are removed."""
    out = subprocess.run(["docker", "ps", "-a", "--filter", "label=supervise.fleet.owner-pid", "--format",
                          '{{.Label "supervise.fleet"}} {{.Label "supervise.fleet.owner-pid"}}'],
                         capture_output=True, text=True).stdout
    for fleet, pid in {tuple(line.split()) for line in out.splitlines() if len(line.split()) == 2}:
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            subprocess.run([str(SCRIPTS / "fleet.sh"), "--fleet", fleet, "down"], capture_output=True, timeout=300)
        except (PermissionError, ValueError):
            pass


def parse_ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


@dataclass
class Fleet:
    name: str
    home: Path
    inv: fleetlib.Inventory
    env: dict[str, str]
    extras: list[str] = field(default_factory=list)

    # -------------------------------------------------------------- commands
    def run(self, *cmd: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), capture_output=True, text=True, env=self.env, timeout=timeout,
                              cwd=REPO, stdin=subprocess.DEVNULL)

    def deploy(self, *args: str, dc: str = "prod", timeout: float = 300) -> tuple[int, dict[str, Any], str]:
        """scripts/deploy --fleet NAME --dc DC --json ARGS: (exit status, JSON summary, stderr)."""
        proc = self.run(str(SCRIPTS / "deploy"), "--fleet", self.name, "--dc", dc, "--json", *args, timeout=timeout)
        lines = proc.stdout.strip().splitlines()
        summary = json.loads(lines[-1]) if lines else {}
        return proc.returncode, summary, proc.stderr

    def fleet(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return self.run(str(SCRIPTS / "fleet.sh"), "--fleet", self.name, "--home", str(self.home), *args,
                        timeout=timeout)

    def reload_inventory(self) -> None:
        self.inv = fleetlib.Inventory.load(fleetlib.Inventory.path_for(self.name, self.home))

    # -------------------------------------------------------------- views
    def dc(self, name: str = "prod") -> fleetlib.Datacenter:
        return self.inv.dc(name)

    def instance(self, n: int, dc: str = "prod") -> fleetlib.Instance:
        return next(i for i in self.dc(dc).instances if i.vm == f"vm{n}")

    def load(self, dc: str = "prod", **kwargs: Any) -> LbLoad:
        port = int(self.dc(dc).lb.rsplit(":", 1)[1])
        return LbLoad(port, **kwargs)

    def watcher(self, dc: str = "prod") -> Watcher:
        d = self.dc(dc)
        lb_ip = d.lb_api.split(":")[0]
        return Watcher(fleetlib.split_hostport(d.dns), f"{self.inv.service}.service.consul",
                       lambda: fleet_tool.lb_servers(lb_ip), fleetlib.srv_lookup)

    def passing(self, dc: str = "prod") -> set[str]:
        return fleetlib.passing_ids(self.dc(dc).consul_http, self.inv.service)

    def dns(self, name: str | None = None, dc: str = "prod") -> set[str]:
        host, port = fleetlib.split_hostport(self.dc(dc).dns)
        return {r.ip for r in fleetlib.srv_lookup(host, port, name or f"{self.inv.service}.service.consul")}

    def lb_ips(self, dc: str = "prod") -> set[str]:
        return set(fleet_tool.lb_servers(self.dc(dc).lb_api.split(":")[0]))

    def whoami(self, ip: str) -> dict[str, Any]:
        status, body = fleetlib.http_json(f"http://{ip}:8000/whoami", 5)
        assert status == 200, (status, body)
        return body

    def health(self, inst: fleetlib.Instance) -> dict[str, Any]:
        return fleetlib.health(inst.health)[1]

    def events(self, container: str) -> list[dict[str, Any]]:
        """The JSON events of a container's log, with `_ts` (epoch seconds) from their timestamp."""
        proc = subprocess.run(["docker", "logs", container], capture_output=True, text=True)
        out = []
        for line in (proc.stdout + proc.stderr).splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                if "timestamp" in event:
                    event["_ts"] = parse_ts(event["timestamp"])
                out.append(event)
        return out

    def wait_serving(self, inst: fleetlib.Instance, timeout: float = 60) -> None:
        """Passing in Consul, in Consul DNS and in HAProxy's servers."""
        wait_until(lambda: inst.service_id in self.passing(inst.dc), timeout, f"{inst.name} passing in Consul")
        wait_until(lambda: inst.ip in self.dns(dc=inst.dc), timeout, f"{inst.name} in Consul DNS")
        wait_until(lambda: inst.ip in self.lb_ips(inst.dc), timeout, f"{inst.name} in HAProxy")

    def wait_all_serving(self, dc: str = "prod", timeout: float = 60) -> None:
        for inst in self.dc(dc).instances:
            self.wait_serving(inst, timeout)

    # -------------------------------------------------------------- extra containers
    def start_extra(self, label: str, ip: str, env: dict[str, str], dc: str = "prod") -> str:
        """One more supervise container on the fleet network (a control), removed at teardown."""
        name = f"{self.name}-{dc}-x-{label}"
        extra = ["-v", f"{self.instance(1, dc).code_dir}:/srv/code:ro"]
        for key, value in env.items():
            extra += ["-e", f"{key}={value}"]
        fleet_tool.run(self.inv, name, "extra", ip, fleet_tool.APP_IMAGE, [fleet_tool.APP], hostname=label,
                       extra=extra)
        self.extras.append(name)
        return name

    def remove_extra(self, name: str) -> None:
        subprocess.run(["docker", "rm", "-f", "-v", name], capture_output=True)
        if name in self.extras:
            self.extras.remove(name)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    remove_orphaned_fleets()
    name = f"ft{os.getpid()}"
    home = tmp_path_factory.mktemp("fleet")
    env = {**os.environ, "FLEET_HOME": str(home), "FLEET_OWNER_PID": str(os.getpid())}
    env.pop("FLEET", None)
    t0 = time.monotonic()
    proc = subprocess.run([str(SCRIPTS / "fleet.sh"), "--fleet", name, "--home", str(home), "up", "--port", "0"],
                          capture_output=True, text=True, env=env, timeout=1200, cwd=REPO)
    FIGURES["fleet_up_seconds"] = round(time.monotonic() - t0, 1)
    f = None
    try:
        if proc.returncode != 0:
            pytest.fail(f"scripts/fleet.sh up failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}",
                        pytrace=False)
        print(proc.stdout)
        f = Fleet(name, home, fleetlib.Inventory.load(fleetlib.Inventory.path_for(name, home)), env)
        yield f
    finally:
        if f is not None:
            for extra in list(f.extras):
                f.remove_extra(extra)
        subprocess.run([str(SCRIPTS / "fleet.sh"), "--fleet", name, "--home", str(home), "down"],
                       capture_output=True, text=True, env=env, timeout=300)
