#!/usr/bin/env python3
"""A fleet of supervise instances behind Consul DNS and HAProxy, in the local Docker engine.

    scripts/fleet.sh up [--dcs prod,dev] [--vms 3] [--port 8090]   build the images, start it all, print how to use it
    scripts/fleet.sh status                                         one line per instance: release, generation, Consul, DNS
    scripts/fleet.sh info                                           the URLs and commands again
    scripts/fleet.sh add-vm [--dc prod]                             scale out: one more VM (Consul agent + instance)
    scripts/fleet.sh down                                           remove containers, network, volumes and the work dir
    scripts/fleet.sh build                                          only the images

Per datacenter (prod, and dev unless --dcs prod): a Consul server; per simulated VM, a
Consul client agent and one supervise instance that registers with that agent; HAProxy,
which finds the instances through the server's DNS (SRV) and is published on a loopback
port.  Everything is on one user-defined network with fixed addresses, and labelled
supervise.fleet=NAME.  Docs: docs/fleet.md.

Environment: FLEET (name, default `fleet`), FLEET_HOME (work dirs, default
/var/tmp/supervise-fleet), FLEET_PORT (first loopback port, default 8090), FLEET_SUBNET
(a /24 for the network; default: the first free 10.213.X.0/24), SUPERVISE_IMAGE.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import signal
import shutil
import socket
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fleetlib import (  # noqa: E402
    DEFAULT_FLEET, FLEET_HOME, REPO, Datacenter, Failure, Instance, Inventory, Releases, docker, format_table,
    http_json, kv_get, kv_put, passing_ids, release_id, sh, status_rows, wait_for,
)

APP_IMAGE = os.environ.get("SUPERVISE_IMAGE", "supervise:latest")
CONSUL_IMAGE = os.environ.get("FLEET_CONSUL_IMAGE", "supervise-fleet/consul:1.8.7")
HAPROXY_IMAGE = os.environ.get("FLEET_HAPROXY_IMAGE", "supervise-fleet/haproxy:2.6")
BASE_IMAGE = os.environ.get("SUPERVISE_BASE", "localbase/python:bookworm")
CACHE = Path(os.environ.get("SUPERVISE_CACHE", "/var/cache/supervise"))
LABEL = "supervise.fleet"
CONSUL_TMPFS = "/consul/data:rw,uid=10100,mode=0700"  # owned by the image's consul user
SERVICE = "web"
KV_PREFIX = "web/config/"
APP = "fleetapp:application"
DC_ORDER = ("prod", "dev", "test", "stage")

# Settings of every instance (docs/fleet.md explains each choice).
CONSUL_TTL = "5s"
DEREGISTER_AFTER = "1m"
DRAIN_DELAY = "2s"          # > HAProxy's DNS refresh (`timeout resolve 1s`) + Consul's propagation
GRACEFUL_TIMEOUT = "7s"     # + drain delay < docker stop's 10 s
WORKERS = "2"


def say(msg: str) -> None:
    print(f"fleet: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- addresses


def dc_base(dc: str) -> int:
    index = DC_ORDER.index(dc) if dc in DC_ORDER else 2
    return 10 + 100 * index if index < 2 else 210  # prod .10-.109, dev .110-.209, anything else .210-


def address(subnet: str, dc: str, role: str, n: int = 0) -> str:
    """Fixed addresses: server B, load balancer B+1, extras B+2..B+9, VM n's agent B+10+n,
    its instance B+50+n (n <= 39)."""
    offset = {"server": 0, "lb": 1, "extra": 2, "agent": 10, "web": 50}[role] + n
    net = ipaddress.ip_network(subnet)
    return str(net.network_address + dc_base(dc) + offset)


def names(fleet: str, dc: str) -> dict[str, str]:
    return {"server": f"{fleet}-{dc}-consul", "lb": f"{fleet}-{dc}-lb"}


def vm_names(fleet: str, dc: str, n: int) -> dict[str, str]:
    return {"agent": f"{fleet}-{dc}-vm{n}", "web": f"{fleet}-{dc}-web{n}", "vm": f"vm{n}",
            "instance": f"{SERVICE}-{dc}-vm{n}"}


def ports(base_port: int, dcs: list[str]) -> dict[str, tuple[int, int]]:
    """Loopback ports per DC: (load balancer, stats page); all 0 (Docker chooses) if base_port is 0."""
    if not base_port:
        return {dc: (0, 0) for dc in dcs}
    return {dc: (base_port + 2 * i, base_port + 2 * i + 1) for i, dc in enumerate(dcs)}


def create_network(fleet: str) -> tuple[str, str]:
    """A /24 that overlaps no route of this machine and no Docker network, and create the
    fleet's network on it (Docker refuses overlaps with its own networks)."""
    wanted = os.environ.get("FLEET_SUBNET")
    taken = []
    with open("/proc/net/route") as routes:
        for line in list(routes)[1:]:
            fields = line.split()
            dest, mask = (socket.inet_ntoa(struct.pack("<I", int(fields[i], 16))) for i in (1, 7))
            if mask != "0.0.0.0":
                taken.append(ipaddress.ip_network(f"{dest}/{mask}", strict=False))
    for net_id in docker("network", "ls", "-q").split():
        for cfg in json.loads(docker("network", "inspect", "-f", "{{json .IPAM.Config}}", net_id) or "null") or []:
            if cfg.get("Subnet") and ":" not in cfg["Subnet"]:
                taken.append(ipaddress.ip_network(cfg["Subnet"], strict=False))
    candidates = [wanted] if wanted else [f"10.213.{i}.0/24" for i in range(256)]
    for cand in candidates:
        net = ipaddress.ip_network(cand)
        if any(net.overlaps(t) for t in taken):
            continue
        name = f"{fleet}-net-{net.network_address.packed[2]}"
        proc = sh("docker", "network", "create", "--driver", "bridge", "--subnet", cand,
                  "--label", f"{LABEL}={fleet}", name, check=False)
        if proc.returncode == 0:
            return name, cand
    raise Failure("no free /24 for the fleet network (set FLEET_SUBNET)")


# --------------------------------------------------------------------------- images


def sync_file(src: Path, dst: Path) -> None:
    if not dst.exists() or dst.read_bytes() != src.read_bytes():
        shutil.copyfile(src, dst)
        dst.chmod(src.stat().st_mode & 0o777)


def build() -> None:
    t0 = time.monotonic()
    say(f"building {APP_IMAGE} (scripts/image.sh build)")
    proc = sh("bash", str(REPO / "scripts" / "image.sh"), "build", check=False, timeout=1200)
    if proc.returncode != 0:
        raise Failure("scripts/image.sh build failed:\n" + proc.stderr[-3000:])
    consul = sh("bash", str(REPO / "scripts" / "fetch-consul.sh"), timeout=900).stdout.strip().splitlines()[-1]
    ctx = CACHE / "fleet" / "consul-context"
    ctx.mkdir(parents=True, exist_ok=True)
    sync_file(REPO / "images" / "fleet" / "consul" / "Dockerfile", ctx / "Dockerfile")
    sync_file(Path(consul), ctx / "consul")
    for image, context in ((CONSUL_IMAGE, ctx), (HAPROXY_IMAGE, REPO / "images" / "fleet" / "haproxy")):
        previous = docker("image", "inspect", "-f", "{{.Id}}", image, check=False)
        say(f"building {image}")
        proc = sh("docker", "build", "--build-arg", f"BASE={BASE_IMAGE}", "-t", image, str(context),
                  check=False, timeout=900)
        if proc.returncode != 0:
            raise Failure(f"docker build of {image} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        if previous and previous != docker("image", "inspect", "-f", "{{.Id}}", image):
            docker("rmi", previous, check=False)  # our own superseded image (kept while a container uses it)
    say(f"images ready in {time.monotonic() - t0:.1f} s")


# --------------------------------------------------------------------------- containers


def run(inv: Inventory, name: str, role: str, ip: str, image: str, args: list[str], *, hostname: str,
        extra: list[str] = ()) -> None:
    fleet, network = inv.fleet, inv.network
    owner = os.environ.get("FLEET_OWNER_PID")
    labels = ["--label", f"{LABEL}={fleet}", "--label", f"{LABEL}.role={role}"]
    if owner:
        labels += ["--label", f"{LABEL}.owner-pid={owner}"]
    docker("run", "-d", "--name", name, "--hostname", hostname, "--network", network, "--ip", ip,
           *labels, *extra, image, *args)


def consul_args(dc: str, node: str, ip: str) -> list[str]:
    return [f"-datacenter={dc}", f"-node={node}", f"-bind={ip}", f"-advertise={ip}", "-client=0.0.0.0",
            "-data-dir=/consul/data", "-grpc-port=-1", "-hcl", "disable_update_check = true"]


def start_server(inv: Inventory, dc: str, wan_peers: list[str]) -> None:
    ip = address(inv.subnet, dc, "server")
    args = ["-server", "-bootstrap-expect=1", *consul_args(dc, f"{dc}-consul", ip),
            "-hcl", "performance { raft_multiplier = 1 }"]
    for peer in wan_peers:
        args += [f"-retry-join-wan={peer}", "-retry-interval-wan=1s"]
    # tmpfs: the data dir lives in memory (a demo; the servers are never restarted).
    run(inv, names(inv.fleet, dc)["server"], "consul-server", ip, CONSUL_IMAGE, args,
        hostname=f"{dc}-consul", extra=["--tmpfs", CONSUL_TMPFS])


def start_agent(inv: Inventory, dc: str, n: int) -> None:
    ip = address(inv.subnet, dc, "agent", n)
    server = address(inv.subnet, dc, "server")
    nm = vm_names(inv.fleet, dc, n)
    # tmpfs: a restarted agent has lost its state (the instances must register again).
    run(inv, nm["agent"], "consul-agent", ip, CONSUL_IMAGE,
        [*consul_args(dc, nm["vm"], ip), f"-retry-join={server}", "-retry-interval=1s",
         # Send a check's new output (supervise's note on a failed reload) to the catalog at
         # once, not after the default 5 minutes; status changes are always sent at once.
         "-hcl", 'check_update_interval = "0s"'],
        hostname=nm["vm"], extra=["--tmpfs", CONSUL_TMPFS, "--restart", "unless-stopped"])


def instance_env(inv: Inventory, dc: str, n: int, **overrides: str) -> dict[str, str]:
    """The supervise settings of VM n's instance (docs/configuration.md)."""
    nm = vm_names(inv.fleet, dc, n)
    ip = address(inv.subnet, dc, "web", n)
    env = {
        "SUPERVISE_CHDIR": "/srv/code/current",     # the symlink scripts/deploy swaps
        "SUPERVISE_NO_WATCH": "1",                  # deploys reload with an explicit HUP
        "SUPERVISE_WORKERS": WORKERS,
        "SUPERVISE_GRACEFUL_TIMEOUT": GRACEFUL_TIMEOUT,
        "SUPERVISE_CONSUL": f"http://{address(inv.subnet, dc, 'agent', n)}:8500",  # this VM's agent
        "SUPERVISE_CONSUL_DC": dc,
        "SUPERVISE_CONSUL_SERVICE": SERVICE,
        "SUPERVISE_CONSUL_SERVICE_ID": nm["instance"],
        "SUPERVISE_CONSUL_ADDRESS": ip,             # what the rest of the fleet reaches
        "SUPERVISE_CONSUL_TTL": CONSUL_TTL,
        "SUPERVISE_CONSUL_DEREGISTER_AFTER": DEREGISTER_AFTER,
        "SUPERVISE_CONSUL_DRAIN_DELAY": DRAIN_DELAY,
        "SUPERVISE_CONSUL_KV_PREFIX": KV_PREFIX,
        "SUPERVISE_CONSUL_KV_REQUIRED": "1",
        "SUPERVISE_CONSUL_META": f"vm={nm['vm']},container={nm['web']}",
        "FLEET_INSTANCE": nm["instance"],
        "FLEET_DC": dc,
    }
    env.update(overrides)
    return env


def start_instance(inv: Inventory, dc: str, n: int) -> Instance:
    nm = vm_names(inv.fleet, dc, n)
    ip = address(inv.subnet, dc, "web", n)
    inst = Instance(name=nm["instance"], dc=dc, vm=nm["vm"], container=nm["web"], ip=ip,
                    code_dir=str(Path(inv.work) / dc / nm["vm"] / "code"), health=f"http://{ip}:8001/health",
                    service_id=nm["instance"], agent=nm["agent"], agent_ip=address(inv.subnet, dc, "agent", n))
    rel = Releases(inst.code_dir)
    if rel.current() is None:  # a new VM starts on the release the others run
        src = Path(inv.work) / "app"
        rid = current_release(inv, dc) or release_id(src)
        source = releases_source(inv, dc, rid) or src
        rel.stage(source, rid)
        rel.switch(rid)
    env = instance_env(inv, dc, n)
    extra = ["--restart", "unless-stopped", "-v", f"{inst.code_dir}:/srv/code:ro"]
    for key, value in env.items():
        extra += ["-e", f"{key}={value}"]
    run(inv, inst.container, "instance", ip, APP_IMAGE, [APP], hostname=nm["vm"], extra=extra)
    return inst


def current_release(inv: Inventory, dc: str) -> str | None:
    for inst in inv.dcs[dc].instances if dc in inv.dcs else []:
        rid = Releases(inst.code_dir).current()
        if rid:
            return rid
    return None


def releases_source(inv: Inventory, dc: str, rid: str) -> Path | None:
    for inst in inv.dcs[dc].instances if dc in inv.dcs else []:
        path = Path(inst.code_dir) / "releases" / rid
        if path.is_dir():
            return path
    return None


def haproxy_cfg(server_ip: str) -> str:
    return f"""# Generated by scripts/fleet/fleet.py. HAProxy finds the instances of `{SERVICE}` through
# Consul DNS (SRV records from the datacenter's Consul server). No health checks and no
# retries: every failed request reaches the client, so the tests see it.
global
    maxconn 4000
    log stdout format raw local0
    stats socket ipv4@0.0.0.0:9999 level operator   # runtime API (show servers state), fleet network only

defaults
    mode http
    log global
    option httplog
    option dontlog-normal           # log only failed or abnormal requests
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    retries 0                       # HAProxy's default would retry failed connections 3 times

resolvers consul
    nameserver consul {server_ip}:8600
    accepted_payload_size 8192
    resolve_retries 3
    timeout resolve 1s              # the DNS refresh interval: re-resolve every second
    timeout retry 1s
    hold valid 10s                  # keep the last answer 10 s if Consul stops answering
    hold obsolete 0s                # an instance gone from the answer leaves at once
    hold nx 1s
    hold other 1s

frontend {SERVICE}
    bind :8080
    default_backend {SERVICE}

backend {SERVICE}
    balance roundrobin
    # allow-dup-ip: instances sharing an address (several per VM) all get a slot.
    server-template {SERVICE} 10 _{SERVICE}._tcp.service.consul resolvers consul resolve-prefer ipv4 resolve-opts allow-dup-ip init-addr none

frontend stats
    bind :8404
    stats enable
    stats uri /
    stats refresh 2s
"""


def start_lb(inv: Inventory, dc: str, lb_port: int, stats_port: int) -> None:
    """HAProxy of `dc`, published on 127.0.0.1:lb_port and :stats_port; port 0: a free port
    chosen by Docker when it binds it (no race with other programs), read back into the
    inventory."""
    cfg = Path(inv.work) / dc / "haproxy.cfg"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(haproxy_cfg(address(inv.subnet, dc, "server")))
    cfg.chmod(0o644)
    name = names(inv.fleet, dc)["lb"]
    run(inv, name, "lb", address(inv.subnet, dc, "lb"), HAPROXY_IMAGE, [],
        hostname=f"{dc}-lb", extra=["--restart", "unless-stopped", "-v", f"{cfg}:/etc/haproxy/fleet.cfg:ro",
                                    "-p", f"127.0.0.1:{lb_port or ''}:8080", "-p", f"127.0.0.1:{stats_port or ''}:8404"])
    d = inv.dcs[dc]
    d.lb = f"http://{published(name, 8080)}"
    d.stats = f"http://{published(name, 8404)}/"


def published(container: str, port: int) -> str:
    """The loopback HOST:PORT Docker publishes a container's port on."""
    for line in docker("port", container, f"{port}/tcp").splitlines():
        if line.startswith("127.0.0.1:"):
            return line.strip()
    raise Failure(f"{container}: port {port} is not published on 127.0.0.1")


# --------------------------------------------------------------------------- waiting


def alive(container: str) -> None:
    """Fail at once (with its last log lines) when a container we wait for has exited."""
    if docker("container", "inspect", "-f", "{{.State.Running}}", container) != "true":
        logs = sh("docker", "logs", "--tail", "15", container, check=False)
        raise Failure(f"{container} exited:\n{logs.stdout}{logs.stderr}")


def has_leader(http: str, container: str) -> bool:
    alive(container)
    status, body = http_json(f"{http}/v1/status/leader", 2)
    return status == 200 and bool(body)


def lb_servers(lb_ip: str) -> dict[str, str]:
    """HAProxy's view, from its runtime API (`show servers state`): {address: server slot} of
    the backend's servers that DNS filled and that are not in maintenance."""
    with socket.create_connection((lb_ip, 9999), timeout=2) as sock:
        sock.sendall(f"show servers state {SERVICE}\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    out = {}
    lines = data.decode().splitlines()
    header = next((line[2:].split() for line in lines if line.startswith("# be_id")), None)
    if header is None:
        raise Failure(f"unexpected answer from HAProxy's runtime API: {data[:200]!r}")
    for line in lines:
        if not line or line.startswith("#") or len(line.split()) < len(header) - 2:
            continue
        row = dict(zip(header, line.split()))
        maintenance = int(row["srv_admin_state"]) & 0x27  # forced, inherited, config or DNS (0x20) maintenance
        if not maintenance and row["srv_op_state"] != "0" and row["srv_addr"] not in ("-", "0.0.0.0"):
            out[row["srv_addr"]] = row["srv_name"]
    return out


def wait_instance(inv: Inventory, dc: str, inst: Instance, timeout: float = 60) -> None:
    http = inv.dcs[dc].consul_http

    def ready() -> bool:
        running = docker("container", "inspect", "-f", "{{.State.Running}}", inst.container)
        if running != "true":
            logs = sh("docker", "logs", "--tail", "20", inst.container, check=False)
            raise Failure(f"{inst.container} is not running:\n{logs.stdout}{logs.stderr}")
        return inst.service_id in passing_ids(http, SERVICE)

    wait_for(ready, timeout, f"{inst.name} to pass in Consul")


# --------------------------------------------------------------------------- commands


def up(fleet: str, home: Path, dcs: list[str], vms: dict[str, int], base_port: int) -> Inventory:
    path = Inventory.path_for(fleet, home)
    if path.exists():
        inv = Inventory.load(path)
        if all_running(fleet):
            say(f"fleet {fleet} is already up")
            return inv
        say(f"fleet {fleet} is partly down: recreating it")
        down(fleet, home)
    elif fleet_containers(fleet):
        down(fleet, home)
    build()
    t0 = time.monotonic()
    work = home / fleet
    work.mkdir(parents=True, exist_ok=True)
    # The team's checkout: the example app plus the fleet's module. Edit it, then deploy it.
    app = work / "app"
    if not app.exists():
        shutil.copytree(REPO / "images" / "example" / "app", app, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(REPO / "images" / "fleet" / "app" / "fleetapp.py", app / "fleetapp.py")
    inv = Inventory(fleet=fleet, service=SERVICE, kv_prefix=KV_PREFIX, work=str(work))
    inv.network, inv.subnet = create_network(fleet)
    lb_ports = ports(base_port, dcs)
    say(f"network {inv.network} {inv.subnet}")
    try:
        for dc in dcs:
            server_ip = address(inv.subnet, dc, "server")
            inv.dcs[dc] = Datacenter(name=dc, consul_http=f"http://{server_ip}:8500", dns=f"{server_ip}:8600",
                                     lb=f"http://127.0.0.1:{lb_ports[dc][0]}", stats=f"http://127.0.0.1:{lb_ports[dc][1]}/",
                                     server=names(fleet, dc)["server"], lb_container=names(fleet, dc)["lb"],
                                     lb_api=f"{address(inv.subnet, dc, 'lb')}:9999")
            start_server(inv, dc, [address(inv.subnet, other, "server") for other in dcs if other != dc])
        inv.save(path)
        for dc in dcs:
            wait_for(lambda: has_leader(inv.dcs[dc].consul_http, inv.dcs[dc].server), 60, f"the {dc} Consul server to elect itself")
            if kv_get(inv.dcs[dc].consul_http, KV_PREFIX + "GREETING") is None:
                kv_put(inv.dcs[dc].consul_http, KV_PREFIX + "GREETING", f"hello from {dc}")
        if len(dcs) > 1:
            wait_for(lambda: set(http_json(f"{inv.dcs[dcs[0]].consul_http}/v1/catalog/datacenters")[1]) >= set(dcs),
                     60, "the servers to join over the WAN")
        for dc in dcs:
            for n in range(1, vms[dc] + 1):
                start_agent(inv, dc, n)
        for dc in dcs:
            for n in range(1, vms[dc] + 1):
                node = vm_names(fleet, dc, n)["vm"]
                wait_for(lambda: any(m["Node"] == node for m in http_json(f"{inv.dcs[dc].consul_http}/v1/catalog/nodes")[1]),
                         60, f"{node} to join {dc}")
        for dc in dcs:
            for n in range(1, vms[dc] + 1):
                inv.dcs[dc].instances.append(start_instance(inv, dc, n))
                inv.save(path)
        for dc in dcs:
            start_lb(inv, dc, *lb_ports[dc])
        inv.save(path)
        for dc in dcs:
            for inst in inv.dcs[dc].instances:
                wait_instance(inv, dc, inst)
            want = {i.ip for i in inv.dcs[dc].instances}
            wait_for(lambda: set(lb_servers(address(inv.subnet, dc, 'lb'))) == want, 60, f"HAProxy in {dc} to route to {sorted(want)}")
    except BaseException:
        say(f"start failed; `scripts/fleet.sh down{'' if fleet == DEFAULT_FLEET else ' --fleet ' + fleet}` cleans up")
        raise
    say(f"fleet {fleet} up in {time.monotonic() - t0:.1f} s")
    return inv


def add_vm(fleet: str, home: Path, dc: str) -> Instance:
    path = Inventory.path_for(fleet, home)
    inv = Inventory.load(path)
    d = inv.dc(dc)
    used = {int(i.vm[2:]) for i in d.instances}
    n = max(used, default=0) + 1
    if n > 39:
        raise Failure("at most 39 VMs per datacenter in this address plan")
    start_agent(inv, dc, n)
    node = vm_names(fleet, dc, n)["vm"]
    wait_for(lambda: any(m["Node"] == node for m in http_json(f"{d.consul_http}/v1/catalog/nodes")[1]), 60,
             f"{node} to join {dc}")
    inst = start_instance(inv, dc, n)
    d.instances.append(inst)
    inv.save(path)
    wait_instance(inv, dc, inst)
    want = {i.ip for i in d.instances if i.service_id in passing_ids(d.consul_http, SERVICE)}
    wait_for(lambda: inst.ip in lb_servers(address(inv.subnet, dc, 'lb')), 30, f"HAProxy to route to {inst.ip}")
    say(f"{inst.name} ({inst.ip}, release {Releases(inst.code_dir).current()}) serves behind {d.lb}; "
        f"HAProxy routes to {len(want)} instances")
    return inst


def fleet_containers(fleet: str) -> list[str]:
    return docker("ps", "-aq", "--filter", f"label={LABEL}={fleet}").split()


def all_running(fleet: str) -> bool:
    ids = fleet_containers(fleet)
    return bool(ids) and all(s == "true" for s in docker("inspect", "-f", "{{.State.Running}}", *ids).split())


def down(fleet: str, home: Path) -> None:
    ids = fleet_containers(fleet)
    if ids:
        # No restart policy may race the removal (that can leave a stale endpoint on the network).
        docker("update", "--restart=no", *ids, check=False)
        docker("stop", "-t", "0", *ids, check=False, timeout=180)
        docker("rm", "-f", "-v", *ids, timeout=180)
        say(f"removed {len(ids)} containers (and their anonymous volumes)")
    for net in docker("network", "ls", "-q", "--filter", f"label={LABEL}={fleet}").split():
        name = docker("network", "inspect", "-f", "{{.Name}}", net, check=False) or net
        proc = sh("docker", "network", "rm", net, check=False)
        if proc.returncode == 0:
            say(f"removed network {name}")
        else:  # an engine bug can leave a network with a phantom endpoint: say so, go on
            say(f"warning: could not remove network {name}: {proc.stderr.strip()}")
    work = home / fleet
    if work.exists():
        shutil.rmtree(work)
        say(f"removed {work}")


def info(inv: Inventory, fleet: str) -> str:
    flag = "" if fleet == DEFAULT_FLEET else f" --fleet {fleet}"
    prod = inv.dcs.get("prod") or next(iter(inv.dcs.values()))
    first = prod.instances[0]
    lines = [f"fleet {fleet!r} is up ({inv.network} {inv.subnet}, work dir {inv.work})", ""]
    for dc in inv.dcs.values():
        lines.append(f"  {dc.name:5} {dc.lb}/whoami   HAProxy stats {dc.stats}   "
                     f"{len(dc.instances)} instances, Consul {dc.consul_http}")
    server = prod.server
    lines += [
        "",
        f"  watch     scripts/fleet.sh{flag} status        (every instance: release, generation, Consul, DNS)",
        f"            while sleep 0.5; do curl -s {prod.lb}/whoami; done",
        f"            docker logs -f {first.container}",
        f"  deploy    edit {inv.work}/app/version.py, then:  scripts/deploy{flag} push {inv.work}/app",
        f"  rollback  scripts/deploy{flag} rollback",
        f"  config    scripts/deploy{flag} config GREETING='hi there'   (Consul KV {KV_PREFIX}: every instance reloads)",
        f"  reload    docker kill -s HUP {first.container}",
        f"  stop      docker stop {first.container}      (leaves Consul, then drains; `docker start` brings it back)",
        f"  scale     scripts/fleet.sh{flag} add-vm",
        f"  DNS       docker exec {prod.lb_container} dig +short @{prod.dns.split(':')[0]} -p 8600 {SERVICE}.service.consul SRV",
        f"  Consul    docker exec {server} consul catalog nodes -service={SERVICE}",
        f"  down      make fleet-down        (or: scripts/fleet.sh{flag} down)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/fleet.sh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fleet", default=DEFAULT_FLEET, help="fleet name: prefix of every container (default %(default)s)")
    parser.add_argument("--home", type=Path, default=FLEET_HOME, help="parent of the work dir (default %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="build and start the fleet")
    p_up.add_argument("--dcs", default=os.environ.get("FLEET_DCS", "prod,dev"), help="datacenters (default %(default)s)")
    p_up.add_argument("--vms", type=int, default=int(os.environ.get("FLEET_VMS", "3")), help="VMs in prod (default %(default)s)")
    p_up.add_argument("--dev-vms", type=int, default=1, help="VMs in the other datacenters (default %(default)s)")
    p_up.add_argument("--port", type=int, default=int(os.environ.get("FLEET_PORT", "8090")),
                      help="first loopback port: LB and stats of each DC in turn (default %(default)s; "
                           "0: free ports chosen by Docker, printed)")
    p_add = sub.add_parser("add-vm", help="scale out: one more VM with its agent and instance")
    p_add.add_argument("--dc", default="prod")
    sub.add_parser("status", help="one line per instance")
    sub.add_parser("info", help="URLs and commands")
    sub.add_parser("down", help="remove everything")
    sub.add_parser("build", help="build the images only")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            build()
        elif args.command == "up":
            dcs = [d for d in args.dcs.split(",") if d]
            vms = {dc: (args.vms if dc == "prod" or dc == dcs[0] else args.dev_vms) for dc in dcs}
            inv = up(args.fleet, args.home, dcs, vms, args.port)
            print(info(inv, args.fleet))
        elif args.command == "down":
            down(args.fleet, args.home)
        elif args.command == "add-vm":
            inst = add_vm(args.fleet, args.home, args.dc)
            print(inst.name)
        elif args.command == "info":
            print(info(Inventory.load(Inventory.path_for(args.fleet, args.home)), args.fleet))
        elif args.command == "status":
            inv = Inventory.load(Inventory.path_for(args.fleet, args.home))
            rows = status_rows(inv)
            print(format_table(rows, ["dc", "instance", "ip", "release", "generation", "last_reload", "health",
                                      "consul", "dns", "error"]))
    except Failure as exc:
        say(f"error: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `... | head` ends us quietly
    sys.exit(main())
