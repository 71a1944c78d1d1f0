"""A small WSGI service to try supervise with (and what tests/docker/ runs).

    /                    hello
    /version             VERSION from version.py (edit it: the watcher or `docker kill -s HUP` reloads)
    /pid                 the worker's pid
    /slow?s=3            sleeps s seconds (max 60), then answers; logs `example_slow_begin` first
    /spawn-orphans?n=3&linger=0.5
                         forks n children that each fork a grandchild and exit at once: the
                         grandchildren are re-parented to PID 1 and exit `linger` seconds later.
                         Without a reaping PID 1 they stay zombies. Answers their pids as JSON.
"""

import json
import os
import time
from urllib.parse import parse_qs

from version import VERSION

STARTED = time.time()


def _event(event, **fields):
    # One JSON line on the container's stdout, next to supervise's own events.
    line = json.dumps({"event": event, "pid": os.getpid(), **fields}) + "\n"
    os.write(1, line.encode())


def _spawn_orphans(n, linger):
    pids = []
    for _ in range(n):
        read_end, write_end = os.pipe()
        child = os.fork()
        if child == 0:  # child: fork the grandchild, report its pid, exit at once
            try:
                os.close(read_end)
                grandchild = os.fork()
                if grandchild == 0:
                    os.close(write_end)
                    time.sleep(linger)
                    os._exit(0)
                os.write(write_end, str(grandchild).encode())
            finally:
                os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            pids.append(int(pipe.read() or 0))
        os.waitpid(child, 0)  # our own child is reaped; the grandchild is now an orphan
    return pids


def application(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    query = parse_qs(environ.get("QUERY_STRING", ""))
    status, ctype = "200 OK", "text/plain; charset=utf-8"
    if path == "/":
        body = "hello from the supervise example\n"
    elif path == "/version":
        body = VERSION + "\n"
    elif path == "/pid":
        body = f"{os.getpid()}\n"
    elif path == "/slow":
        seconds = min(float(query.get("s", ["3"])[0]), 60.0)
        _event("example_slow_begin", seconds=seconds)
        time.sleep(seconds)
        body = f"slept {seconds:g}\n"
    elif path == "/spawn-orphans":
        n = min(int(query.get("n", ["3"])[0]), 50)
        linger = min(float(query.get("linger", ["0.5"])[0]), 30.0)
        pids = _spawn_orphans(n, linger)
        _event("example_orphans", pids=pids, linger=linger)
        body, ctype = json.dumps({"orphans": pids, "linger": linger}) + "\n", "application/json"
    else:
        status, body = "404 Not Found", "not found\n"
    data = body.encode()
    start_response(status, [("Content-Type", ctype), ("Content-Length", str(len(data)))])
    return [data]
