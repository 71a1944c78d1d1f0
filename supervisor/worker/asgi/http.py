"""One HTTP/1.1 client connection of the ASGI worker: an asyncio protocol.

Requests are parsed by `supervisor.worker.http.Connection` (httptools, with the same checks
and limits as the WSGI worker) in streaming mode: the app gets the body as it arrives, through
`receive()`, and the connection stops reading while the app has not taken what arrived
(`HIGH_WATER`), or while a pipelined request waits behind the one in flight.  Responses are
written through the transport; `send()` waits while the transport's buffer is over its high
mark (the client reads slowly), so a slow client holds only its own request.

Per connection, `phase` says what the worker waits for, and `deadline` until when (the worker
sweeps them):

    IDLE --first byte--> HEAD --head--> APP (body: --body-timeout per pause; write: --write-timeout)
      ^                                   |
      +------------ keep-alive -----------+--> LINGER (FIN sent, reading until the client's EOF)
"""

from __future__ import annotations

import asyncio
import re
import time
import traceback
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import httptools

from supervisor.worker import accesslog, forwarded
from supervisor.worker.http import REASONS, Connection, Request
from supervisor.worker.wsgi import SINGLETONS

if TYPE_CHECKING:
    from supervisor.worker.asgi.server import AsgiWorker

IDLE, HEAD, APP, LINGER, UPGRADED, PROXY = range(6)
HIGH_WATER = 64 * 1024  # request body bytes read ahead of the app before reading pauses
LINGER_TIME = 2.0  # how long a closing connection waits for the client's EOF
DRAIN_IDLE = 1.0  # while draining, an idle keep-alive connection is closed after this much quiet
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
ASGI = {"version": "3.0", "spec_version": "2.4"}
_VALUE = re.compile(rb"[^\x00-\x08\x0a-\x1f\x7f]*")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_NOT_FROM_APPS = frozenset((b"transfer-encoding", b"keep-alive", b"upgrade", b"proxy-connection", b"te",
                            b"trailer"))
_FORWARDING = frozenset((b"forwarded", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"))
_STATUS_LINES = {code: f"HTTP/1.1 {code} {reason}\r\n".encode() for code, reason in {
    **REASONS, 200: "OK", 201: "Created", 204: "No Content", 301: "Moved Permanently", 302: "Found",
    304: "Not Modified", 307: "Temporary Redirect", 308: "Permanent Redirect", 401: "Unauthorized",
    403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 409: "Conflict", 422: "Unprocessable Content",
    429: "Too Many Requests", 502: "Bad Gateway", 504: "Gateway Timeout"}.items()}


_SINGLETONS = frozenset((n[5:] if n.startswith("HTTP_") else n).lower().replace("_", "-").encode()
                        for n in SINGLETONS)
LENGTH, CONNECTION, DATE, REQUEST_ID = 1, 2, 3, 4
_KINDS = {b"content-length": LENGTH, b"connection": CONNECTION, b"date": DATE, b"x-request-id": REQUEST_ID}
HEAD_CACHE = 4096  # validated response header lines kept per worker


def _head_line(header: Any) -> tuple[bytes, int]:
    """One response header from the app, checked: its line and what kind it is."""
    try:
        name, value = header
    except (TypeError, ValueError):
        raise RuntimeError(f"a response header must be a [name, value] pair, not {header!r}") from None
    if not isinstance(name, bytes) or not isinstance(value, bytes):
        raise RuntimeError(f"response header {header!r}: name and value must be bytes")
    if not _TOKEN.fullmatch(name):
        raise RuntimeError(f"invalid response header name {name!r}")
    if not _VALUE.fullmatch(value):
        raise RuntimeError(f"response header {name!r} has a control character (CR, LF, NUL...)")
    lname = name.lower()
    if lname in _NOT_FROM_APPS:
        raise RuntimeError(f"the app must not set {name!r} (hop-by-hop, the server's business)")
    if lname == b"content-length" and not value.strip().isdigit():
        raise RuntimeError(f"invalid content-length from the app: {value!r}")
    return b"%b: %b\r\n" % (name, value), _KINDS.get(lname, 0)


class Cycle:
    """One request and its response."""

    __slots__ = ("conn", "req", "scope", "started", "status", "head_sent", "complete", "chunked", "head",
                 "length", "written", "close", "waiter", "body_done", "disconnected", "request_id",
                 "app_rid", "task", "status_line", "timed_out")

    def __init__(self, conn: HttpConn, req: Request, scope: dict[str, Any], started: float) -> None:
        self.conn = conn
        self.req = req
        self.scope = scope
        self.started = started
        self.status = 0
        self.head_sent = False
        self.complete = False
        self.chunked = False
        self.head = False  # a HEAD request: no body goes out
        self.length: int | None = None  # Content-Length the app set
        self.written = 0  # body bytes sent
        self.close = False
        self.waiter: asyncio.Future | None = None  # receive() waiting for body or disconnect
        self.body_done = False  # the app got the last piece of the body
        self.disconnected = False
        self.request_id: str | None = None
        self.app_rid = False
        self.task: asyncio.Task | None = None
        self.status_line: bytes | None = None  # the response head, held until the first body piece
        self.timed_out = False  # --request-timeout: cancelled by the worker

    # ------------------------------------------------------------------ receive
    async def receive(self) -> dict[str, Any]:
        conn, req = self.conn, self.req
        while True:
            if self.disconnected:
                return {"type": "http.disconnect"}
            if not self.body_done:
                stream = req.stream
                if stream:
                    body = stream.popleft() if len(stream) == 1 else b"".join(stream)
                    stream.clear()
                    conn.buffered = 0
                    if conn.paused:
                        conn.resume()
                    more = not req.complete
                    self.body_done = not more
                    return {"type": "http.request", "body": body, "more_body": more}
                if req.complete:
                    self.body_done = True
                    return {"type": "http.request", "body": b"", "more_body": False}
                if req.expect_continue and not req.continue_sent and not self.head_sent:
                    req.continue_sent = True
                    conn.write(CONTINUE)
                conn.resume()  # the body is still coming, so nothing is pipelined behind it: read on
                conn.body_wait(True)
            elif self.complete:
                return {"type": "http.disconnect"}
            self.waiter = conn.worker.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
                conn.body_wait(False)

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ------------------------------------------------------------------ send
    async def send(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if self.disconnected:
            return  # the client is gone, or the server answered for the app (408, 413): nothing to send
        if kind == "http.response.body":
            if not self.head_sent:
                raise RuntimeError("http.response.body before http.response.start")
            if self.complete:
                raise RuntimeError("http.response.body after the response was complete")
            body = message.get("body", b"")
            more = message.get("more_body", False)
            if self.disconnected:
                if not more:
                    self._done()
                return
            conn = self.conn
            out = body
            if self.head or not body:
                out = b""
            elif self.chunked:
                out = b"%x\r\n%b\r\n" % (len(body), body)
            elif self.length is not None and self.written + len(body) > self.length:
                raise RuntimeError("response body longer than its Content-Length")
            if not more and self.chunked:
                out += b"0\r\n\r\n"
            if self.status_line is not None:
                out = self.status_line + out
                self.status_line = None
            self.written += 0 if self.head else len(body)
            if out:
                conn.write(out)
            if not more:
                if self.length is not None and self.written < self.length and not self.head:
                    self.close = True  # a short response: the client sees it cut
                self._done()
            elif conn.write_paused:
                await conn.drain()
        elif kind == "http.response.start":
            if self.head_sent:
                raise RuntimeError("http.response.start sent twice")
            self._start(message)
        elif kind == "http.response.trailers":
            pass  # no trailers are sent (the request had to announce them with TE: trailers)
        else:
            raise RuntimeError(f"unexpected ASGI message in the http scope: {kind!r}")

    def _start(self, message: dict[str, Any]) -> None:
        status = message["status"]
        if type(status) is not int or not 100 <= status <= 599:
            raise RuntimeError(f"invalid status from the app: {status!r}")
        conn = self.conn
        lines = [_STATUS_LINES.get(status) or b"HTTP/1.1 %d \r\n" % status]
        has_date = False
        cache = conn.worker.head_lines
        for header in message.get("headers", ()):
            hit = cache.get(header) if type(header) is tuple else None
            if hit is None:
                hit = _head_line(header)
                if type(header) is tuple:
                    if len(cache) >= HEAD_CACHE:
                        cache.clear()  # bounded: varied values (lengths, cookies) start it over
                    cache[header] = hit
            line, kind = hit
            if kind:
                value = header[1]
                if kind == LENGTH:
                    self.length = int(value)
                elif kind == CONNECTION:
                    if b"close" in value.lower():
                        self.close = True
                    continue
                elif kind == DATE:
                    has_date = True
                else:
                    self.app_rid = True
                    self.request_id = value.decode("latin-1")
            lines.append(line)
        self.status = status
        self.head = self.req.method == b"HEAD"
        if self.request_id is not None and not self.app_rid:
            lines.append(b"x-request-id: %b\r\n" % self.request_id.encode("latin-1"))
        if not has_date:
            lines.append(conn.worker.date.line())
        bodiless = status < 200 or status in (204, 304)
        if self.length is None and not bodiless:
            if self.req.version == "1.1":
                self.chunked = True
                lines.append(b"transfer-encoding: chunked\r\n")
            else:
                self.close = True  # HTTP/1.0: the end of the body is the end of the connection
        if not self.close and (conn.worker.draining or conn.closing or (conn.c is not None and conn.c.closing)
                               or not self.req.keep_alive or not conn.worker.keepalive):
            self.close = True
        if self.close:
            lines.append(b"connection: close\r\n")
        elif self.req.version == "1.0":
            lines.append(b"connection: keep-alive\r\n")
        lines.append(b"\r\n")
        self.status_line = b"".join(lines)
        self.head_sent = True
        if bodiless:
            self.chunked = False

    def _done(self) -> None:
        self.complete = True
        if self.status_line is not None:  # a head with no body message: send it now
            self.conn.write(self.status_line)
            self.status_line = None
        self.wake()

    # ------------------------------------------------------------------ the app
    async def run(self) -> None:
        conn = self.conn
        worker = conn.worker
        try:
            await worker.app(self.scope, self.receive, self.send)
        except BaseException as exc:  # noqa: BLE001 - an app failure costs one request
            if not self.timed_out and (not self.disconnected or not isinstance(exc, (OSError, asyncio.CancelledError))):
                worker.log.error("app_exception", method=self.scope["method"], path=self.scope["path"],
                                 traceback=traceback.format_exc())
            if (not self.head_sent or self.status_line is not None) and not self.disconnected:
                self.status_line = None  # nothing went out yet: the client gets a 500
                self._error(500)
            elif not self.complete:
                self.close = True
                self.complete = True
            if not isinstance(exc, Exception) and not isinstance(exc, asyncio.CancelledError):
                conn.finished(self)
                raise
        else:
            if not self.head_sent and not self.disconnected:
                worker.log.error("app_exception", method=self.scope["method"], path=self.scope["path"],
                                 traceback="the app returned without starting a response")
                self._error(500)
            elif not self.complete:
                self.close = True  # the app returned in the middle of its response: cut it
                self.complete = True
        conn.finished(self)

    def time_out(self, seconds: float) -> None:
        """--request-timeout: log where the app is, answer 504 if nothing was sent, cancel it."""
        self.timed_out = True
        task = self.task
        self.conn.worker.log.error("request_timeout", method=self.scope.get("method"), path=self.scope.get("path"),
                                   seconds=round(seconds, 3), stack=_awaiting(task) if task is not None else "")
        if not self.disconnected:
            if not self.head_sent or self.status_line is not None:
                self.status_line = None
                self._error(504)
            else:
                self.close = True  # part of the response went out: the connection is cut
            self.disconnected = True  # the app's later messages go nowhere
        if task is not None:
            task.cancel()

    def _error(self, code: int) -> None:
        self.status, self.close, self.complete, self.head_sent = code, True, True, True
        self.conn.write(self.conn.worker.error_bytes(code, self.request_id))


class HttpConn(asyncio.Protocol):
    """One client connection."""

    def __init__(self, worker: AsgiWorker) -> None:
        self.worker = worker
        self.transport: Any = None
        self.c: Connection | None = None
        self.cycle: Cycle | None = None
        self.phase = IDLE
        self.deadline = 0.0
        self.body_deadline: float | None = None
        self.write_paused = False
        self.write_paused_at = 0.0
        self.write_waiter: asyncio.Future | None = None
        self.paused = False  # reading paused (back-pressure)
        self.buffered = 0  # body bytes read ahead of the app
        self.closing = False
        self.gone = False
        self.eof = False
        self.client: tuple[str, int] | None = None
        self.server: tuple[str, int] | None = None
        self.trusted = False
        self.sock: Any = None
        self.proxy_buf = b""  # a PROXY protocol header, while it arrives

    # ------------------------------------------------------------------ asyncio callbacks
    def connection_made(self, transport: Any) -> None:
        worker = self.worker
        self.transport = transport
        sock = self.sock = transport.get_extra_info("socket")
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        if isinstance(peer, tuple):
            self.client = (peer[0], peer[1])
            self.trusted = worker.trust(peer[0])
        if isinstance(local, tuple):
            self.server = (local[0], local[1])
        self.c = Connection(sock, peer, worker.spec.limits, False, 0)
        if worker.spec.proxy_protocol != "off" and (self.trusted or not isinstance(peer, tuple)):
            self.phase, self.deadline = PROXY, time.monotonic() + worker.spec.header_timeout
        else:
            self.phase, self.deadline = IDLE, time.monotonic() + worker.idle_timeout
        worker.conns.add(self)

    def data_received(self, data: bytes) -> None:
        if self.phase == LINGER:
            return
        if self.phase == PROXY:
            data = self._proxy_header(data)
            if not data:
                return
        c = self.c
        if self.phase == IDLE:
            self.phase, self.deadline = HEAD, time.monotonic() + self.worker.spec.header_timeout
        c.feed(data)  # type: ignore[union-attr]
        cycle = self.cycle
        if cycle is not None:
            if c.error is not None and c.failed is cycle.req:  # type: ignore[union-attr]
                self.closing = True  # its body is broken (malformed chunks, a trailer over its limit)
                if not cycle.head_sent and not cycle.disconnected:
                    self.worker.reject(self, c.error, c.why)  # type: ignore[union-attr]
                    cycle._error(c.error)  # type: ignore[union-attr]
                cycle.disconnected = True
            elif c.requests and c.requests[0] is cycle.req:  # type: ignore[union-attr]
                req = cycle.req
                self.buffered = sum(map(len, req.stream)) if req.stream else 0
                limit = self.worker.spec.limits.body
                if limit and req.received > limit:
                    cycle.disconnected = True
                    self.closing = True
                    if not cycle.head_sent:
                        self.worker.reject(self, 413, "request body over --limit-request-body")
                        cycle._error(413)
                if self.body_deadline is not None:
                    self.body_deadline = time.monotonic() + self.worker.spec.body_timeout
            cycle.wake()
            if self.buffered > HIGH_WATER or len(c.requests) > 1:  # type: ignore[union-attr]
                self.pause()
            return
        self._advance()

    def _proxy_header(self, data: bytes) -> bytes:
        """The PROXY protocol header a trusted proxy sends first (as the WSGI worker reads it).
        Returns what follows it, b"" while it is not whole (or the connection was dropped)."""
        buf = self.proxy_buf + data
        mode = self.worker.spec.proxy_protocol
        if mode == "auto":
            ahead = forwarded.proxy_header_ahead(buf)
            if ahead is None:
                self.proxy_buf = buf
                return b""
            if not ahead:  # a trusted peer may also speak plain HTTP in auto mode
                self.phase, self.proxy_buf = IDLE, b""
                return buf
        try:
            got = forwarded.read_proxy_header(mode, buf)
        except ValueError as exc:
            self.worker.log.warning("proxy_protocol_error", error=str(exc), client=_peer(self.client))
            self.transport.abort()
            return b""
        if got is None:
            self.proxy_buf = buf
            return b""
        result, taken = got
        client = forwarded.client_address(result)
        if client is not None:
            self.client = client
            self.trusted = self.worker.trust(client[0])  # forwarding headers are the client's own now
        self.phase, self.proxy_buf = IDLE, b""
        self.deadline = time.monotonic() + self.worker.idle_timeout
        return buf[taken:]

    def eof_received(self) -> bool | None:
        self.eof = True
        cycle = self.cycle
        if cycle is not None and cycle.req.complete and not cycle.complete:
            self.closing = True  # the client half-closed after its request: answer it, then close
            return True
        self.gone = True
        if cycle is not None:
            cycle.disconnected = True
            cycle.wake()
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        self.worker.conns.discard(self)
        cycle = self.cycle
        if cycle is not None:
            cycle.disconnected = True
            cycle.wake()
        self._release_writer()
        if self.c is not None:
            self.c.discard()
        self.worker.conn_closed()

    def pause_writing(self) -> None:
        self.write_paused, self.write_paused_at = True, time.monotonic()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._release_writer()

    def _release_writer(self) -> None:
        waiter = self.write_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ------------------------------------------------------------------ helpers
    def write(self, data: bytes) -> None:
        if not self.gone:
            self.transport.write(data)

    async def drain(self) -> None:
        """Wait until the client took enough of what was written (the write deadline is the sweep's)."""
        while self.write_paused and not self.gone:
            self.write_waiter = self.worker.loop.create_future()
            await self.write_waiter

    def pause(self) -> None:
        if not self.paused and not self.gone:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and not self.gone:
            self.paused = False
            self.transport.resume_reading()

    def body_wait(self, on: bool) -> None:
        self.body_deadline = time.monotonic() + self.worker.spec.body_timeout if on else None

    # ------------------------------------------------------------------ requests
    def _advance(self) -> None:
        """Start the next request, answer a protocol error, or wait for more."""
        c = self.c
        assert c is not None
        worker = self.worker
        if c.error is not None and c.failed_now():
            worker.reject(self, c.error, c.why)
            self.transport.write(worker.error_bytes(c.error))
            self.linger()
            return
        req = c.next_ready()
        if req is None:
            if c.idle():
                self._idle()
            return
        if c.upgrade_rest is not None and req is c.requests[-1] and len(c.requests) == 1 \
                and worker.upgrade(self, req, c.upgrade_rest):
            return
        self._start(req)

    def _idle(self) -> None:
        if self.closing or self.gone:
            self.linger()
            return
        now = time.monotonic()
        self.phase = IDLE
        self.deadline = now + (min(DRAIN_IDLE, self.worker.idle_timeout) if self.worker.draining
                               else self.worker.idle_timeout)
        self.resume()

    def _start(self, req: Request) -> None:
        worker = self.worker
        self.phase = APP
        scope = build_scope(worker, self, req, "http")
        if isinstance(scope, str):  # a request the app must not see (a repeated Host...)
            cycle = self.cycle = Cycle(self, req, {"method": req.method.decode("latin-1"), "path": ""},
                                       time.monotonic())
            self.fail_head(cycle, 400, scope)
            return
        cycle = self.cycle = Cycle(self, req, scope, time.monotonic())
        cycle.request_id = scope.pop("_rid")
        limit = worker.spec.limits.body
        if limit and req.received > limit:  # arrived with its head, before any check of ours
            self.closing = True
            self.fail_head(cycle, 413, "request body over --limit-request-body")
            return
        if len(self.c.requests) > 1:  # type: ignore[union-attr]
            self.pause()  # a pipelined request waits: read no further meanwhile
        else:
            self.resume()
        self.buffered = sum(map(len, req.stream)) if req.stream else 0
        if worker.limit and worker.inflight >= worker.limit:
            cycle._error(503)  # --limit-concurrency: over it, answered at once (and closed)
            self.finished(cycle, app=False)
            return
        worker.started_request()
        worker.live.add(cycle)
        cycle.task = worker.loop.create_task(cycle.run())

    def fail_head(self, cycle: Cycle, code: int, why: str) -> None:
        """A request whose head is unusable: answer it without the app, then close."""
        self.worker.reject(self, code, why)
        cycle._error(code)
        self.finished(cycle, app=False)

    def finished(self, cycle: Cycle, app: bool = True) -> None:
        """The request is over: log and count it, then the next one (or close)."""
        worker = self.worker
        if app:
            worker.inflight -= 1
            worker.live.discard(cycle)
            if worker.draining:
                worker.conn_closed()
        self.body_deadline = None
        worker.record(cycle)
        self.cycle = None
        c = self.c
        req = cycle.req
        keep = not (cycle.close or self.closing or self.gone or not req.complete or (c is not None and c.closing))
        if c is not None and c.requests and c.requests[0] is req:
            c.drop_request()
        self.buffered = 0
        if not keep:
            if not self.gone:
                self.linger()
            return
        self.phase = IDLE
        self._advance()
        if self.cycle is None and self.phase == IDLE and c is not None and not c.idle():
            self.phase, self.deadline = HEAD, time.monotonic() + worker.spec.header_timeout
            self.resume()

    def drain_now(self) -> None:
        """The worker drains: an idle connection gets a short deadline."""
        if self.phase == IDLE:
            self.deadline = min(self.deadline, time.monotonic() + DRAIN_IDLE)

    # ------------------------------------------------------------------ closing
    def linger(self) -> None:
        """Send FIN, read (and drop) until the client's EOF or LINGER_TIME: closing with unread
        data would send a RST that can destroy a response the client has not read."""
        if self.phase == LINGER or self.gone:
            return
        self.phase, self.deadline = LINGER, time.monotonic() + LINGER_TIME
        if self.c is not None:
            self.c.discard()
        transport = self.transport
        if not self.eof and transport.can_write_eof():
            transport.write_eof()
            self.resume()
        else:
            transport.close()

    def expire(self, now: float) -> None:
        """Called by the worker's sweep for a connection past its deadline."""
        phase, worker = self.phase, self.worker
        if phase == IDLE or phase == LINGER:
            if phase == IDLE:
                self.linger()
            else:
                self.transport.abort()
        elif phase == PROXY:
            worker.log.warning("proxy_protocol_error", error="no PROXY protocol header in time",
                               client=_peer(self.client))
            self.transport.abort()
        elif phase == HEAD:
            worker.client_timeout(self, "head", worker.spec.header_timeout)
            self.write(worker.error_bytes(408))
            self.linger()

    def sweep(self, now: float) -> None:
        phase = self.phase
        if phase == APP:
            if self.write_paused and now - self.write_paused_at > self.worker.spec.write_timeout:
                self.worker.client_timeout(self, "write", self.worker.spec.write_timeout)
                self.transport.abort()
            elif self.body_deadline is not None and now > self.body_deadline:
                cycle = self.cycle
                self.worker.client_timeout(self, "body", self.worker.spec.body_timeout)
                self.body_deadline = None
                self.closing = True
                if cycle is not None:
                    if not cycle.head_sent:
                        cycle._error(408)
                    cycle.disconnected = True
                    cycle.wake()
        elif now >= self.deadline:
            self.expire(now)


def _peer(client: Any) -> str:
    return f"{client[0]}:{client[1]}" if client else "unix"


def _awaiting(task: asyncio.Task) -> str:
    """Where a task waits: its coroutine and every coroutine it awaits, innermost last (a task's
    own stack shows only the outermost)."""
    frames = []
    coro: Any = task.get_coro()
    for _ in range(100):  # bounded: a chain of awaits is short
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None) or getattr(coro, "ag_frame", None)
        if frame is None:
            break
        frames.append((frame, frame.f_lineno))
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return "".join(traceback.StackSummary.extract(frames).format())


def build_scope(worker: AsgiWorker, conn: Any, req: Request, kind: str) -> dict[str, Any] | str:
    """The scope of an http or websocket request, or the reason it is a bad request."""
    url = req.url
    if url[:1] == b"/" and b"?" not in url and b"%" not in url and b"#" not in url:
        raw_path, query = url, b""
    else:
        try:
            parsed = httptools.parse_url(url)
        except httptools.HttpParserInvalidURLError:
            return "invalid request target"
        raw_path, query = parsed.path or b"/", parsed.query or b""
    try:
        path = raw_path.decode("ascii")
    except UnicodeDecodeError:
        return "request target is not ASCII"
    if "%" in path:
        path = unquote(path)
    headers = []
    hosts = 0
    rid: str | None = None
    forwarding = False
    once: dict[bytes, bytes] | None = None
    for name, value in req.headers:
        lname = name.lower()
        if lname in _SINGLETONS:
            # Once-only fields repeated with another value (Host: repeated at all) make a request
            # ambiguous: which one did an intermediary act on?  (The WSGI worker's rule.)
            if once is None:
                once = {}
            if lname in once and (lname == b"host" or once[lname] != value):
                return f"{name.decode('latin-1')} repeated"
            once[lname] = value
        if lname == b"host":
            hosts += 1
        elif lname == b"x-request-id":
            rid = value.decode("latin-1")
            continue
        elif lname in _FORWARDING:
            forwarding = True
        headers.append((lname, value))
    if hosts > 1 or (hosts == 0 and req.version == "1.1"):
        return "Host missing or repeated (RFC 9112 3.2)"
    client = conn.client
    scheme = "ws" if kind == "websocket" else "http"
    if forwarding and conn.trusted:
        client, scheme, headers = _forwarded(worker, client, scheme, headers)
    if worker.ids is not None:
        if rid is None or not accesslog.valid_id(rid):
            rid = worker.ids.new()
        headers.append((b"x-request-id", rid.encode("latin-1")))
    elif rid is not None:
        headers.append((b"x-request-id", rid.encode("latin-1")))
        rid = None
    scope: dict[str, Any] = {
        "type": kind, "asgi": ASGI, "http_version": req.version, "server": conn.server, "client": client,
        "scheme": scheme, "root_path": "", "path": path, "raw_path": raw_path, "query_string": query,
        "headers": headers, "state": worker.lifespan.state.copy(), "_rid": rid}
    if kind == "http":
        scope["method"] = req.method.decode("latin-1")
    return scope


def _forwarded(worker: AsgiWorker, client: Any, scheme: str, headers: list[tuple[bytes, bytes]]) -> Any:
    """From a trusted proxy: the client, scheme and host from its forwarding headers (the same
    rules as the WSGI worker's, supervisor.worker.forwarded)."""
    environ: dict[str, Any] = {"wsgi.url_scheme": "https" if scheme in ("https", "wss") else "http"}
    if client is not None:
        environ["REMOTE_ADDR"], environ["REMOTE_PORT"] = client[0], str(client[1])
    host = None
    for name, value in headers:
        if name in _FORWARDING:
            key = "HTTP_" + name.decode().upper().replace("-", "_")
            text = value.decode("latin-1")
            environ[key] = environ[key] + "," + text if key in environ else text
        elif name == b"host":
            host = environ["HTTP_HOST"] = value.decode("latin-1")
    forwarded.apply(environ, worker.trust)
    if "REMOTE_ADDR" in environ:
        try:
            client = (environ["REMOTE_ADDR"], int(environ.get("REMOTE_PORT") or 0))
        except ValueError:
            client = (environ["REMOTE_ADDR"], 0)
    secure = environ["wsgi.url_scheme"] == "https"
    scheme = ("wss" if secure else "ws") if scheme in ("ws", "wss") else ("https" if secure else "http")
    if environ.get("HTTP_HOST") != host:
        new = environ["HTTP_HOST"].encode("latin-1")
        headers = [(n, new if n == b"host" else v) for n, v in headers]
    return client, scheme, headers
