#!/usr/bin/env bash
# Ensure a Docker engine answers `docker info`.
#
#   scripts/docker-engine.sh            # install docker.io if needed, start dockerd, wait
#
# - An engine that already answers is left alone (nothing is installed or started).
# - There is no systemd on these machines: dockerd is started in the background,
#   logging to /var/log/dockerd.log (DOCKERD_LOG to override).
# - Never starts a second dockerd: if one is already running but not answering yet,
#   we only wait for it.
# - Gives up after DOCKER_ENGINE_TIMEOUT seconds (default 60) with a clear message, exit 1.
set -euo pipefail

DEADLINE_S="${DOCKER_ENGINE_TIMEOUT:-60}"
LOG="${DOCKERD_LOG:-/var/log/dockerd.log}"

say() { printf 'docker-engine: %s\n' "$*" >&2; }

engine_up() { docker info >/dev/null 2>&1; }

if command -v docker >/dev/null 2>&1 && engine_up; then
    exit 0
fi

SUDO=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
        say "not root and no sudo: cannot install or start dockerd"; exit 1
    fi
fi

if ! command -v dockerd >/dev/null 2>&1; then
    say "installing docker.io (Debian's engine)"
    export DEBIAN_FRONTEND=noninteractive
    if ! $SUDO apt-get install -y --no-install-recommends docker.io >/tmp/docker-engine-apt.log 2>&1; then
        say "apt-get install failed, refreshing package lists once"
        $SUDO apt-get update >>/tmp/docker-engine-apt.log 2>&1 || true
        $SUDO apt-get install -y --no-install-recommends docker.io >>/tmp/docker-engine-apt.log 2>&1 || {
            tail -20 /tmp/docker-engine-apt.log >&2; say "could not install docker.io"; exit 1; }
    fi
fi
if ! command -v docker >/dev/null 2>&1; then
    say "docker CLI missing after install"; exit 1
fi

# One dockerd only. `pgrep -x` matches the process name exactly (not command lines).
if pgrep -x dockerd >/dev/null 2>&1; then
    say "dockerd already running (pid $(pgrep -x dockerd | tr '\n' ' ')); waiting for it to answer"
else
    say "starting dockerd (log: $LOG)"
    # setsid: the daemon must outlive this script and the shell/test session that ran it.
    $SUDO setsid nohup dockerd >>"$LOG" 2>&1 </dev/null &
fi

end=$(( $(date +%s) + DEADLINE_S ))
while ! engine_up; do
    if [ "$(date +%s)" -ge "$end" ]; then
        say "engine did not answer within ${DEADLINE_S}s; last lines of $LOG:"
        tail -20 "$LOG" >&2 2>/dev/null || true
        exit 1
    fi
    if ! pgrep -x dockerd >/dev/null 2>&1; then
        say "dockerd exited; last lines of $LOG:"
        tail -20 "$LOG" >&2 2>/dev/null || true
        exit 1
    fi
    sleep 0.2
done
say "engine ready ($(docker version --format '{{.Server.Version}}' 2>/dev/null || echo '?'))"
