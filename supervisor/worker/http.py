"""HTTP/1.1 for one client connection: bytes in, parsed requests out (httptools).

A `Connection` is fed bytes by the worker loop (`feed`).  The httptools parser calls back
into it and it queues `Request` objects.  With request buffering (the default) a request's
body is kept in a `BodyBuffer` (memory, spooled to a temporary file past a size), and the
request is dispatched to the app only once it is complete, so a slow client never holds a
worker.  Without buffering the app reads the body as it arrives (`read_more`, a wait with a
deadline).

Nothing here writes to the socket: responses are the loop's and the WSGI adapter's business.
"""

from __future__ import annotations

import io
import re
import select
import socket
import tempfile
from collections import deque
from typing import Any, Callable

import httptools

from supervisor.worker.spec import RequestLimits

RECV_SIZE = 65536
_OWS = (b" ", b"\t")
_VERSION_LINE = re.compile(rb"^[^\r\n]* HTTP/([0-9])\.[0-9]\r?\n")
_VERSIONS = ("1.1", "1.0")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Fields a trailer must not carry (RFC 9110 6.5.1): framing, routing, request modifiers,
# authentication, caching and how to process the content.
FORBIDDEN_TRAILERS = frozenset((b"transfer-encoding", b"content-length", b"host", b"content-type",
                                b"content-encoding", b"content-range", b"trailer", b"te", b"expect", b"range",
                                b"authorization", b"proxy-authorization", b"cookie", b"set-cookie",
                                b"cache-control", b"max-forwards", b"if-match", b"if-none-match",
                                b"if-modified-since", b"if-unmodified-since", b"if-range", b"connection",
                                b"keep-alive", b"upgrade", b"forwarded", b"x-forwarded-for",
                                b"x-forwarded-proto", b"x-forwarded-host"))

REASONS = {
    400: "Bad Request", 408: "Request Timeout", 413: "Content Too Large", 414: "URI Too Long",
    431: "Request Header Fields Too Large", 500: "Internal Server Error", 501: "Not Implemented",
    503: "Service Unavailable", 505: "HTTP Version Not Supported",
}


class ClientGone(Exception):
    """The client closed or stalled; the connection is dropped without a response."""


class BodyError(Exception):
    """Raised into the app by wsgi.input when the request body cannot be read; answered with `code`."""

    code = 400


class BodyTooLarge(BodyError):
    """Raised into the app by wsgi.input when the body passes --limit-request-body."""

    code = 413


class BodyBuffer:
    """A request body read before the app runs: in memory up to `spool` bytes, then in an
    unlinked temporary file."""

    __slots__ = ("chunks", "size", "file", "spool")

    def __init__(self, spool: int) -> None:
        self.chunks: list[bytes] = []
        self.size = 0
        self.file: Any = None
        self.spool = spool

    def append(self, data: bytes) -> None:
        self.size += len(data)
        if self.file is not None:
            self.file.write(data)
            return
        self.chunks.append(data)
        if self.size > self.spool:
            self.file = tempfile.TemporaryFile()  # OSError (disk, descriptors) fails this request
            for chunk in self.chunks:
                self.file.write(chunk)
            self.chunks = []

    def reader(self) -> io.BufferedIOBase:
        """The whole body as a file object, from its start (wsgi.input)."""
        if self.file is not None:
            self.file.seek(0)
            return self.file  # type: ignore[no-any-return]
        return io.BytesIO(b"".join(self.chunks) if len(self.chunks) != 1 else self.chunks[0])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        self.chunks = []


class Request:
    """One parsed request.  Class attributes are the defaults: a plain GET sets only what it
    has, which keeps the per-request cost down."""

    url = b""
    method = b"GET"
    version = "1.1"
    keep_alive = True
    head_complete = False
    complete = False
    body: BodyBuffer | None = None  # buffered mode
    stream: deque[bytes] | None = None  # streaming mode: body pieces not read by the app yet
    received = 0
    head_size = 0
    raw_head = 0
    expect_continue = False
    continue_sent = False
    content_length: int | None = None
    chunked = False
    trailers: list[tuple[bytes, bytes]] | None = None  # fields after a chunked body
    trailer_size = 0

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []


class _Closed:
    """The parser of a closed connection: whatever still arrives is ignored."""

    def feed_data(self, data: bytes) -> None:
        pass


_CLOSED: Any = _Closed()


class Connection:
    """One client socket: parser state and queued requests."""

    upgrade_rest: bytes | None = None  # after an Upgrade head: the bytes that followed it

    def __init__(self, sock: socket.socket, peer: Any, limits: RequestLimits, buffered: bool,
                 spool: int) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.limits = limits
        self.head_limit = limits.headers
        self.buffered = buffered
        self.spool = spool
        self.parser = httptools.HttpRequestParser(self)
        self.requests: deque[Request] = deque()
        self.error: int | None = None  # status to answer with, set by parser callbacks
        self.why = ""  # the reason for `error`, for the log
        self.failed: Request | None = None  # the request `error` belongs to (those before it are fine)
        self.extension_method: bytes | None = None  # see _retry_extension_method
        self.closing = False  # no more requests will be read (Connection: close sent or due)
        self.client_close = False  # the client itself asked to close after its request
        self.eof = False
        # The loop's bookkeeping: what the connection waits for, and until when.
        self.phase = 0
        self.deadline = 0.0
        self.remote: tuple[str, str] | None = None  # REMOTE_ADDR, REMOTE_PORT (computed once)
        self.trusted: bool | None = None  # the peer is a trusted proxy (None: not looked up yet)
        self.proxy_buf = b""  # a PROXY protocol header, while it arrives
        self.nagle = False  # TCP_NODELAY still to be set (before this connection's second write)
        self.wrote = False
        self.exchange: Any = None  # the response in progress (supervisor.worker.wsgi.Exchange)
        self._cur: Request | None = None

    def _fail(self, code: int, why: str) -> None:
        """Record a protocol error (the first one wins) and the request it belongs to."""
        if self.error is None:
            self.error, self.why, self.failed = code, why, self._cur

    # ------------------------------------------------------------------ parser callbacks
    def on_message_begin(self) -> None:
        self._cur = Request()
        self.requests.append(self._cur)

    def on_url(self, url: bytes) -> None:
        cur = self._cur
        cur.url += url  # type: ignore[union-attr]
        if len(cur.url) > self.limits.request_line:  # type: ignore[union-attr]
            self._fail(414, "request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        cur: Request = self._cur  # type: ignore[assignment]
        if value and (value[-1] == 32 or value[-1] == 9):
            value = value.rstrip(b" \t")  # RFC 9112 5: whitespace around a value is not part of it
        if cur.head_complete:  # a trailer field, after a chunked body
            self._trailer(cur, name, value)
            return
        cur.headers.append((name, value))
        size = cur.head_size = cur.head_size + len(name) + len(value) + 4
        if size > self.head_limit:
            self._fail(431, "request head over --limit-request-headers")

    def _trailer(self, cur: Request, name: bytes, value: bytes) -> None:
        cur.trailer_size += len(name) + len(value) + 4
        if cur.trailer_size > self.limits.trailer:
            self._fail(431, "trailer over its limit")
        elif name.lower() in FORBIDDEN_TRAILERS:
            # RFC 9110 6.5.1: framing, routing, authentication and the like never come late.
            self._fail(400, f"{name.decode('latin-1')} is not allowed in a trailer")
        else:
            if cur.trailers is None:
                cur.trailers = []
            cur.trailers.append((name, value))

    def on_headers_complete(self) -> None:
        cur = self._cur
        assert cur is not None
        p = self.parser
        ext = self.extension_method
        if ext is None:
            cur.method = p.get_method()
        else:
            cur.method, self.extension_method = ext, None
        version = cur.version = p.get_http_version()
        cur.keep_alive = p.should_keep_alive()
        cur.head_complete = True
        if cur.head_size > self.limits.field_size:  # only then can one field be over the limit
            self._check_field_sizes(cur)
        for name, value in cur.headers:
            size = len(name)
            if size != 14 and size != 17 and size != 6:
                continue  # not one of the few fields framing depends on (a cheap test first)
            lname = name.lower()
            if lname == b"content-length":
                cur.content_length = int(value)  # httptools checked the digits
            elif lname == b"transfer-encoding":
                self._transfer_coding(cur, value)
            elif lname == b"expect" and value.lower() == b"100-continue" and version != "1.0":
                cur.expect_continue = True  # RFC 9110 10.1.1: ignored in an HTTP/1.0 request
        if version not in _VERSIONS or cur.url == b"*" or len(cur.headers) > self.limits.fields:
            self._check_head(cur, version)
        limit = self.limits.body
        if limit and cur.content_length is not None and cur.content_length > limit:
            self._fail(413, "request body over --limit-request-body")
        if self.buffered and (cur.chunked or cur.content_length):
            cur.body = BodyBuffer(self.spool)

    def _check_field_sizes(self, cur: Request) -> None:
        limit = self.limits.field_size
        if any(len(name) + len(value) > limit for name, value in cur.headers):
            self._fail(431, f"a header field over --limit-request-field-size ({limit})")

    def _transfer_coding(self, cur: Request, value: bytes) -> None:
        """httptools accepts only codings that end with chunked (RFC 9112 6.3); we decode none
        of the others: 501 for them (RFC 9112 6.1), and chunked means nothing in HTTP/1.0."""
        codings = [c.strip() for c in value.lower().split(b",")]
        if cur.version == "1.0":
            self._fail(400, "Transfer-Encoding in an HTTP/1.0 request (RFC 9112 6.1)")
            self.closing = True
        elif codings[-1] != b"chunked" or codings.count(b"chunked") > 1:
            self._fail(400, "chunked must be the final transfer coding, once (RFC 9112 6.3, 7.1)")
        elif all(c in (b"chunked", b"identity") for c in codings):
            cur.chunked = True
        else:
            self._fail(501, f"transfer coding not implemented: {value.decode('latin-1')}")

    def _check_head(self, cur: Request, version: str) -> None:
        """What httptools lets through and RFC 9110/9112 does not.  (Host and fields that must
        not repeat are checked as the environ is built: the one pass over the fields.)"""
        if version not in _VERSIONS:
            if version == "0.9":
                self._fail(400, "HTTP/0.9 request (no HTTP-version)")
            else:
                self._fail(505, f"HTTP/{version} not supported")
            self.closing = True
            return
        if cur.url == b"*" and cur.method != b"OPTIONS":
            self._fail(400, "asterisk-form request target is for OPTIONS only (RFC 9112 3.2.4)")
        if len(cur.headers) > self.limits.fields:
            self._fail(431, f"more than {self.limits.fields} header fields")

    def on_body(self, body: bytes) -> None:
        cur = self._cur
        assert cur is not None
        cur.received += len(body)
        if not self.buffered:
            if cur.stream is None:
                cur.stream = deque()
            cur.stream.append(body)
            return
        limit = self.limits.body
        if limit and cur.received > limit:
            self._fail(413, "request body over --limit-request-body")
            return
        if cur.body is not None and self.error is None:
            try:
                cur.body.append(body)
            except OSError:
                self._fail(503, "no room to buffer the request body")  # disk or descriptors: later

    def on_message_complete(self) -> None:
        if self._cur is not None:
            self._cur.complete = True
        self._cur = None

    # ------------------------------------------------------------------ feeding
    def feed(self, data: bytes) -> None:
        """Parse bytes that arrived.  Sets `error` on a protocol error."""
        fresh = self._cur is None
        queued = len(self.requests)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            # The WSGI worker serves it as a plain request, then closes (WSGI has no upgrades);
            # the ASGI worker hands the bytes after the head to the WebSocket.
            offset = exc.args[0] if exc.args and isinstance(exc.args[0], int) else len(data)
            self.upgrade_rest = data[offset:]
            self.closing = True
        except httptools.HttpParserInvalidMethodError as exc:
            if not (fresh and len(self.requests) == queued + 1 and self._retry_extension_method(data)):
                self._fail(400, str(exc))
        except httptools.HttpParserError as exc:
            # A well-formed HTTP-version of a major version we do not speak is a 505, not a 400.
            major = _VERSION_LINE.search(data[:self.limits.request_line + 16])
            self._fail(505 if major and int(major.group(1)) >= 2 else 400, str(exc))
        cur = self._cur
        if cur is not None and not cur.head_complete and self.error is None:
            cur.raw_head += len(data)
            if cur.raw_head > self.limits.headers + self.limits.request_line:
                self._fail(431, "request head over its limit")

    def _retry_extension_method(self, data: bytes) -> bool:
        """httptools knows the registered methods only; RFC 9110 9.1 allows any token.  When
        the request that failed began with this data, parse it again with a registered method
        in its place and keep the real one.  (One later in a pipeline of requests sent together
        still gets a 400.)"""
        start = len(data) - len(data.lstrip(b"\r\n"))
        method, sp, rest = data[start:].partition(b" ")
        if not sp or not _TOKEN.fullmatch(method):
            return False
        self.requests.pop()  # the failed start of this request
        self._cur = None
        self.parser = httptools.HttpRequestParser(self)
        self.extension_method = method
        self.feed(b"POST " + rest)  # POST: no meaning of its own to the parser
        return True

    def next_ready(self) -> Request | None:
        """The first queued request, if it can go to the app now: complete (buffered mode) or
        with its head complete (streaming mode)."""
        if not self.requests:
            return None
        req = self.requests[0]
        if req.complete or (req.head_complete and not self.buffered):
            return req
        return None

    def failed_now(self) -> bool:
        """A protocol error, and no sound request queued before the bad one: answer the error."""
        if self.error is None:
            return False
        req = self.requests[0] if self.requests else None
        return req is None or req is self.failed or not req.complete

    def idle(self) -> bool:
        """No request queued and no partial request: safe to close."""
        return not self.requests and self._cur is None

    def drop_request(self) -> None:
        req = self.requests.popleft()
        if req.body is not None:
            req.body.close()

    def discard(self) -> None:
        """The connection is closing: free what its queued requests hold, and the parser (it
        refers back to the connection: without this, every connection would wait for the
        cyclic garbage collector)."""
        while self.requests:
            self.drop_request()
        self.parser = _CLOSED

    # ------------------------------------------------------------------ streaming mode
    def read_more(self, timeout: float) -> None:
        """Blocking read (with deadline) and feed, for an app reading a streamed body.
        ClientGone on EOF or timeout."""
        data = recv(self.sock, timeout)
        if not data:
            self.eof = True
            raise ClientGone("client closed the connection")
        self.feed(data)


def recv(sock: socket.socket, timeout: float) -> bytes:
    while True:
        try:
            return sock.recv(RECV_SIZE)
        except BlockingIOError:
            wait(sock, select.POLLIN, timeout)
        except (ConnectionError, TimeoutError):
            return b""


def send_all(sock: socket.socket, data: bytes | memoryview, timeout: float) -> None:
    """Blocking send with a deadline per pause (the legacy write() callable, error responses)."""
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view):]
        except BlockingIOError:
            wait(sock, select.POLLOUT, timeout)
        except OSError as exc:
            raise ClientGone(str(exc)) from None


def wait(sock: socket.socket, events: int, timeout: float) -> None:
    poller = select.poll()
    poller.register(sock, events | select.POLLERR | select.POLLHUP)
    if not poller.poll(timeout * 1000):
        raise ClientGone("client timed out")


class RejectLog:
    """`request_rejected` events of a worker: a burst, then at most one per interval, the
    next one saying how many were not logged.  A flood of bad requests must not flood the log."""

    BURST, INTERVAL = 20, 10.0

    def __init__(self, info: Callable[..., None]) -> None:
        self.info = info
        self.since = float("-inf")  # when the current interval began
        self.logged = 0  # in the current interval
        self.unlogged = 0

    def __call__(self, status: int, why: str, client: str | None, now: float) -> None:
        if now - self.since >= self.INTERVAL:
            self.since, self.logged = now, 0
        if self.logged >= self.BURST:
            self.unlogged += 1
            return
        self.logged += 1
        fields: dict[str, int] = {}
        if self.unlogged:
            fields["not_logged"], self.unlogged = self.unlogged, 0
        self.info("request_rejected", status=status, why=why, client=client, **fields)
