#!/usr/bin/env bash
# The fleet demo: supervise instances behind Consul DNS and HAProxy in the local Docker engine.
#   scripts/fleet.sh up | status | info | add-vm | down | build     (see docs/fleet.md)
# Needs a Docker engine (scripts/docker-engine.sh starts one) and python3 (standard library only).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
case "${1:-}" in
    up|build|add-vm) bash "$here/docker-engine.sh" ;;
esac
exec python3 "$here/fleet/fleet.py" "$@"
