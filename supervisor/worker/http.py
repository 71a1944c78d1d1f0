"""HTTP/1.1 for one client connection, parsed by httptools.

A `Connection` is fed bytes by the worker loop (`feed`).  The httptools parser calls
back into it and it queues `Request` objects; a request is *dispatchable* once its
head is complete.  `supervisor.worker.wsgi.Handler` runs the app for every dispatchable
request in order (pipelining) and writes the responses.

Sockets are non-blocking.  Reads and writes that would block wait with poll()
and a deadline, so the same code runs inline on the loop thread (--threads 1)
and in a thread pool.
"""

from __future__ import annotations

import select
import socket
from collections import deque
from typing import Any

import httptools

from supervisor.worker.spec import RequestLimits

RECV_SIZE = 65536
IO_TIMEOUT = 60.0  # a client that neither sends nor reads for this long is dropped

REASONS = {
    400: "Bad Request", 408: "Request Timeout", 413: "Content Too Large", 414: "URI Too Long",
    431: "Request Header Fields Too Large", 500: "Internal Server Error", 501: "Not Implemented",
    503: "Service Unavailable",
}


class ClientGone(Exception):
    """The client closed or stalled; the connection is dropped without a response."""


class BodyError(Exception):
    """Raised into the app by wsgi.input when the request body cannot be read; answered with `code`."""

    code = 400


class BodyTooLarge(BodyError):
    """Raised into the app by wsgi.input when the body passes --limit-request-body."""

    code = 413


class Request:
    __slots__ = ("url", "headers", "method", "version", "keep_alive", "head_complete", "complete",
                 "body", "received", "head_size", "raw_head", "expect_continue", "content_length",
                 "chunked", "upgrade")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.method = b"GET"
        self.version = "1.1"
        self.keep_alive = True
        self.head_complete = False
        self.complete = False
        self.body: deque[bytes] = deque()
        self.received = 0
        self.head_size = 0
        self.raw_head = 0
        self.expect_continue = False
        self.content_length: int | None = None
        self.chunked = False
        self.upgrade = False


class Connection:
    """One client socket: parser state, queued requests, and blocking-with-deadline I/O."""

    def __init__(self, sock: socket.socket, peer: Any, limits: RequestLimits, now: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.limits = limits
        self.parser = httptools.HttpRequestParser(self)
        self.requests: deque[Request] = deque()
        self.error: int | None = None  # status to answer with, set by parser callbacks
        self.failed: Request | None = None  # the request `error` belongs to (those before it are fine)
        self.closing = False  # no more requests will be read (Connection: close sent or due)
        self.client_close = False  # the client itself asked to close after its request
        self.eof = False
        self.last_active = now
        self._cur: Request | None = None

    def _fail(self, code: int) -> None:
        """Record a protocol error (the first one wins) and the request it belongs to."""
        if self.error is None:
            self.error, self.failed = code, self._cur

    # ------------------------------------------------------------------ parser callbacks
    def on_message_begin(self) -> None:
        self._cur = Request()
        self.requests.append(self._cur)

    def on_url(self, url: bytes) -> None:
        cur = self._cur
        cur.url += url  # type: ignore[union-attr]
        if len(cur.url) > self.limits.request_line:  # type: ignore[union-attr]
            self._fail(414)

    def on_header(self, name: bytes, value: bytes) -> None:
        cur = self._cur
        cur.headers.append((name, value))  # type: ignore[union-attr]
        cur.head_size += len(name) + len(value) + 4  # type: ignore[union-attr]
        if cur.head_size > self.limits.headers:  # type: ignore[union-attr]
            self._fail(431)

    def on_headers_complete(self) -> None:
        cur = self._cur
        assert cur is not None
        p = self.parser
        cur.method = p.get_method()
        cur.version = p.get_http_version()
        cur.keep_alive = p.should_keep_alive()
        cur.upgrade = p.should_upgrade()
        cur.head_complete = True
        for name, value in cur.headers:
            lname = name.lower()
            if lname == b"content-length":
                try:
                    cur.content_length = int(value)
                except ValueError:
                    self._fail(400)
            elif lname == b"transfer-encoding" and b"chunked" in value.lower():
                cur.chunked = True
            elif lname == b"expect" and value.lower() == b"100-continue" and cur.version != "1.0":
                cur.expect_continue = True  # RFC 9110 10.1.1: ignored in an HTTP/1.0 request
        limit = self.limits.body
        if limit and cur.content_length is not None and cur.content_length > limit:
            self._fail(413)

    def on_body(self, body: bytes) -> None:
        cur = self._cur
        cur.body.append(body)  # type: ignore[union-attr]
        cur.received += len(body)  # type: ignore[union-attr]

    def on_message_complete(self) -> None:
        if self._cur is not None:
            self._cur.complete = True
        self._cur = None

    # ------------------------------------------------------------------ feeding
    def feed(self, data: bytes) -> None:
        """Parse bytes that arrived.  Sets `error` on a protocol error."""
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.closing = True  # served as a plain request, then closed: WSGI has no upgrades
        except httptools.HttpParserError:
            self._fail(400)
        cur = self._cur
        if cur is not None and not cur.head_complete and self.error is None:
            cur.raw_head += len(data)
            if cur.raw_head > self.limits.headers + self.limits.request_line:
                self._fail(431)

    def dispatchable(self) -> bool:
        return bool(self.requests) and self.requests[0].head_complete

    def sound_ahead(self) -> bool:
        """After a protocol error: the next queued request is complete and came before the bad
        one, so it is still answered (pipelined requests are answered in order)."""
        req = self.requests[0] if self.requests else None
        return req is not None and req is not self.failed and req.complete

    def idle(self) -> bool:
        """No request queued and no partial request: safe to close."""
        return not self.requests and self._cur is None

    def read_more(self, timeout: float = IO_TIMEOUT) -> None:
        """Blocking read (with deadline) and feed.  ClientGone on EOF or timeout."""
        data = recv(self.sock, timeout)
        if not data:
            self.eof = True
            raise ClientGone("client closed the connection")
        self.feed(data)

    def send(self, data: bytes | memoryview) -> None:
        send_all(self.sock, data)

    def close(self) -> None:
        """shutdown() then close(), so unread data or a late request never turns into a RST."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def recv(sock: socket.socket, timeout: float) -> bytes:
    while True:
        try:
            return sock.recv(RECV_SIZE)
        except BlockingIOError:
            wait(sock, select.POLLIN, timeout)
        except (ConnectionError, TimeoutError):
            return b""


def send_all(sock: socket.socket, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view):]
        except BlockingIOError:
            wait(sock, select.POLLOUT, IO_TIMEOUT)
        except OSError as exc:
            raise ClientGone(str(exc)) from None


def wait(sock: socket.socket, events: int, timeout: float) -> None:
    poller = select.poll()
    poller.register(sock, events | select.POLLERR | select.POLLHUP)
    if not poller.poll(timeout * 1000):
        raise ClientGone("client timed out")


