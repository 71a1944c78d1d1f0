#!/usr/bin/env bash
# What the README's commands (`make demo`, `make test`) need from a Debian machine, in one place:
# the README's apt-get line, the Makefile's check and .ci/run all come from here.
#
#   scripts/lib/prereqs.sh check      exit 0, or exit 1 with ONE line: what is missing and the
#                                     apt-get line that installs it (PYTHON: the interpreter, default python3)
#   scripts/lib/prereqs.sh packages   the Debian packages, space-separated
#   scripts/lib/prereqs.sh apt-line   the command a user runs first (as root), as the README shows it
#
# A minimal Debian 12 (bookworm) has none of them: no make, no python3 (nor its venv/ensurepip,
# which Debian ships separately as python3-venv), no procps (ps, pgrep).  Everything else
# `make test` needs (Docker's engine, mmdebstrap, a Consul agent, HAProxy) is installed by the
# tests themselves when missing (root), or by .ci/run.
set -euo pipefail

PACKAGES="make python3 python3-venv procps"
APT_LINE="apt-get update && apt-get install -y $PACKAGES"
PYTHON="${PYTHON:-python3}"

check() {
    local missing=() why=() version
    command -v make >/dev/null 2>&1 || { missing+=(make); why+=("no make"); }
    if ! command -v "$PYTHON" >/dev/null 2>&1; then
        missing+=(python3); why+=("no $PYTHON")
    elif ! version="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2]); sys.exit(sys.version_info < (3, 11))' 2>/dev/null)"; then
        printf 'prereqs: %s is Python %s; supervise needs Python >= 3.11 (Debian 12 bookworm or newer, or PYTHON=python3.11)\n' \
            "$PYTHON" "${version:-? (it does not run)}" >&2
        return 1
    elif ! "$PYTHON" -c 'import venv, ensurepip; ensurepip.version()' >/dev/null 2>&1; then
        missing+=(python3-venv); why+=("$PYTHON has no venv/ensurepip")
    fi
    command -v ps >/dev/null 2>&1 && command -v pgrep >/dev/null 2>&1 || { missing+=(procps); why+=("no ps/pgrep"); }
    [ "${#missing[@]}" -eq 0 ] && return 0
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo "
    printf 'prereqs: missing %s (%s); run first: %sapt-get update && %sapt-get install -y %s\n' "${missing[*]}" \
        "$(IFS=,; printf '%s' "${why[*]}" | sed 's/,/, /g')" "$sudo" "$sudo" "$PACKAGES" >&2
    return 1
}

case "${1:-check}" in
    check) check ;;
    packages) printf '%s\n' "$PACKAGES" ;;
    apt-line) printf '%s\n' "$APT_LINE" ;;
    *) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
