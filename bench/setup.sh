#!/usr/bin/env bash
# Install what `make bench` needs, idempotently:
#   * the project venv (.venv) with supervise itself (editable) if it is not there yet;
#   * gunicorn and uWSGI into that venv (bench/requirements.txt; pip compiles uWSGI with gcc against
#     the venv's Python, which needs its headers: they come with pyenv/python.org builds, Debian's
#     system python needs python3-dev);
#   * wrk from Debian (apt-get, as root) for the raw-throughput runs; bench/run.py skips wrk without it.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
if [ ! -x .venv/bin/supervise ]; then
    .venv/bin/pip install -q -e .
fi
if ! .venv/bin/python -c "import gunicorn" 2>/dev/null || [ ! -x .venv/bin/uwsgi ]; then
    if ! .venv/bin/pip install -q -r bench/requirements.txt; then
        echo "bench/setup.sh: could not install uWSGI (needs gcc and Python headers); continuing with gunicorn" >&2
        .venv/bin/pip install -q "gunicorn>=23"
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
echo "bench/setup.sh: gunicorn $(.venv/bin/gunicorn --version 2>/dev/null | sed 's/[^0-9.]//g'), "\
"uwsgi $(.venv/bin/uwsgi --version 2>/dev/null || echo missing), $(command -v wrk >/dev/null && echo wrk ok || echo no wrk)"
