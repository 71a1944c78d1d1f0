#!/usr/bin/env bash
# Build and run the supervise container image without a registry.
#
#   scripts/image.sh build        engine, local base image, wheelhouse, `docker build` (skips work already done)
#   scripts/image.sh base         only the base image (localbase/python:bookworm via mmdebstrap)
#   scripts/image.sh wheels       only the wheelhouse (project wheel + dependency wheels)
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
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
IMAGE="${SUPERVISE_IMAGE:-supervise:latest}"
BASE="${SUPERVISE_BASE:-localbase/python:bookworm}"
CACHE="${SUPERVISE_CACHE:-/var/cache/supervise}"
PYVER="${SUPERVISE_PYVER:-3.11}"
SUITE=bookworm
# Fixed epoch (2025-05-20): the rootfs tarball is byte-identical across builds.
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-1747699200}"
EXAMPLE_IMAGE="${SUPERVISE_EXAMPLE_IMAGE:-supervise-example:latest}"
DEMO_NAME="${DEMO_NAME:-supervise-demo}"
DEMO_PORT="${DEMO_PORT:-8080}"
DEMO_HEALTH_PORT="${DEMO_HEALTH_PORT:-8081}"

say() { printf 'image: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

host_python() {
    if [ -x "$REPO/.venv/bin/python" ]; then echo "$REPO/.venv/bin/python"; else command -v python3; fi
}

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

# ----------------------------------------------------------------------------- base image
# Bookworm entries of the host's deb822 sources (read at run time; no mirror is hard-coded).
host_sources() {
    "$(host_python)" - "$SUITE" <<'PY'
import glob, sys
suite = sys.argv[1]
out = []
for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    text = open(path, encoding="utf-8").read()
    for block in text.split("\n\n"):
        fields, key = {}, None
        for line in block.splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if line[0] in " \t" and key:
                fields[key] += "\n" + line
                continue
            key, _, value = line.partition(":")
            key = key.strip()
            fields[key] = value.strip()
        if not fields or fields.get("Enabled", "yes").lower() == "no":
            continue
        if "deb" not in fields.get("Types", "").split():
            continue
        suites = [s for s in fields.get("Suites", "").split() if s == suite or s.startswith(suite + "-")]
        if not suites:
            continue
        fields["Types"] = "deb"
        fields["Suites"] = " ".join(suites)
        out.append("\n".join(f"{k}: {v}" for k, v in fields.items()))
if not out:
    sys.exit(f"no deb822 entries for {suite} in /etc/apt/sources.list.d/*.sources")
print("\n\n".join(out))
PY
}

ensure_base() {
    if image_exists "$BASE"; then
        say "base $BASE present"
        return
    fi
    case "$BASE" in
        localbase/*) ;;
        *) die "base image $BASE is missing and only localbase/* can be built here (docker pull $BASE first)";;
    esac
    mkdir -p "$CACHE"
    local packages="python3,python3-venv"
    local sources aptopts key tarball
    sources="$(host_sources)" || die "cannot read the host's apt sources"
    # Options the host's mirror needs (proxy, snapshot validity), carried over as-is.
    aptopts="$(apt-config dump | grep -E '^Acquire::(Check-Valid-Until|Check-Date|http::Proxy|https::Proxy) ' || true)"
    key="$(printf '%s\n%s\n%s\n%s\n' "$SUITE" "$packages" "$sources" "$SOURCE_DATE_EPOCH" | sha256sum | cut -c1-12)"
    tarball="$CACHE/rootfs-$SUITE-$key.tar"
    if [ ! -s "$tarball" ]; then
        command -v mmdebstrap >/dev/null 2>&1 || {
            say "installing mmdebstrap"
            DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends mmdebstrap >/dev/null \
                || { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends mmdebstrap >/dev/null; } \
                || die "cannot install mmdebstrap"
        }
        local srcfile args=()
        srcfile="$(mktemp "$CACHE/sources.XXXXXX")"
        printf '%s\n' "$sources" >"$srcfile"
        while IFS= read -r opt; do [ -n "$opt" ] && args+=("--aptopt=$opt"); done <<<"$aptopts"
        say "building $SUITE rootfs with mmdebstrap (cold: ~30 s) -> $tarball"
        local t0=$SECONDS
        mmdebstrap --mode=root --variant=minbase --include="$packages" \
            --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
            --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
            --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
            "${args[@]}" --format=tar "$SUITE" "$tarball.part" "$srcfile" >"$CACHE/mmdebstrap.log" 2>&1 \
            || { rm -f "$srcfile" "$tarball.part"; tail -30 "$CACHE/mmdebstrap.log" >&2; die "mmdebstrap failed (log: $CACHE/mmdebstrap.log)"; }
        rm -f "$srcfile"
        mv "$tarball.part" "$tarball"
        say "rootfs built in $((SECONDS - t0)) s ($(du -h "$tarball" | cut -f1))"
    else
        say "re-importing cached rootfs $tarball"
    fi
    docker import -c 'ENV LANG=C.UTF-8' -c 'CMD ["python3"]' "$tarball" "$BASE" >/dev/null
    say "imported $BASE"
}

# ----------------------------------------------------------------------------- wheelhouse
CTX="$CACHE/context"

tree_hash() {  # content hash of the given files/dirs (python sources, metadata), order-stable
    (cd "$REPO" && find "$@" -type f \( -name '*.py' -o -name '*.toml' -o -name '*.cfg' -o -name '*.md' -o -name '*.txt' -o -name '*.typed' -o -name 'LICENSE*' \) \
        -not -path '*/__pycache__/*' 2>/dev/null | LC_ALL=C sort | xargs -r sha256sum | sha256sum | cut -c1-16)
}

ensure_wheels() {
    mkdir -p "$CTX/wheels/project" "$CTX/wheels/deps"
    local py arch
    py="$(host_python)"
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
}

sync_file() {  # copy only when content differs (keeps the context stable)
    cmp -s "$1" "$2" 2>/dev/null || cp "$1" "$2"
}

# ----------------------------------------------------------------------------- build
build() {
    "$REPO/scripts/docker-engine.sh"
    local t0=$SECONDS
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
    docker build --build-arg "BASE=$BASE" --label "org.opencontainers.image.version=$version" \
        -t "$IMAGE" "$CTX" >"$CACHE/build.log" 2>&1 \
        || { tail -40 "$CACHE/build.log" >&2; die "docker build failed (log: $CACHE/build.log)"; }
    if [ -n "$previous" ] && [ "$previous" != "$(docker image inspect -f '{{.Id}}' "$IMAGE")" ]; then
        docker rmi "$previous" >/dev/null 2>&1 || true   # our own now-untagged image (kept if a container uses it)
        # Keep the current build stage (the layer cache) under a tag, drop the superseded ones.
        docker build --quiet --target venv --build-arg "BASE=$BASE" -t "${IMAGE%:*}-buildstage:latest" "$CTX" >/dev/null 2>&1 \
            && docker image prune --force --filter label=org.supervise.stage=venv >/dev/null 2>&1 || true
    fi
    say "built $IMAGE ($(docker image inspect -f '{{.Id}}' "$IMAGE" | cut -c8-19), supervise $version) in $((SECONDS - t0)) s"
}

build_example() {
    build
    local previous
    previous="$(docker image inspect -f '{{.Id}}' "$EXAMPLE_IMAGE" 2>/dev/null || true)"
    docker build --build-arg "BASE_IMAGE=$IMAGE" -t "$EXAMPLE_IMAGE" "$REPO/images/example" >"$CACHE/example-build.log" 2>&1 \
        || { tail -40 "$CACHE/example-build.log" >&2; die "docker build of the example failed"; }
    if [ -n "$previous" ] && [ "$previous" != "$(docker image inspect -f '{{.Id}}' "$EXAMPLE_IMAGE")" ]; then
        docker rmi "$previous" >/dev/null 2>&1 || true
    fi
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
    demo_stop
    docker run -d --name "$DEMO_NAME" --label supervise.demo=1 \
        -v "$REPO/images/example/app:/app:ro" \
        -p "127.0.0.1:$DEMO_PORT:8000" -p "127.0.0.1:$DEMO_HEALTH_PORT:8001" \
        "$IMAGE" app:application >/dev/null
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

lock() {  # one build at a time per cache dir (tests and people may run this concurrently)
    mkdir -p "$CACHE"
    exec 9>"$CACHE/.lock"
    if ! flock --nonblock 9; then
        say "waiting for another scripts/image.sh run to finish"
        flock --timeout 900 9 || die "timed out waiting for $CACHE/.lock"
    fi
}

case "${1:-build}" in
    build|base|wheels|example|demo) lock ;;
esac
case "${1:-build}" in
    build) build ;;
    base) "$REPO/scripts/docker-engine.sh"; ensure_base ;;
    wheels) ensure_wheels ;;
    example) build_example ;;
    demo) demo ;;
    demo-stop) demo_stop ;;
    -h|--help|help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//' ;;
    *) die "unknown command ${1}; see scripts/image.sh --help" ;;
esac
