#!/usr/bin/env bash
# Ensure a Docker engine answers `docker info`.
#
#   scripts/docker-engine.sh            # install docker.io if needed, start dockerd, wait
#
# - An engine that already answers is left alone (nothing is installed or started).
# - There is no systemd on these machines: dockerd is started in the background (its own
#   session, stdin from /dev/null), logging to /var/log/dockerd.log (DOCKERD_LOG to override).
# - dockerd inherits no descriptor but stdin/stdout/stderr: a caller's lock (scripts/image.sh
#   holds one on fd 9) must never outlive the caller inside a daemon.
# - Never starts a second dockerd: if one is already running but not answering yet, we only
#   wait for it.  Processes are found through /proc (no procps needed).
# - Gives up after DOCKER_ENGINE_TIMEOUT seconds (default 60) with a clear message, exit 1.
#
# A private engine, for tests: DOCKERD_ROOT=DIR starts (or reuses) a dockerd whose data, state,
# pid file, log and socket (unix://DIR/docker.sock, exported as DOCKER_HOST) all live under DIR,
# in its own network and mount namespaces (unshare), so its bridge and iptables rules never
# touch the machine's engine.  Stop it with: kill $(cat DIR/docker.pid).
set -euo pipefail

DEADLINE_S="${DOCKER_ENGINE_TIMEOUT:-60}"
DOCKERD_ARGS=()
WRAP=()
if [ -n "${DOCKERD_ROOT:-}" ]; then
    mkdir -p "$DOCKERD_ROOT"
    DOCKERD_ROOT="$(cd "$DOCKERD_ROOT" && pwd)"
    export DOCKER_HOST="${DOCKER_HOST:-unix://$DOCKERD_ROOT/docker.sock}"
    [ "$DOCKER_HOST" = "unix://$DOCKERD_ROOT/docker.sock" ] \
        || { printf 'docker-engine: DOCKER_HOST=%s does not match DOCKERD_ROOT=%s\n' "$DOCKER_HOST" "$DOCKERD_ROOT" >&2; exit 1; }
    LOG="${DOCKERD_LOG:-$DOCKERD_ROOT/dockerd.log}"
    PIDFILE="$DOCKERD_ROOT/docker.pid"
    DOCKERD_ARGS=(--data-root "$DOCKERD_ROOT/data" --exec-root "$DOCKERD_ROOT/exec" --pidfile "$PIDFILE"
                  -H "$DOCKER_HOST")
    WRAP=(unshare --net --mount --propagation private)
else
    LOG="${DOCKERD_LOG:-/var/log/dockerd.log}"
    PIDFILE=/var/run/docker.pid
fi

T0="$EPOCHREALTIME"
say() { printf 'docker-engine: %s\n' "$*" >&2; }
since() { local a="$1" b="$EPOCHREALTIME"; LC_ALL=C awk -v a="${a/,/.}" -v b="${b/,/.}" 'BEGIN { printf "%.1f", b - a }'; }

engine_up() { docker info >/dev/null 2>&1; }

alive() {  # a process that exists and is not a zombie
    local stat
    { read -r stat <"/proc/$1/stat"; } 2>/dev/null || return 1
    stat="${stat##*) }"
    [ "${stat%% *}" != Z ]
}

# Pid of the dockerd this script is about: the one named by its pid file; for the machine's
# engine, any process called dockerd (one dockerd only).  Reads /proc, no pgrep.
dockerd_pid() {
    local pid="" name c
    { read -r pid <"$PIDFILE" || true; } 2>/dev/null   # a pid file has no final newline
    if [ -n "$pid" ] \
        && { read -r name <"/proc/$pid/comm"; } 2>/dev/null && [ "$name" = dockerd ]; then
        printf '%s\n' "$pid"; return 0
    fi
    [ -z "${DOCKERD_ROOT:-}" ] || return 1
    for c in /proc/[0-9]*/comm; do
        if { read -r name <"$c"; } 2>/dev/null && [ "$name" = dockerd ]; then
            c="${c#/proc/}"; printf '%s\n' "${c%/comm}"; return 0
        fi
    done
    return 1
}

# Close every descriptor above 2 in the current (sub)shell: for the daemon we exec next.
close_inherited_fds() {
    local fd
    for fd in /proc/"$BASHPID"/fd/*; do
        fd="${fd##*/}"
        if [ "$fd" -gt 2 ] 2>/dev/null; then eval "exec $fd>&-" 2>/dev/null || true; fi
    done
}

if command -v docker >/dev/null 2>&1 && engine_up; then
    exit 0
fi

SUDO=()
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO=(sudo); else
        say "not root and no sudo: cannot install or start dockerd"; exit 1
    fi
fi

if ! command -v dockerd >/dev/null 2>&1; then
    say "installing docker.io (Debian's engine; ~15 s)"
    t=$EPOCHREALTIME
    export DEBIAN_FRONTEND=noninteractive
    if ! "${SUDO[@]}" apt-get install -y --no-install-recommends docker.io >/tmp/docker-engine-apt.log 2>&1; then
        say "apt-get install failed, refreshing package lists once"
        "${SUDO[@]}" apt-get update >>/tmp/docker-engine-apt.log 2>&1 || true
        "${SUDO[@]}" apt-get install -y --no-install-recommends docker.io >>/tmp/docker-engine-apt.log 2>&1 || {
            tail -20 /tmp/docker-engine-apt.log >&2; say "could not install docker.io"; exit 1; }
    fi
    say "docker.io installed in $(since "$t") s"
fi
if ! command -v docker >/dev/null 2>&1; then
    say "docker CLI missing after install"; exit 1
fi

started=""
if pid="$(dockerd_pid)"; then
    say "dockerd already running (pid $pid); waiting for it to answer"
else
    say "starting dockerd (log: $LOG)"
    # setsid: the daemon outlives this script and the shell or test session that ran it.
    ( close_inherited_fds
      exec "${SUDO[@]}" setsid nohup "${WRAP[@]}" dockerd "${DOCKERD_ARGS[@]}" >>"$LOG" 2>&1 </dev/null ) &
    started=$!
fi

end=$(( $(date +%s) + DEADLINE_S ))
while ! engine_up; do
    if [ "$(date +%s)" -ge "$end" ]; then
        say "engine did not answer within ${DEADLINE_S}s; last lines of $LOG:"
        tail -20 "$LOG" >&2 2>/dev/null || true
        exit 1
    fi
    if [ -n "$started" ] && ! alive "$started" && ! dockerd_pid >/dev/null; then
        rc=0; wait "$started" || rc=$?
        say "dockerd exited (status $rc); last lines of $LOG:"
        tail -20 "$LOG" >&2 2>/dev/null || true
        exit 1
    fi
    if [ -z "$started" ] && ! dockerd_pid >/dev/null; then
        say "the running dockerd exited before answering; last lines of $LOG:"
        tail -20 "$LOG" >&2 2>/dev/null || true
        exit 1
    fi
    sleep 0.2
done
say "engine ready in $(since "$T0") s (dockerd pid $(dockerd_pid || echo '?'), $(docker version --format '{{.Server.Version}}' 2>/dev/null || echo '?'))"
