#!/usr/bin/env bash
# Build and run the supervise container image without a registry.
#
#   scripts/image.sh build        engine, local base image, wheelhouse, `docker build` (skips work already done)
#   scripts/image.sh engine       only the engine (scripts/docker-engine.sh)
#   scripts/image.sh base         only the base image (localbase/python:bookworm via mmdebstrap)
#   scripts/image.sh wheels       only the wheelhouse (project wheel + dependency wheels)
#   scripts/image.sh minbase      a true minimal bookworm (localbase/debian:bookworm-minbase: no python3,
#                                 make or procps), the "fresh machine" of tests/docker/test_fresh_machine.py
#   scripts/image.sh example      build + the prod-style example image (code COPYed in, images/example/Dockerfile)
#   scripts/image.sh demo         build + run the example with code bind-mounted from images/example/app
#   scripts/image.sh demo-stop    docker stop + rm the demo container
#
# Environment:
#   SUPERVISE_IMAGE      image to build                 (default supervise:latest)
#   SUPERVISE_BASE       base image, e.g. python:3.11-slim where a registry exists
#                                                        (default localbase/python:bookworm, built here)
#   SUPERVISE_CACHE      cache dir: base tarball, build context, stamps (default /var/cache/supervise)
#   SUPERVISE_PYVER      Python version of the base image, for the wheelhouse (default 3.11)
#   DEMO_NAME/DEMO_PORT/DEMO_HEALTH_PORT   demo container name and loopback ports (supervise-demo, 8080, 8081)
#   SUPERVISE_LOCK_TIMEOUT  seconds to wait for another run's build lock (default 900)
#   SUPERVISE_DEBIAN_MIRROR  Debian archive for the base image instead of the host's (scripts/lib/mirror.sh)
#   DOCKERD_ROOT / DOCKER_HOST  a private engine (see scripts/docker-engine.sh) / the engine to use
#
# Every step prints one line with its duration on stderr ("image: base image built in 31.2 s").
# One build at a time per cache dir: the build steps (not the engine start) run under a lock on
# $SUPERVISE_CACHE/.build.lock, and no process started here inherits it.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
IMAGE="${SUPERVISE_IMAGE:-supervise:latest}"
BASE="${SUPERVISE_BASE:-localbase/python:bookworm}"
CACHE="${SUPERVISE_CACHE:-/var/cache/supervise}"
PYVER="${SUPERVISE_PYVER:-3.11}"
SUITE=bookworm
LOCKFILE="$CACHE/.build.lock"
LOCK_TIMEOUT="${SUPERVISE_LOCK_TIMEOUT:-900}"
if [ -n "${DOCKERD_ROOT:-}" ]; then export DOCKER_HOST="${DOCKER_HOST:-unix://$(mkdir -p "$DOCKERD_ROOT" && cd "$DOCKERD_ROOT" && pwd)/docker.sock}"; fi
# shellcheck source=lib/mirror.sh
. "$REPO/scripts/lib/mirror.sh"
# Fixed epoch (2025-05-20): the rootfs tarball is byte-identical across builds.
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-1747699200}"
EXAMPLE_IMAGE="${SUPERVISE_EXAMPLE_IMAGE:-supervise-example:latest}"
MINBASE="${SUPERVISE_MINBASE:-localbase/debian:bookworm-minbase}"
DEMO_NAME="${DEMO_NAME:-supervise-demo}"
DEMO_PORT="${DEMO_PORT:-8080}"
DEMO_HEALTH_PORT="${DEMO_HEALTH_PORT:-8081}"

say() { printf 'image: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }
since() { local a="$1" b="$EPOCHREALTIME"; LC_ALL=C awk -v a="${a/,/.}" -v b="${b/,/.}" 'BEGIN { printf "%.1f", b - a }'; }

host_python() {
    if [ -x "$REPO/.venv/bin/python" ]; then echo "$REPO/.venv/bin/python"; else command -v python3; fi
}

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

# ----------------------------------------------------------------------------- base image
# The base image's apt sources: the host's own Debian archives (deb822 or one-line sources, any
# Debian release on the host) pointed at $SUITE, by scripts/lib/mirror.sh (shared with
# scripts/fetch-consul.sh).  No mirror is hard-coded.
host_sources() {
    mirror_sources "$SUITE" || { say "no Debian archive in $(mirror_where); set SUPERVISE_DEBIAN_MIRROR"; return 1; }
}

ensure_base() { ensure_localbase "$BASE" python python3,python3-venv; }

# A true minimal Debian (mmdebstrap minbase: no python3, make or procps), for the fresh-machine test.
ensure_minbase() { ensure_localbase "$MINBASE" minbase ""; }

ensure_localbase() {  # IMAGE FLAVOR PACKAGES: a localbase/* image from an mmdebstrap rootfs (cached)
    local image="$1" flavor="$2" packages="$3"
    local t0=$EPOCHREALTIME
    if image_exists "$image"; then
        say "base image $image present ($(since "$t0") s)"
        return
    fi
    case "$image" in
        localbase/*) ;;
        *) die "base image $image is missing and only localbase/* can be built here (docker pull $image first)";;
    esac
    mkdir -p "$CACHE"
    local sources aptopts key tarball
    sources="$(host_sources)" || die "cannot read the host's apt sources"
    # Options the host's mirror needs (proxy, snapshot validity, ...), carried over as-is.
    aptopts="$(mirror_aptopts)"
    key="$(printf '%s\n%s\n%s\n%s\n' "$SUITE" "$packages" "$sources" "$SOURCE_DATE_EPOCH" | sha256sum | cut -c1-12)"
    tarball="$CACHE/rootfs-$SUITE-$flavor-$key.tar"
    if [ ! -s "$tarball" ]; then
        command -v mmdebstrap >/dev/null 2>&1 || {
            say "installing mmdebstrap"
            local ti=$EPOCHREALTIME
            DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends mmdebstrap >/dev/null \
                || { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends mmdebstrap >/dev/null; } \
                || die "cannot install mmdebstrap"
            say "mmdebstrap installed in $(since "$ti") s"
        }
        local srcdir srcfile args=()
        # A fixed name: mmdebstrap copies it into the rootfs (/etc/apt/sources.list.d/0000debian.list).
        srcdir="$(mktemp -d "$CACHE/sources.XXXXXX")"
        srcfile="$srcdir/debian.list"
        printf '%s\n' "$sources" >"$srcfile"
        while IFS= read -r opt; do [ -n "$opt" ] && args+=("--aptopt=$opt"); done <<<"$aptopts"
        say "building the $SUITE rootfs with mmdebstrap (cold: ~30 s) -> $tarball"
        local tr=$EPOCHREALTIME
        [ -z "$packages" ] || args+=("--include=$packages")
        mmdebstrap --mode=root --variant=minbase \
            --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
            --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
            --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
            "${args[@]}" --format=tar "$SUITE" "$tarball.part" "$srcfile" >"$CACHE/mmdebstrap.log" 2>&1 \
            || { rm -rf "$srcdir" "$tarball.part"; tail -30 "$CACHE/mmdebstrap.log" >&2; die "mmdebstrap failed (log: $CACHE/mmdebstrap.log)"; }
        rm -rf "$srcdir"
        mv "$tarball.part" "$tarball"
        # Tarballs of superseded sources/packages are never read again.
        find "$CACHE" -maxdepth 1 \( -name "rootfs-$SUITE-$flavor-*.tar" -o -name "rootfs-$SUITE-????????????.tar" \) \
            ! -name "${tarball##*/}" -delete 2>/dev/null || true
        say "rootfs built in $(since "$tr") s ($(du -h "$tarball" | cut -f1))"
    else
        say "re-importing cached rootfs $tarball"
    fi
    local cmd='CMD ["python3"]'
    [ "$flavor" = python ] || cmd='CMD ["bash"]'
    docker import -c 'ENV LANG=C.UTF-8' -c "$cmd" "$tarball" "$image" >/dev/null
    say "base image $image built in $(since "$t0") s"
}

# ----------------------------------------------------------------------------- wheelhouse
CTX="$CACHE/context"

tree_hash() {  # content hash of the given files/dirs (python sources, metadata), order-stable
    (cd "$REPO" && find "$@" -type f \( -name '*.py' -o -name '*.toml' -o -name '*.cfg' -o -name '*.md' -o -name '*.txt' -o -name '*.typed' -o -name 'LICENSE*' \) \
        -not -path '*/__pycache__/*' 2>/dev/null | LC_ALL=C sort | xargs -r sha256sum | sha256sum | cut -c1-16)
}

ensure_wheels() {
    local t0=$EPOCHREALTIME
    mkdir -p "$CTX/wheels/project" "$CTX/wheels/deps"
    local py arch
    py="$(host_python)"
    "$py" -m pip --version >/dev/null 2>&1 || die "$py has no pip to build the wheelhouse: run \`make install\` first (it creates .venv)"
    arch="$(uname -m)"
    local srcs=(pyproject.toml supervisor)
    for f in setup.py setup.cfg README.md README.rst LICENSE MANIFEST.in; do [ -e "$REPO/$f" ] && srcs+=("$f"); done
    local proj_key deps_key
    proj_key="$(tree_hash "${srcs[@]}")"
    deps_key="$(printf '%s %s %s\n' "$(sha256sum "$REPO/pyproject.toml" | cut -c1-16)" "$PYVER" "$arch" | sha256sum | cut -c1-16)"

    if [ "$(cat "$CTX/.project-stamp" 2>/dev/null)" = "$proj_key" ] && ls "$CTX"/wheels/project/supervise-*.whl >/dev/null 2>&1; then
        say "project wheel up to date"
    else
        say "building the project wheel"
        # Build from a copy: keeps build/ and *.egg-info out of the shared checkout.
        local src="$CACHE/src"
        rm -rf "$src" && mkdir -p "$src"
        (cd "$REPO" && tar --exclude='__pycache__' --exclude='*.pyc' -cf - "${srcs[@]}") | tar -xf - -C "$src"
        [ -e "$src/README.md" ] || : >"$src/README.md"   # pyproject names it as readme
        rm -f "$CTX"/wheels/project/*.whl
        "$py" -m pip wheel --no-deps --wheel-dir "$CTX/wheels/project" "$src" >"$CACHE/wheel.log" 2>&1 \
            || { tail -30 "$CACHE/wheel.log" >&2; die "pip wheel failed (log: $CACHE/wheel.log)"; }
        echo "$proj_key" >"$CTX/.project-stamp"
    fi

    if [ "$(cat "$CTX/.deps-stamp" 2>/dev/null)" = "$deps_key" ] && ls "$CTX"/wheels/deps/*.whl >/dev/null 2>&1; then
        say "dependency wheels up to date"
    else
        say "downloading dependency wheels for cp${PYVER/./} $arch"
        local wheel
        wheel="$(ls "$CTX"/wheels/project/supervise-*.whl | head -1)"
        rm -f "$CTX"/wheels/deps/*.whl
        local plat=()
        for p in manylinux2014 manylinux_2_28 manylinux_2_36; do plat+=(--platform "${p}_${arch}"); done
        "$py" -m pip download --only-binary=:all: "${plat[@]}" \
            --python-version "$PYVER" --implementation cp --abi "cp${PYVER/./}" \
            --dest "$CTX/wheels/deps" "$wheel" >"$CACHE/download.log" 2>&1 \
            || { tail -30 "$CACHE/download.log" >&2; die "pip download failed (log: $CACHE/download.log)"; }
        rm -f "$CTX"/wheels/deps/supervise-*.whl   # the project wheel lives in wheels/project
        echo "$deps_key" >"$CTX/.deps-stamp"
    fi
    say "wheelhouse ready in $(since "$t0") s"
}

sync_file() {  # copy only when content differs (keeps the context stable)
    cmp -s "$1" "$2" 2>/dev/null || cp "$1" "$2"
}

# ----------------------------------------------------------------------------- build
engine() {  # outside the lock, and fd 9 closed for it: dockerd must never hold the build lock
    local t0=$EPOCHREALTIME
    "$REPO/scripts/docker-engine.sh" 9>&- || die "no Docker engine (scripts/docker-engine.sh failed)"
    say "engine ready in $(since "$t0") s"
}

build() {
    engine
    local t0=$EPOCHREALTIME
    lock
    ensure_base
    ensure_wheels
    sync_file "$REPO/images/base/Dockerfile" "$CTX/Dockerfile"
    sync_file "$REPO/images/base/healthcheck.py" "$CTX/healthcheck.py"
    printf 'wheels/*.part\n.*stamp*\n' >"$CTX/.dockerignore"
    local version
    version="$(ls "$CTX"/wheels/project/supervise-*.whl | head -1 | sed -E 's/.*supervise-([^-]+)-.*/\1/')"
    local previous
    previous="$(docker image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null || true)"
    say "docker build $IMAGE (FROM $BASE)"
    local tb=$EPOCHREALTIME
    docker build --build-arg "BASE=$BASE" --label "org.opencontainers.image.version=$version" \
        -t "$IMAGE" "$CTX" >"$CACHE/build.log" 2>&1 \
        || { tail -40 "$CACHE/build.log" >&2; die "docker build failed (log: $CACHE/build.log)"; }
    say "docker build done in $(since "$tb") s"
    if [ -n "$previous" ] && [ "$previous" != "$(docker image inspect -f '{{.Id}}' "$IMAGE")" ]; then
        docker rmi "$previous" >/dev/null 2>&1 || true   # our own now-untagged image (kept if a container uses it)
        # Keep the current build stage (the layer cache) under a tag, drop the superseded ones.
        docker build --quiet --target venv --build-arg "BASE=$BASE" -t "${IMAGE%:*}-buildstage:latest" "$CTX" >/dev/null 2>&1 \
            && docker image prune --force --filter label=org.supervise.stage=venv >/dev/null 2>&1 || true
    fi
    unlock
    say "built $IMAGE ($(docker image inspect -f '{{.Id}}' "$IMAGE" | cut -c8-19), supervise $version) in $(since "$t0") s"
}

build_example() {
    build
    lock
    local previous
    previous="$(docker image inspect -f '{{.Id}}' "$EXAMPLE_IMAGE" 2>/dev/null || true)"
    docker build --build-arg "BASE_IMAGE=$IMAGE" -t "$EXAMPLE_IMAGE" "$REPO/images/example" >"$CACHE/example-build.log" 2>&1 \
        || { tail -40 "$CACHE/example-build.log" >&2; die "docker build of the example failed"; }
    if [ -n "$previous" ] && [ "$previous" != "$(docker image inspect -f '{{.Id}}' "$EXAMPLE_IMAGE")" ]; then
        docker rmi "$previous" >/dev/null 2>&1 || true
    fi
    unlock
    say "built $EXAMPLE_IMAGE (code baked in; run: docker run --rm -p 127.0.0.1:8080:8000 $EXAMPLE_IMAGE)"
}

# ----------------------------------------------------------------------------- demo
demo_stop() {
    if docker container inspect "$DEMO_NAME" >/dev/null 2>&1; then
        [ "$(docker container inspect -f '{{index .Config.Labels "supervise.demo"}}' "$DEMO_NAME")" = "1" ] \
            || die "container $DEMO_NAME exists and is not a supervise demo; set DEMO_NAME"
        docker stop "$DEMO_NAME" >/dev/null || true
        docker rm "$DEMO_NAME" >/dev/null
        say "removed $DEMO_NAME"
    fi
}

demo() {
    build
    lock
    demo_stop
    docker run -d --name "$DEMO_NAME" --label supervise.demo=1 \
        -v "$REPO/images/example/app:/app:ro" \
        -p "127.0.0.1:$DEMO_PORT:8000" -p "127.0.0.1:$DEMO_HEALTH_PORT:8001" \
        "$IMAGE" app:application >/dev/null
    unlock
    local end=$((SECONDS + 30))
    until "$(host_python)" -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$DEMO_HEALTH_PORT/health', timeout=1)" 2>/dev/null; do
        if [ "$(docker container inspect -f '{{.State.Running}}' "$DEMO_NAME")" != true ] || [ $SECONDS -ge $end ]; then
            docker logs --tail 30 "$DEMO_NAME" >&2 || true
            die "the demo did not become ready"
        fi
        sleep 0.2
    done
    cat <<MSG
supervise demo is up: http://127.0.0.1:$DEMO_PORT/   (health: http://127.0.0.1:$DEMO_HEALTH_PORT/health)
  try:    curl http://127.0.0.1:$DEMO_PORT/version ; curl 'http://127.0.0.1:$DEMO_PORT/slow?s=3'
  logs:   docker logs -f $DEMO_NAME
  reload: edit images/example/app/*.py (the watcher reloads), or docker kill -s HUP $DEMO_NAME
  stop:   docker stop $DEMO_NAME   (graceful, exit 0)   then docker rm $DEMO_NAME
          or: scripts/image.sh demo-stop
MSG
}

# ----------------------------------------------------------------------------- lock
# One build at a time per cache dir (tests and people may run this concurrently).  The lock is
# held on fd 9 of this shell only around the build steps; the engine is started before it
# (with fd 9 closed), so no daemon can inherit it.

lock_openers() {  # pids with the lock file open (holders and waiters), this shell excluded
    find /proc/[0-9]*/fd -maxdepth 1 -lname "$LOCKFILE" 2>/dev/null | cut -d/ -f3 | sort -un | grep -vx "$$" || true
}

describe_pid() {
    local args
    args="$(tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | cut -c1-80)"
    printf 'pid %s (%s)' "$1" "${args% }"
}

is_image_run() { tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -q 'image\.sh'; }

lock() {
    mkdir -p "$CACHE"
    exec 9>"$LOCKFILE"
    flock --nonblock 9 && return 0
    exec 9>&-
    local t0=$EPOCHREALTIME end=$((SECONDS + LOCK_TIMEOUT)) strays=0 waited="" pids pid runs others
    while :; do
        pids="$(lock_openers)"
        runs=""; others=""
        for pid in $pids; do
            if is_image_run "$pid"; then runs+="${runs:+, }$(describe_pid "$pid")"; else others+="${others:+, }$(describe_pid "$pid")"; fi
        done
        if [ -n "$pids" ] && [ -z "$runs" ]; then
            # Held, and by no scripts/image.sh run: a process inherited the lock and will hold it
            # as long as it lives.  Waiting would only time out.
            strays=$((strays + 1))
            [ "$strays" -ge 3 ] && die "$LOCKFILE is held by $others, which is not a scripts/image.sh run: it inherited the lock from a build; stop that process (or set SUPERVISE_CACHE)"
        else
            strays=0
        fi
        [ "$SECONDS" -lt "$end" ] || die "timed out after ${LOCK_TIMEOUT} s waiting for $LOCKFILE (held by ${runs:-?}${others:+, $others})"
        [ -n "$waited" ] || { say "waiting for another scripts/image.sh run to finish (lock held by ${runs:-${others:-?}})"; waited=1; }
        sleep 0.5
        exec 9>"$LOCKFILE"
        flock --nonblock 9 && { say "build lock acquired after $(since "$t0") s"; return 0; }
        exec 9>&-
    done
}

unlock() { exec 9>&-; }

case "${1:-build}" in
    build) build ;;
    engine) engine ;;
    base) engine; lock; ensure_base; unlock ;;
    minbase) engine; lock; ensure_minbase; unlock ;;
    wheels) lock; ensure_wheels; unlock ;;
    example) build_example ;;
    demo) demo ;;
    demo-stop) demo_stop ;;
    -h|--help|help) sed -n '2,/^set -euo/p' "$0" | sed '$d'  | sed 's/^# \{0,1\}//' ;;
    *) die "unknown command ${1}; see scripts/image.sh --help" ;;
esac
