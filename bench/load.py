#!/usr/bin/env python3
"""Closed-loop HTTP/1.1 load generator that classifies every failed request.

    python bench/load.py --port 8000 --duration 10 --procs 2 --conns 8 [--close] --out result.json

`--procs` processes each drive `--conns` non-blocking raw-socket connections
from one `selectors` loop: send `GET /`, read one response, check it, repeat.
With keep-alive (the default) a connection is reused until the server says
`Connection: close` (or answers HTTP/1.0); with `--close` every request opens a
new connection and sends `Connection: close`.

Every request ends in exactly one outcome:

    ok                    200, Content-Length honoured, body `hello from VERSION`
    refused               connect() got ECONNREFUSED
    connect_error:ERRNO   connect() failed otherwise
    connect_timeout       no connection within --timeout
    reset                 ECONNRESET / EPIPE while sending or reading
    eof                   the server closed the connection before a complete response
    timeout               no complete response within --timeout
    bad_status:NNN        a complete response whose status is not 200
    bad_body              200 but the body is not `hello from VERSION`
    bad_response          unparseable status line or headers

Failures on a connection that had already carried a response are tagged
`/reused` (e.g. `eof/reused`): the server closed a keep-alive connection while
our next request was in flight, which HTTP clients commonly retry for idempotent
requests.  Failures on a new connection are tagged `/fresh`.  After a failure
the connection waits --error-backoff before its next attempt, so a dead server
produces a bounded number of failures rather than a busy loop.

The run is bounded in time (--duration, plus --timeout for in-flight requests
that are then abandoned, not counted) and in count (--max-requests per process).
Requests still in flight when the time is up are neither successes nor failures.

Only loopback addresses are accepted as targets.

All times are `time.monotonic()` (CLOCK_MONOTONIC, the same clock in every
process on Linux), so the caller can line up its own events (e.g. the moment it
sent SIGHUP) with `versions[V].first_seen`.
"""

from __future__ import annotations

import argparse
import array
import errno
import ipaddress
import json
import multiprocessing as mp
import selectors
import socket
import sys
import time

EV_READ = selectors.EVENT_READ
EV_WRITE = selectors.EVENT_WRITE

CONNECTING, WAITING_RESPONSE, IDLE = 0, 1, 2
MAX_HEAD = 65536
MAX_ERROR_SAMPLES = 2000


class Conn:
    __slots__ = ("sock", "state", "t_start", "deadline", "buf", "reused", "head_len", "body_len",
                 "close_after", "next_at", "status")

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.state = IDLE
        self.t_start = 0.0
        self.deadline = 0.0
        self.buf = b""
        self.reused = False
        self.head_len = -1
        self.body_len = -1
        self.close_after = False
        self.next_at = 0.0
        self.status = b""


def worker(idx: int, args: argparse.Namespace, queue: "mp.Queue") -> None:
    host, port = args.host, args.port
    keepalive = not args.close
    request = (f"GET {args.path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: supervise-bench\r\n"
               + ("" if keepalive else "Connection: close\r\n") + "\r\n").encode()
    req_len = len(request)
    timeout = args.timeout
    backoff = args.error_backoff
    pause = args.pause
    max_requests = args.max_requests
    start_at = args.start_at or time.monotonic()
    end_at = start_at + args.duration

    sel = selectors.DefaultSelector()
    mono = time.monotonic
    lat = array.array("d")
    ok = 0
    attempts = 0
    errors: dict[str, int] = {}
    samples: list[tuple[float, str]] = []
    stale = [0]  # keep-alive connections found closed before reuse (not failures: nothing was sent)
    versions: dict[str, list] = {}  # version -> [first_seen, last_seen, count]
    nbuckets = int(args.duration) + 2
    tl_ok = [0] * nbuckets
    tl_err = [0] * nbuckets

    def fail(c: Conn, kind: str, now: float) -> None:
        kind = f"{kind}/{'reused' if c.reused else 'fresh'}"
        errors[kind] = errors.get(kind, 0) + 1
        if len(samples) < MAX_ERROR_SAMPLES:
            samples.append((now, kind))
        b = int(now - start_at)
        if 0 <= b < nbuckets:
            tl_err[b] += 1
        drop(c)
        c.next_at = now + backoff
        pending.append(c)

    def drop(c: Conn) -> None:
        if c.sock is not None:
            try:
                sel.unregister(c.sock)
            except (KeyError, ValueError):
                pass
            c.sock.close()
            c.sock = None
        c.state = IDLE
        c.reused = False

    def start_request(c: Conn, now: float) -> None:
        """Begin the next request on c: reuse its socket or open a new one."""
        nonlocal attempts
        attempts += 1
        c.t_start = now
        c.deadline = now + timeout
        c.buf = b""
        c.head_len = -1
        c.body_len = -1
        c.close_after = not keepalive
        if c.sock is not None:  # keep-alive reuse, after the staleness check every pooling client does
            try:
                peek = c.sock.recv(1, socket.MSG_PEEK)
            except BlockingIOError:
                peek = None
            except OSError:
                peek = b""
            if peek is None:
                c.reused = True
                send(c, now)
                return
            stale[0] += 1  # closed by the server while idle (or junk after the response): reconnect
            drop(c)
        c.reused = False
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.sock = s
        rc = s.connect_ex((host, port))
        if rc in (0, errno.EINPROGRESS):
            c.state = CONNECTING
            sel.register(s, EV_WRITE, c)
        else:
            fail(c, "refused" if rc == errno.ECONNREFUSED else f"connect_error:{errno.errorcode.get(rc, rc)}", now)

    def send(c: Conn, now: float) -> None:
        try:
            n = c.sock.send(request)
        except (ConnectionResetError, BrokenPipeError):
            fail(c, "reset", now)
            return
        except OSError as exc:
            fail(c, f"send_error:{errno.errorcode.get(exc.errno, exc.errno)}", now)
            return
        if n != req_len:  # a ~80-byte request into an empty socket buffer: never partial in practice
            fail(c, "send_partial", now)
            return
        if c.state == CONNECTING:
            sel.modify(c.sock, EV_READ, c)
        c.state = WAITING_RESPONSE

    def on_connected(c: Conn, now: float) -> None:
        err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            fail(c, "refused" if err == errno.ECONNREFUSED else f"connect_error:{errno.errorcode.get(err, err)}",
                 now)
            return
        send(c, now)

    def on_readable(c: Conn, now: float) -> None:
        try:
            data = c.sock.recv(65536)
        except ConnectionResetError:
            fail(c, "reset", now)
            return
        except OSError as exc:
            fail(c, f"recv_error:{errno.errorcode.get(exc.errno, exc.errno)}", now)
            return
        if not data:
            if c.head_len >= 0 and c.body_len == -2:  # body delimited by close
                finish(c, now)
                return
            fail(c, "eof", now)
            return
        buf = c.buf + data if c.buf else data
        c.buf = buf
        if c.head_len < 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    fail(c, "bad_response", now)
                return
            if buf[:7] != b"HTTP/1." or buf[12:13] not in (b" ", b"\r"):
                fail(c, "bad_response", now)
                return
            c.status = buf[9:12]
            head = buf[:end].lower()
            c.head_len = end + 4
            i = head.find(b"\r\ncontent-length:")
            if i >= 0:
                j = head.find(b"\r\n", i + 2)
                try:
                    c.body_len = int(head[i + 17:j if j >= 0 else len(head)])
                except ValueError:
                    fail(c, "bad_response", now)
                    return
            elif b"\r\ntransfer-encoding:" in head:
                fail(c, "bad_response", now)  # the app always sets Content-Length
                return
            else:
                c.body_len = -2  # read until close
                c.close_after = True
            if (b"\r\nconnection: close" in head) or buf[7:8] == b"0":
                c.close_after = True
        if c.body_len >= 0 and len(buf) - c.head_len >= c.body_len:
            finish(c, now)

    def finish(c: Conn, now: float) -> None:
        nonlocal ok
        body = c.buf[c.head_len:] if c.body_len < 0 else c.buf[c.head_len:c.head_len + c.body_len]
        if c.status != b"200":
            fail(c, f"bad_status:{c.status.decode('latin-1')}", now)
            return
        if body[:11] != b"hello from " or body[-1:] != b"\n":
            fail(c, "bad_body", now)
            return
        ok += 1
        lat.append(now - c.t_start)
        b = int(now - start_at)
        if 0 <= b < nbuckets:
            tl_ok[b] += 1
        v = body[11:-1].decode("latin-1")
        rec = versions.get(v)
        if rec is None:
            versions[v] = [now, now, 1]
        else:
            rec[1] = now
            rec[2] += 1
        if c.close_after:
            drop(c)
        else:
            c.state = IDLE  # stays registered for EV_READ: an idle close is seen and handled
            c.reused = True
        if pause:
            c.next_at = now + pause
            pending.append(c)
        else:
            c.next_at = 0.0

    conns = [Conn() for _ in range(args.conns)]
    pending: list[Conn] = []  # waiting for next_at (pause or error backoff)
    delay = start_at - mono()
    if delay > 0:
        time.sleep(delay)
    now = mono()
    for c in conns:
        start_request(c, now)
    last_scan = now
    stopped_by = "duration"
    while True:
        now = mono()
        if now >= end_at:
            break
        if attempts >= max_requests:
            stopped_by = "max_requests"
            break
        wait = 0.05
        if pending:
            due = [c for c in pending if c.next_at <= now]
            if due:
                pending[:] = [c for c in pending if c.next_at > now]
                for c in due:
                    start_request(c, now)
            for c in pending:
                wait = min(wait, c.next_at - now)
        for key, mask in sel.select(max(wait, 0.0)):
            c = key.data
            state = c.state
            if state == WAITING_RESPONSE:
                on_readable(c, now := mono())
                if c.state != WAITING_RESPONSE and c.next_at == 0.0 and attempts < max_requests:
                    start_request(c, now)
            elif state == CONNECTING:
                on_connected(c, now := mono())
            elif c.sock is not None:  # idle keep-alive connection became readable: the server closed it
                try:
                    data = c.sock.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    drop(c)
        if now - last_scan >= 0.1:
            last_scan = now
            for c in conns:
                if c.state != IDLE and now > c.deadline:
                    fail(c, "connect_timeout" if c.state == CONNECTING else "timeout", now)
    in_flight = [now - c.t_start for c in conns if c.state != IDLE]
    for c in conns:
        drop(c)
    sel.close()
    queue.put({
        "proc": idx,
        "ok": ok,
        "attempts": attempts,
        "errors": errors,
        "error_samples": samples,
        "versions": versions,
        "timeline_ok": tl_ok,
        "timeline_err": tl_err,
        "stopped_by": stopped_by,
        "stale_reconnects": stale[0],
        "in_flight_ages": in_flight,
        "latencies": lat.tobytes(),
    })


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, int(round(q / 100.0 * (len(sorted_values) - 1)))))
    return sorted_values[k]


def run(args: argparse.Namespace) -> dict:
    ip = ipaddress.ip_address(socket.gethostbyname(args.host))
    if not ip.is_loopback:
        raise SystemExit(f"refusing to send load to non-loopback address {ip}")
    args.host = str(ip)
    if not args.start_at:
        args.start_at = time.monotonic() + 0.2
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(i, args, queue), daemon=True) for i in range(args.procs)]
    for p in procs:
        p.start()
    results = []
    hard_deadline = args.start_at + args.duration + args.timeout + 30
    while len(results) < len(procs):
        try:
            results.append(queue.get(timeout=max(0.1, hard_deadline - time.monotonic())))
        except Exception:
            break
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
    lat = array.array("d")
    errors: dict[str, int] = {}
    versions: dict[str, list] = {}
    nb = int(args.duration) + 2
    tl_ok, tl_err = [0] * nb, [0] * nb
    samples = []
    in_flight: list[float] = []
    stale = 0
    for r in results:
        in_flight.extend(r["in_flight_ages"])
        stale += r["stale_reconnects"]
        part = array.array("d")
        part.frombytes(r["latencies"])
        lat.extend(part)
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
        for v, (first, last, count) in r["versions"].items():
            cur = versions.get(v)
            if cur is None:
                versions[v] = [first, last, count]
            else:
                versions[v] = [min(cur[0], first), max(cur[1], last), cur[2] + count]
        for i in range(nb):
            tl_ok[i] += r["timeline_ok"][i]
            tl_err[i] += r["timeline_err"][i]
        samples.extend(r["error_samples"])
    values = sorted(lat)
    ok = len(values)
    failed = sum(errors.values())
    out = {
        "host": args.host,
        "port": args.port,
        "keepalive": not args.close,
        "procs": args.procs,
        "conns_per_proc": args.conns,
        "start_at": args.start_at,
        "duration": args.duration,
        "processes_reported": len(results),
        "stopped_by": sorted({r["stopped_by"] for r in results}),
        "ok": ok,
        "failed": failed,
        "errors": dict(sorted(errors.items())),
        "rps": ok / args.duration,
        "latency_ms": {
            "p50": percentile(values, 50) * 1000,
            "p90": percentile(values, 90) * 1000,
            "p99": percentile(values, 99) * 1000,
            "max": (values[-1] * 1000) if values else float("nan"),
            "mean": (sum(values) / ok * 1000) if ok else float("nan"),
        },
        "stale_reconnects": stale,
        "in_flight_at_end": len(in_flight),
        "in_flight_max_age_ms": max(in_flight, default=0.0) * 1000,
        "versions": {v: {"first_seen": f, "last_seen": l, "count": c} for v, (f, l, c) in versions.items()},
        "timeline_ok": tl_ok,
        "timeline_err": tl_err,
        "error_samples": sorted(samples)[:MAX_ERROR_SAMPLES],
    }
    if len(results) < len(procs):
        out["errors"]["load_process_lost"] = len(procs) - len(results)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1", help="loopback address (default 127.0.0.1)")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--path", default="/")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds of load (default 10)")
    ap.add_argument("--procs", type=int, default=2, help="client processes (default 2)")
    ap.add_argument("--conns", type=int, default=8, help="connections per process (default 8)")
    ap.add_argument("--close", action="store_true", help="one connection per request")
    ap.add_argument("--timeout", type=float, default=5.0, help="per-request timeout in seconds (default 5)")
    ap.add_argument("--error-backoff", type=float, default=0.01,
                    help="seconds a connection waits after a failure (default 0.01)")
    ap.add_argument("--pause", type=float, default=0.0, help="seconds between requests on a connection")
    ap.add_argument("--max-requests", type=int, default=5_000_000, help="per process (default 5,000,000)")
    ap.add_argument("--start-at", type=float, default=0.0, help="time.monotonic() at which to start")
    ap.add_argument("--out", help="write the JSON result here (default: stdout)")
    args = ap.parse_args(argv)
    if args.duration <= 0 or args.duration > 3600:
        ap.error("--duration must be in (0, 3600]")
    result = run(args)
    text = json.dumps(result, indent=1)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
        summary = {k: result[k] for k in ("ok", "failed", "rps", "errors", "latency_ms", "stale_reconnects",
                                          "in_flight_at_end", "in_flight_max_age_ms")}
        print(json.dumps(summary))
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
