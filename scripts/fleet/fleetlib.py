"""What scripts/fleet/fleet.py (the demo fleet) and scripts/deploy (the deploy tool) share.

Standard library only: both run with the machine's python3, outside the project's venv.

- `sh`/`docker`: run a command, fail with its stderr.
- `Inventory`: the JSON file that lists a fleet's datacenters and instances (written by
  `fleet.py up`, read by `deploy`; a team can write one by hand for its own VMs).
- `Releases`: the release directories of one instance and the atomic `current` swap.
- `health`, `consul_get`, `kv_put`, `passing_ids`: the HTTP the tools need.
- `srv_lookup`: a tiny DNS client (SRV plus the A records Consul adds), to see what a load
  balancer sees without `dig`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import struct
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

REPO = Path(__file__).resolve().parents[2]
FLEET_HOME = Path(os.environ.get("FLEET_HOME", "/var/tmp/supervise-fleet"))
DEFAULT_FLEET = os.environ.get("FLEET", "fleet")


class Failure(Exception):
    """An error the tools report in one line (exit 1), without a traceback."""


# --------------------------------------------------------------------------- commands


def sh(*cmd: str, check: bool = True, timeout: float = 120, quiet: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise Failure(f"`{' '.join(cmd)}` exited {proc.returncode}: " + " / ".join(detail))
    return proc


def docker(*args: str, check: bool = True, timeout: float = 120) -> str:
    return sh("docker", *args, check=check, timeout=timeout).stdout.strip()


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll until `predicate` returns something truthy (exceptions count as "not yet", except a
    `Failure`, which ends the wait at once)."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
            last = None
        except Failure:  # a definite answer: no point in waiting
            raise
        except Exception as exc:  # noqa: BLE001 - not yet
            last = exc
        if time.monotonic() >= deadline:
            raise Failure(f"timed out after {timeout:g}s waiting for {what}" + (f" (last error: {last})" if last else ""))
        time.sleep(interval)  # the polling interval of a deadline loop


# --------------------------------------------------------------------------- HTTP


def http_json(url: str, timeout: float = 3.0, method: str = "GET", body: bytes | None = None) -> tuple[int, Any]:
    """(status, decoded JSON or text); HTTP errors are returned, not raised."""
    req = urllib.request.Request(url, data=body, method=method)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy
    try:
        with opener.open(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    text = raw.decode("utf-8", "replace")
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def health(url: str, timeout: float = 3.0) -> tuple[int, dict[str, Any]]:
    """GET /health of a supervise instance: (status, JSON body)."""
    status, body = http_json(url, timeout)
    if not isinstance(body, dict):
        raise Failure(f"{url}: not a supervise health answer: {str(body)[:200]}")
    return status, body


def consul_get(base: str, path: str, timeout: float = 5.0) -> Any:
    status, body = http_json(base.rstrip("/") + path, timeout)
    if status != 200:
        raise Failure(f"GET {base}{path}: {status} {str(body)[:200]}")
    return body


def kv_put(base: str, key: str, value: str, dc: str | None = None) -> None:
    query = f"?dc={urllib.parse.quote(dc)}" if dc else ""
    status, body = http_json(f"{base.rstrip('/')}/v1/kv/{urllib.parse.quote(key)}{query}", method="PUT",
                             body=value.encode())
    if status != 200 or body is not True:
        raise Failure(f"PUT /v1/kv/{key}: {status} {body}")


def kv_delete(base: str, key: str, dc: str | None = None) -> None:
    query = f"?dc={urllib.parse.quote(dc)}" if dc else ""
    status, body = http_json(f"{base.rstrip('/')}/v1/kv/{urllib.parse.quote(key)}{query}", method="DELETE")
    if status != 200:
        raise Failure(f"DELETE /v1/kv/{key}: {status} {body}")


def kv_get(base: str, key: str, dc: str | None = None) -> str | None:
    import base64

    query = f"?dc={urllib.parse.quote(dc)}" if dc else ""
    status, body = http_json(f"{base.rstrip('/')}/v1/kv/{urllib.parse.quote(key)}{query}")
    if status == 404:
        return None
    if status != 200:
        raise Failure(f"GET /v1/kv/{key}: {status} {body}")
    value = body[0]["Value"]
    return None if value is None else base64.b64decode(value).decode()


def service_health(base: str, service: str, passing: bool = False) -> list[dict[str, Any]]:
    """GET /v1/health/service/NAME[?passing]: one entry per instance with its node and checks."""
    return consul_get(base, f"/v1/health/service/{urllib.parse.quote(service)}" + ("?passing" if passing else ""))


def passing_ids(base: str, service: str) -> set[str]:
    return {entry["Service"]["ID"] for entry in service_health(base, service, passing=True)}


# --------------------------------------------------------------------------- DNS


def _qname(name: str) -> bytes:
    out = b""
    for label in name.rstrip(".").split("."):
        out += bytes([len(label)]) + label.encode()
    return out + b"\0"


def _read_name(msg: bytes, offset: int) -> tuple[str, int]:
    """A (possibly compressed) domain name at `offset`: (name, offset after it)."""
    labels: list[str] = []
    end = None
    for _ in range(128):
        length = msg[offset]
        if length & 0xC0 == 0xC0:
            if end is None:
                end = offset + 2
            offset = ((length & 0x3F) << 8) | msg[offset + 1]
            continue
        if length == 0:
            return ".".join(labels) + ".", end if end is not None else offset + 1
        labels.append(msg[offset + 1:offset + 1 + length].decode("ascii", "replace"))
        offset += 1 + length
    raise ValueError("DNS name loop")


@dataclass(frozen=True)
class Srv:
    priority: int
    weight: int
    port: int
    target: str
    ip: str | None  # from the additional section (Consul sends the A record along)


def srv_lookup(server: str, port: int, name: str, timeout: float = 1.0) -> list[Srv]:
    """Ask `server:port` (UDP, EDNS0 4096) for the SRV records of `name`.  An NXDOMAIN or an empty
    answer is []; a timeout or a malformed answer raises."""
    qid = random.randrange(1 << 16)
    header = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 1)
    question = _qname(name) + struct.pack(">HH", 33, 1)
    opt = b"\0" + struct.pack(">HHIH", 41, 4096, 0, 0)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(header + question + opt, (server, port))
        while True:
            msg, _ = sock.recvfrom(65535)
            if len(msg) >= 12 and struct.unpack(">H", msg[:2])[0] == qid:
                break
    _, flags, qd, an, ns, ar = struct.unpack(">HHHHHH", msg[:12])
    rcode = flags & 0xF
    if rcode == 3:
        return []
    if rcode != 0:
        raise ValueError(f"DNS rcode {rcode} for {name}")
    offset = 12
    for _ in range(qd):
        _, offset = _read_name(msg, offset)
        offset += 4
    records = []
    for _ in range(an + ns + ar):
        rname, offset = _read_name(msg, offset)
        rtype, _rclass, _ttl, rdlen = struct.unpack(">HHIH", msg[offset:offset + 10])
        offset += 10
        rdata_at = offset
        offset += rdlen
        records.append((rname, rtype, rdata_at, rdlen))
    addresses = {r[0]: socket.inet_ntoa(msg[r[2]:r[2] + 4]) for r in records if r[1] == 1 and r[3] == 4}
    out = []
    for rname, rtype, at, _ in records[:an]:
        if rtype != 33:
            continue
        prio, weight, srv_port = struct.unpack(">HHH", msg[at:at + 6])
        target, _ = _read_name(msg, at + 6)
        out.append(Srv(prio, weight, srv_port, target, addresses.get(target)))
    return out


# --------------------------------------------------------------------------- inventory


@dataclass
class Instance:
    """One supervise instance (one container) and everything a deploy needs to know about it."""

    name: str            # e.g. web-vm1: also its Consul service ID
    dc: str
    vm: str              # the simulated VM (its Consul agent's node name)
    container: str       # docker container name (docker kill -s HUP CONTAINER)
    ip: str
    code_dir: str        # host directory mounted on /srv/code: releases/<id>/ and the `current` symlink
    health: str          # http://IP:8001/health
    service_id: str
    agent: str = ""      # the VM's Consul agent container
    agent_ip: str = ""
    docker: list[str] = field(default_factory=lambda: ["docker"])  # e.g. ["docker", "-H", "ssh://vm1"]

    def kill(self, signal: str) -> None:
        sh(*self.docker, "kill", "-s", signal, self.container)


@dataclass
class Datacenter:
    name: str
    consul_http: str     # a Consul agent of this DC (the server): http://IP:8500
    dns: str             # IP:PORT of its DNS
    lb: str = ""         # the load balancer's URL on the host
    stats: str = ""      # HAProxy's stats page
    server: str = ""     # container names, for the runbook's commands
    lb_container: str = ""
    lb_api: str = ""     # HAProxy's runtime API (IP:PORT on the fleet network)
    instances: list[Instance] = field(default_factory=list)


@dataclass
class Inventory:
    fleet: str
    service: str = "web"
    kv_prefix: str = "web/config/"
    network: str = ""
    subnet: str = ""
    work: str = ""
    dcs: dict[str, Datacenter] = field(default_factory=dict)

    @staticmethod
    def path_for(fleet: str, home: Path | None = None) -> Path:
        return (home or FLEET_HOME) / fleet / "inventory.json"

    @classmethod
    def load(cls, path: Path) -> "Inventory":
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise Failure(f"no inventory at {path}: is the fleet up? (scripts/fleet.sh up)") from None
        dcs = {}
        for name, dc in data.pop("dcs", {}).items():
            instances = [Instance(**i) for i in dc.pop("instances", [])]
            dcs[name] = Datacenter(**dc, instances=instances)
        return cls(**data, dcs=dcs)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        os.replace(tmp, path)

    def dc(self, name: str) -> Datacenter:
        if name not in self.dcs:
            raise Failure(f"no datacenter {name!r} in the inventory (have: {', '.join(self.dcs)})")
        return self.dcs[name]


# --------------------------------------------------------------------------- releases


def release_id(src: Path) -> str:
    """A release id from the content: the same code gives the same id."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(p for p in src.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(str(path.relative_to(src)).encode() + b"\0" + path.read_bytes() + b"\0")
    return "r-" + digest.hexdigest()[:10]


class Releases:
    """CODE_DIR/releases/<id>/ and CODE_DIR/current -> releases/<id> (relative, so it resolves
    the same inside the container, where CODE_DIR is mounted on /srv/code)."""

    def __init__(self, code_dir: str | Path) -> None:
        self.root = Path(code_dir)
        self.releases = self.root / "releases"
        self.current_link = self.root / "current"

    def current(self) -> str | None:
        try:
            return Path(os.readlink(self.current_link)).name
        except FileNotFoundError:
            return None

    def has(self, rid: str) -> bool:
        return (self.releases / rid).is_dir()

    def stage(self, src: Path, rid: str) -> bool:
        """Copy `src` to releases/<rid> (aside first, then one rename); False if already there."""
        target = self.releases / rid
        if target.is_dir():
            return False
        self.releases.mkdir(parents=True, exist_ok=True)
        tmp = self.releases / f".{rid}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"))
        # The container runs as uid 10001: everything readable, nothing writable by it.
        for path in [tmp, *tmp.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        os.rename(tmp, target)
        return True

    def switch(self, rid: str) -> str | None:
        """Point `current` at releases/<rid> atomically (symlink aside + rename(2)); returns
        the release it pointed at before."""
        if not self.has(rid):
            raise Failure(f"{self.releases / rid} does not exist")
        before = self.current()
        tmp = self.root / f".current.{os.getpid()}.tmp"
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        os.symlink(f"releases/{rid}", tmp)
        os.replace(tmp, self.current_link)
        return before

    def listing(self) -> list[str]:
        if not self.releases.is_dir():
            return []
        dirs = [p for p in self.releases.iterdir() if p.is_dir() and not p.name.startswith(".")]
        return [p.name for p in sorted(dirs, key=lambda p: p.stat().st_mtime)]


# --------------------------------------------------------------------------- status


def instance_status(inst: Instance, passing: set[str] | None) -> dict[str, Any]:
    row: dict[str, Any] = {"instance": inst.name, "container": inst.container, "ip": inst.ip,
                           "release": Releases(inst.code_dir).current()}
    try:
        status, body = health(inst.health, timeout=1.5)
        last = body.get("last_reload") or {}
        row.update(health=status, state=body.get("status"), generation=body.get("generation"),
                   last_reload=f"g{last.get('generation')} {last.get('state')}" if last else "-")
        if last.get("error"):
            row["error"] = last["error"]
    except Exception as exc:  # noqa: BLE001 - shown in the table
        row.update(health="down", state=type(exc).__name__, generation=None, last_reload="-")
    row["consul"] = "?" if passing is None else ("passing" if inst.service_id in passing else "not passing")
    return row


def status_rows(inv: Inventory, dcs: Iterable[str] | None = None) -> list[dict[str, Any]]:
    rows = []
    for name in dcs or inv.dcs:
        dc = inv.dc(name)
        try:
            passing = passing_ids(dc.consul_http, inv.service)
        except Exception:  # noqa: BLE001
            passing = None
        try:
            in_dns = {r.ip for r in srv_lookup(*split_hostport(dc.dns), f"{inv.service}.service.consul")}
        except Exception:  # noqa: BLE001
            in_dns = None
        for inst in dc.instances:
            row = {"dc": name, **instance_status(inst, passing)}
            row["dns"] = "?" if in_dns is None else ("yes" if inst.ip in in_dns else "no")
            rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    cells = [[str(r.get(c, "") if r.get(c) is not None else "-") for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def split_hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host, int(port)
