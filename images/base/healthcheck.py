"""Docker HEALTHCHECK for supervise: GET /health on SUPERVISE_HEALTH_BIND.

Exit 0 when the master answers 200 (a generation is ready), 1 otherwise (503 once
shutdown began, no answer, ...). Standard library only: the image has no curl.
"""

import http.client
import os
import socket
import sys
import urllib.error
import urllib.request


def _get_unix(path: str, timeout: float) -> tuple[int, str]:
    conn = http.client.HTTPConnection("localhost", timeout=timeout)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(path)
    conn.sock = sock
    conn.request("GET", "/health", headers={"Connection": "close"})
    response = conn.getresponse()
    return response.status, response.read(4096).decode("utf-8", "replace")


def _get_tcp(bind: str, timeout: float) -> tuple[int, str]:
    host, _, port = bind.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "*"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    url = f"http://{host}:{int(port)}/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read(4096).decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:  # 503 and friends still carry the JSON state
        return exc.code, exc.read(4096).decode("utf-8", "replace")


def main() -> int:
    bind = os.environ.get("SUPERVISE_HEALTH_BIND", "").strip()
    if not bind:
        print("SUPERVISE_HEALTH_BIND is not set: no health endpoint to check")
        return 0
    timeout = float(os.environ.get("SUPERVISE_HEALTHCHECK_TIMEOUT", "2"))
    try:
        if bind.startswith("unix:"):
            status, body = _get_unix(bind[len("unix:"):], timeout)
        else:
            status, body = _get_tcp(bind, timeout)
    except (OSError, ValueError, http.client.HTTPException) as exc:
        print(f"health endpoint {bind} unreachable: {exc}")
        return 1
    print(f"{status} {body.strip()}")
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
