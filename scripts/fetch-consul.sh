#!/usr/bin/env bash
# Fetch a Consul agent binary for the test suite: Debian bullseye's `consul` package (1.8.7).
#
#   scripts/fetch-consul.sh            -> prints the path of the cached binary (last line of stdout)
#
# How (see /work/shared/consul.md): the Debian mirror URI is read from this machine's own apt
# configuration by scripts/lib/mirror.sh (deb822 /etc/apt/sources.list.d/*.sources, classic
# /etc/apt/sources.list and /etc/apt/sources.list.d/*.list); no host name is written here.  apt runs with fully isolated
# state and configuration in a temporary directory (the system's apt state is untouched); only
# Acquire::Check-Valid-Until / Check-Date / proxy / retry options are carried over from
# `apt-config dump`.  The .deb is unpacked with dpkg-deb and the binary cached outside the repo.
#
# Environment:
#   SUPERVISE_CONSUL_CACHE   cache directory (default ${XDG_CACHE_HOME:-$HOME/.cache}/supervise/consul)
#   SUPERVISE_DEBIAN_MIRROR  Debian archive URI to use instead of the one found in the apt config
#   SUPERVISE_APT_DIR        apt configuration directory to read sources from (default /etc/apt)
#
# Idempotent: when the binary is already cached it prints the path and exits at once.
# Fails loudly (non-zero exit, message on stderr) when it cannot fetch: bullseye is Debian's
# oldest supported release, and the day it is no longer served we must notice and adapt.
set -euo pipefail

SUITE=bullseye
PACKAGE=consul
WANT_VERSION="Consul v1.8.7"

CACHE_DIR="${SUPERVISE_CONSUL_CACHE:-${XDG_CACHE_HOME:-${HOME:?is not set: set SUPERVISE_CONSUL_CACHE or XDG_CACHE_HOME}/.cache}/supervise/consul}"
BINARY="$CACHE_DIR/consul"

say() { printf 'fetch-consul: %s\n' "$*" >&2; }
die() { printf 'fetch-consul: ERROR: %s\n' "$*" >&2; exit 1; }

cached_ok() {
    [ -x "$BINARY" ] && "$BINARY" version 2>/dev/null | head -n1 | grep -q '^Consul v'
}

if cached_ok; then
    printf '%s\n' "$BINARY"
    exit 0
fi

for tool in apt-get apt-config dpkg-deb mktemp; do
    command -v "$tool" >/dev/null 2>&1 || die "'$tool' not found: this script needs a Debian-based system"
done

mkdir -p "$CACHE_DIR" || die "cannot create cache directory $CACHE_DIR"

# One fetch at a time (several pytest sessions may start together).
if command -v flock >/dev/null 2>&1; then
    exec 9>"$CACHE_DIR/.lock"
    flock 9
    if cached_ok; then
        printf '%s\n' "$BINARY"
        exit 0
    fi
fi

# ---------------------------------------------------------------- mirror discovery
# "URI KEYRING KIND" for every Debian archive in the machine's apt configuration (deb822 and
# one-line formats), main archives first: the one reader shared with scripts/image.sh.
. "$(dirname "${BASH_SOURCE[0]}")/lib/mirror.sh"
MIRRORS="$(mirror_debian)"
# The security archive carries no bullseye main packages of its own: mirror_debian lists it last.
[ -n "$MIRRORS" ] || die "no Debian archive found in $(mirror_where); set SUPERVISE_DEBIAN_MIRROR to a Debian mirror URI"

# ---------------------------------------------------------------- isolated apt
WORK="$(mktemp -d "${TMPDIR:-/tmp}/fetch-consul.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/lists/partial" "$WORK/cache/archives/partial" "$WORK/apt.conf.d" \
         "$WORK/preferences.d" "$WORK/trusted.gpg.d" "$WORK/download"

# Options worth keeping from the machine's apt configuration (mirror_aptopts): validity checks
# (snapshot mirrors need Check-Valid-Until "false"), proxies, retries, IP family.
CARRIED="$(mirror_aptopts)"

{
    printf 'Dir::Etc::Main "/dev/null";\n'
    printf 'Dir::Etc::Parts "%s";\n' "$WORK/apt.conf.d"
    printf 'Dir::Etc::sourcelist "%s";\n' "$WORK/sources.list"
    printf 'Dir::Etc::sourceparts "-";\n'
    printf 'Dir::Etc::preferences "%s";\n' "$WORK/preferences"
    printf 'Dir::Etc::preferencesparts "%s";\n' "$WORK/preferences.d"
    printf 'Dir::Etc::trustedparts "%s";\n' "$WORK/trusted.gpg.d"
    printf 'Dir::State::Lists "%s";\n' "$WORK/lists"
    printf 'Dir::State::status "/dev/null";\n'
    printf 'Dir::Cache "%s";\n' "$WORK/cache"
    printf 'Acquire::Languages "none";\n'
    printf '%s\n' "$CARRIED"
} >"$WORK/apt.conf"
[ -n "$CARRIED" ] && say "carried over from apt-config: $(printf '%s' "$CARRIED" | tr '\n' ' ')"

# apt drops to the _apt user for downloads when run as root; let it write where it must.
if [ "$(id -u)" = 0 ] && id _apt >/dev/null 2>&1; then
    chmod 755 "$WORK"
    chown -R _apt "$WORK/lists/partial" "$WORK/cache/archives/partial" "$WORK/download"
fi

fetch_from() {  # URI KEYRING -> leaves one .deb in $WORK/download, or returns non-zero
    local uri="$1" keyring="$2"
    [ -r "$keyring" ] || { say "keyring $keyring is not readable; skipping $uri"; return 1; }
    printf 'deb [signed-by=%s] %s %s main\n' "$keyring" "$uri" "$SUITE" >"$WORK/sources.list"
    rm -rf "$WORK/lists/"*_* "$WORK/download/"*.deb 2>/dev/null || true
    say "apt-get update ($uri $SUITE main, isolated state in $WORK)"
    if ! APT_CONFIG="$WORK/apt.conf" apt-get -q -o APT::Update::Error-Mode=any update >"$WORK/update.log" 2>&1; then
        sed 's/^/fetch-consul:   /' "$WORK/update.log" >&2
        say "apt-get update failed for $uri"
        return 1
    fi
    say "apt-get download $PACKAGE"
    if ! (cd "$WORK/download" && APT_CONFIG="$WORK/apt.conf" apt-get -q download "$PACKAGE") >"$WORK/download.log" 2>&1; then
        sed 's/^/fetch-consul:   /' "$WORK/download.log" >&2
        say "apt-get download $PACKAGE failed for $uri"
        return 1
    fi
    compgen -G "$WORK/download/${PACKAGE}_*.deb" >/dev/null
}

fetched=""
while read -r uri keyring _kind; do
    [ -n "$uri" ] || continue
    if fetch_from "$uri" "$keyring"; then
        fetched="$uri"
        break
    fi
done <<<"$MIRRORS"
[ -n "$fetched" ] || die "could not download Debian $SUITE's '$PACKAGE' package from: $(printf '%s' "$MIRRORS" | awk '{print $1}' | tr '\n' ' ')(is $SUITE still served? see docs/consul.md)"

DEB="$(ls "$WORK/download/${PACKAGE}_"*.deb | head -n1)"
say "downloaded $(basename "$DEB") ($(dpkg-deb -f "$DEB" Version))"
dpkg-deb -x "$DEB" "$WORK/x" || die "dpkg-deb could not unpack $DEB"
[ -x "$WORK/x/usr/bin/consul" ] || die "$DEB has no usr/bin/consul"

VERSION="$("$WORK/x/usr/bin/consul" version 2>&1 | head -n1 || true)"
case "$VERSION" in
    "Consul v"*) ;;
    *) die "the unpacked binary does not run: $VERSION" ;;
esac
[ "$VERSION" = "$WANT_VERSION" ] || say "WARNING: expected $WANT_VERSION, got $VERSION"

cp "$WORK/x/usr/bin/consul" "$BINARY.tmp.$$"
chmod 755 "$BINARY.tmp.$$"
mv -f "$BINARY.tmp.$$" "$BINARY"
say "cached $VERSION at $BINARY"
printf '%s\n' "$BINARY"
