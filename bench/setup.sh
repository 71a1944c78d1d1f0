#!/usr/bin/env bash
# Install what `make bench` needs, idempotently:
#   * the project venv (.venv) with supervise itself (editable) if it is not there yet; supervise runs from it;
#   * a separate venv for the servers supervise is compared with, .venv-bench, holding bench/requirements.txt:
#     gunicorn, uWSGI, Granian and uvicorn[standard] (pip compiles uWSGI with gcc against the venv's Python,
#     which needs its headers: they come with pyenv/python.org builds, Debian's system python needs
#     python3-dev).  Reinstalled only when bench/requirements.txt is newer than the last install or a server
#     is missing;
#   * wrk from Debian (apt-get, as root) for the raw-throughput runs; bench/run.py skips wrk without it.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
BENCH_VENV=.venv-bench
STAMP=$BENCH_VENV/.installed

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
if [ ! -x .venv/bin/supervise ]; then
    .venv/bin/pip install -q -e .
fi

bench_venv_complete() {
    [ -f "$STAMP" ] && [ ! bench/requirements.txt -nt "$STAMP" ] || return 1
    for exe in gunicorn uwsgi granian uvicorn; do
        [ -x "$BENCH_VENV/bin/$exe" ] || return 1
    done
    "$BENCH_VENV/bin/python" -c "import httptools, uvloop" 2>/dev/null
}

if ! bench_venv_complete; then
    if [ ! -x "$BENCH_VENV/bin/python" ]; then
        "$PYTHON" -m venv "$BENCH_VENV"
    fi
    "$BENCH_VENV/bin/python" -m pip install -q --upgrade pip
    if "$BENCH_VENV/bin/python" -m pip install -q -r bench/requirements.txt; then
        touch "$STAMP"
    else
        # No stamp: the next run tries again.
        echo "bench/setup.sh: could not install everything (uWSGI needs gcc and Python headers);" \
             "installing the others without uWSGI" >&2
        grep -iv '^uwsgi' bench/requirements.txt > "$BENCH_VENV/requirements-no-uwsgi.txt"
        "$BENCH_VENV/bin/python" -m pip install -q -r "$BENCH_VENV/requirements-no-uwsgi.txt"
    fi
fi

if ! command -v wrk >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get -o DPkg::Lock::Timeout=300 update -qq
        DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq wrk >/dev/null
    else
        echo "bench/setup.sh: wrk missing (apt-get install wrk); bench/run.py will skip the wrk runs" >&2
    fi
fi

version() {  # version NAME ARGS...: the version an executable of .venv-bench reports, or "missing"
    local exe=$BENCH_VENV/bin/$1 out=""
    shift
    if [ -x "$exe" ]; then
        out=$("$exe" "$@" 2>/dev/null || true)
    fi
    out=$(printf '%s\n' "$out" | sed -nE 's/^[^0-9]*([0-9]+(\.[0-9]+)+).*/\1/p' | sed -n 1p)
    echo "${out:-missing}"
}
echo "bench/setup.sh: supervise in .venv; in $BENCH_VENV: gunicorn $(version gunicorn --version)," \
     "uwsgi $(version uwsgi --version), granian $(version granian --version), uvicorn $(version uvicorn --version);" \
     "$(command -v wrk >/dev/null && echo wrk ok || echo no wrk)"
