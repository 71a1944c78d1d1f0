"""scripts/lib/mirror.sh: the one reader of the machine's Debian mirror (issue 16, item 3).

scripts/image.sh (base image) and scripts/fetch-consul.sh (Consul's .deb) both find the mirror
through it.  It is run here, as the scripts run it, against sample apt directories (deb822 and
one-line sources, bookworm and trixie hosts, third-party repositories) in a temporary directory.
No engine and no network are needed: these tests run in `make test-fast` too.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

NEEDS_ENGINE = False  # tests/docker/conftest.py: not a `docker` test

REPO = Path(__file__).resolve().parents[2]
MIRROR = REPO / "scripts" / "lib" / "mirror.sh"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"

pytestmark = pytest.mark.timeout(60)

# What a Debian 12 cloud image / this machine has: deb822, plus a disabled third-party repository.
BOOKWORM_DEB822 = {
    "sources.list.d/debian.sources": f"""\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: {KEYRING}

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: {KEYRING}
""",
    "sources.list.d/nodesource.sources": """\
Types: deb
URIs: https://deb.nodesource.com/node_20.x
Suites: nodistro
Components: main
Signed-By: /usr/share/keyrings/nodesource.gpg
""",
    "sources.list.d/google-cloud-sdk.list.disabled": "deb https://packages.cloud.google.com/apt cloud-sdk main\n",
}

# A classic installation (debian-installer before trixie): one-line /etc/apt/sources.list.
BOOKWORM_ONE_LINE = {
    "sources.list": """\
# deb cdrom:[Debian GNU/Linux 12.5.0 _Bookworm_]/ bookworm main
deb cdrom:[Debian GNU/Linux 12.5.0 _Bookworm_]/ bookworm main

deb http://ftp.de.debian.org/debian/ bookworm main non-free-firmware
deb-src http://ftp.de.debian.org/debian/ bookworm main non-free-firmware

deb http://security.debian.org/debian-security bookworm-security main non-free-firmware
deb http://ftp.de.debian.org/debian/ bookworm-updates main non-free-firmware  # updates
""",
    "sources.list.d/google.list": (
        "deb [arch=amd64 signed-by=/usr/share/keyrings/cloud.google.gpg] https://packages.cloud.google.com/apt "
        "cloud-sdk main\n"),
}

# Debian 13 writes deb822 with deb-src, the .pgp keyring, and an inline-key third-party entry.
TRIXIE_DEB822 = {
    "sources.list.d/debian.sources": """\
Types: deb deb-src
URIs: https://deb.debian.org/debian
Suites: trixie trixie-updates
Components: main non-free-firmware
Signed-By: /usr/share/keyrings/debian-archive-keyring.pgp

Types: deb deb-src
URIs: https://security.debian.org/debian-security
Suites: trixie-security
Components: main non-free-firmware
Signed-By: /usr/share/keyrings/debian-archive-keyring.pgp

Types: deb
URIs: http://deb.debian.org/debian
Suites: trixie-backports
Components: main
Enabled: no
""",
    "sources.list.d/vendor.sources": """\
Types: deb
URIs: https://vendor.example/apt
Suites: stable-vendor
Components: main
Signed-By:
 -----BEGIN PGP PUBLIC KEY BLOCK-----
 .
 mQINBF...
 -----END PGP PUBLIC KEY BLOCK-----
""",
}

# A trixie host on a snapshot mirror, one-line format in sources.list.d/*.list, no sources.list.
TRIXIE_ONE_LINE = {
    "sources.list.d/snapshot.list": """\
deb [check-valid-until=no] http://snapshot.debian.org/archive/debian/20250801T000000Z trixie main
deb [ check-valid-until=no ] http://snapshot.debian.org/archive/debian-security/20250801T000000Z trixie-security main
""",
}


def apt_dir(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "apt"
    (root / "sources.list.d").mkdir(parents=True)
    for name, text in files.items():
        (root / name).write_text(text)
    return root


def mirror(*args: str, apt: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERVISE_DEBIAN_")}
    full_env.update(env or {})
    cmd = ["bash", str(MIRROR), *(["--apt-dir", str(apt)] if apt else []), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, env=full_env)


def lines(proc: subprocess.CompletedProcess) -> list[str]:
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def test_bookworm_deb822_host(tmp_path):
    apt = apt_dir(tmp_path, BOOKWORM_DEB822)
    assert lines(mirror("entries", apt=apt)) == [
        f"http://deb.debian.org/debian bookworm {KEYRING}",
        f"http://deb.debian.org/debian bookworm-updates {KEYRING}",
        f"http://deb.debian.org/debian-security bookworm-security {KEYRING}",
        "https://deb.nodesource.com/node_20.x nodistro /usr/share/keyrings/nodesource.gpg",
    ]
    assert lines(mirror("debian", apt=apt)) == [
        f"http://deb.debian.org/debian {KEYRING} main",
        f"http://deb.debian.org/debian-security {KEYRING} security",
    ]
    assert lines(mirror("sources", "bookworm", apt=apt)) == [
        f"deb [signed-by={KEYRING}] http://deb.debian.org/debian bookworm main",
        f"deb [signed-by={KEYRING}] http://deb.debian.org/debian bookworm-updates main",
        f"deb [signed-by={KEYRING}] http://deb.debian.org/debian-security bookworm-security main",
    ]


def test_bookworm_one_line_host(tmp_path):
    """The format scripts/image.sh used to reject ("no deb822 entries for bookworm")."""
    apt = apt_dir(tmp_path, BOOKWORM_ONE_LINE)
    default = lines(mirror("debian", apt=apt))[0].split()[1]  # the host's default archive keyring
    assert lines(mirror("entries", apt=apt)) == [  # no cdrom, no deb-src, comments dropped
        "http://ftp.de.debian.org/debian/ bookworm -",
        "http://security.debian.org/debian-security bookworm-security -",
        "http://ftp.de.debian.org/debian/ bookworm-updates -",
        "https://packages.cloud.google.com/apt cloud-sdk /usr/share/keyrings/cloud.google.gpg",
    ]
    assert lines(mirror("sources", "bookworm", apt=apt)) == [
        f"deb [signed-by={default}] http://ftp.de.debian.org/debian/ bookworm main",
        f"deb [signed-by={default}] http://ftp.de.debian.org/debian/ bookworm-updates main",
        f"deb [signed-by={default}] http://security.debian.org/debian-security bookworm-security main",
    ]


def test_trixie_deb822_host_builds_a_bookworm_base(tmp_path):
    """A newer host: its archives, pointed at bookworm (the base image's suite)."""
    apt = apt_dir(tmp_path, TRIXIE_DEB822)
    pgp = "/usr/share/keyrings/debian-archive-keyring.pgp"
    assert lines(mirror("entries", apt=apt)) == [  # the disabled stanza and deb-src are not entries
        f"https://deb.debian.org/debian trixie {pgp}",
        f"https://deb.debian.org/debian trixie-updates {pgp}",
        f"https://security.debian.org/debian-security trixie-security {pgp}",
        "https://vendor.example/apt stable-vendor -",  # inline key: no keyring path
    ]
    assert lines(mirror("sources", "bookworm", apt=apt)) == [
        f"deb [signed-by={pgp}] https://deb.debian.org/debian bookworm main",
        f"deb [signed-by={pgp}] https://deb.debian.org/debian bookworm-updates main",
        f"deb [signed-by={pgp}] https://security.debian.org/debian-security bookworm-security main",
    ]


def test_trixie_snapshot_one_line_host(tmp_path):
    apt = apt_dir(tmp_path, TRIXIE_ONE_LINE)
    out = lines(mirror("sources", "bookworm", apt=apt))
    assert [line.split("] ", 1)[1] for line in out] == [
        "http://snapshot.debian.org/archive/debian/20250801T000000Z bookworm main",
        "http://snapshot.debian.org/archive/debian/20250801T000000Z bookworm-updates main",
        "http://snapshot.debian.org/archive/debian-security/20250801T000000Z bookworm-security main",
    ]


def test_fetch_consul_order_main_archives_before_security(tmp_path):
    """fetch-consul.sh tries archives in this order: the security archive has no bullseye main."""
    apt = apt_dir(tmp_path, {"sources.list": "deb http://sec.example/debian-security bookworm-security main\n"
                                             "deb http://a.example/debian bookworm main\n"
                                             "deb http://b.example/debian bookworm-backports main\n"})
    assert [line.split()[0::2] for line in lines(mirror("debian", apt=apt))] == [
        ["http://a.example/debian", "main"], ["http://b.example/debian", "main"],
        ["http://sec.example/debian-security", "security"]]


def test_negative_control_no_debian_archive_is_an_error(tmp_path):
    """Third-party repositories, deb-src lines and disabled stanzas are not a Debian mirror:
    the reader says so (and names the override) instead of building from the wrong place."""
    apt = apt_dir(tmp_path, {
        "sources.list": "deb-src http://deb.debian.org/debian bookworm main\n# deb http://deb.debian.org/debian bookworm main\n",
        "sources.list.d/google.list": "deb https://packages.cloud.google.com/apt cloud-sdk-bookworm main\n",
        "sources.list.d/off.sources": "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm\nEnabled: no\n",
    })
    proc = mirror("sources", "bookworm", apt=apt)
    assert proc.returncode == 1 and proc.stdout == ""
    assert "no Debian archive" in proc.stderr and "SUPERVISE_DEBIAN_MIRROR" in proc.stderr
    assert mirror("debian", apt=apt).returncode == 1
    # ... and the same directory plus one Debian line is accepted (the control's control).
    (apt / "sources.list.d" / "debian.list").write_text("deb http://deb.debian.org/debian bookworm main\n")
    assert mirror("sources", "bookworm", apt=apt).returncode == 0


def test_override_mirror(tmp_path):
    apt = apt_dir(tmp_path, BOOKWORM_DEB822)
    out = lines(mirror("sources", "bookworm", apt=apt, env={"SUPERVISE_DEBIAN_MIRROR": "http://mirror.example/debian"}))
    assert [line.split("] ", 1)[1] for line in out] == [
        "http://mirror.example/debian bookworm main", "http://mirror.example/debian bookworm-updates main"]


def test_apt_options_the_mirror_needs_are_carried(tmp_path):
    conf = tmp_path / "apt.conf"
    conf.write_text('Acquire::http::Proxy "http://proxy.example:3128";\nAcquire::Retries "7";\n'
                    'Acquire::Check-Valid-Until "false";\nAPT::Get::Assume-Yes "true";\n')
    out = lines(mirror("aptopts", env={"APT_CONFIG": str(conf)}))
    assert 'Acquire::http::Proxy "http://proxy.example:3128";' in out
    assert 'Acquire::Retries "7";' in out
    assert 'Acquire::Check-Valid-Until "false";' in out
    assert not [line for line in out if line.startswith("APT::")]  # only what a mirror needs


def test_fetch_consul_reads_the_mirror_through_the_shared_reader(tmp_path):
    """fetch-consul.sh with a sample apt dir naming an unreachable mirror: it tries exactly that
    mirror (nothing listens on port 9), then fails loudly naming it."""
    apt = apt_dir(tmp_path, {"sources.list": "deb http://127.0.0.1:9/debian trixie main\n"})
    env = {**os.environ, "SUPERVISE_APT_DIR": str(apt), "SUPERVISE_CONSUL_CACHE": str(tmp_path / "consul")}
    env.pop("SUPERVISE_DEBIAN_MIRROR", None)
    proc = subprocess.run(["bash", str(REPO / "scripts" / "fetch-consul.sh")], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode != 0, proc.stdout
    assert "http://127.0.0.1:9/debian bullseye main" in proc.stderr, proc.stderr
    assert "could not download" in proc.stderr, proc.stderr
    # Negative control: with no Debian archive at all, it stops before apt, naming the override.
    (apt / "sources.list").write_text("deb https://vendor.example/apt nodistro main\n")
    proc = subprocess.run(["bash", str(REPO / "scripts" / "fetch-consul.sh")], capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode != 0 and "no Debian archive" in proc.stderr and "apt-get update" not in proc.stderr, \
        proc.stderr
