"""The master's health endpoint: `GET /health` (and `GET /metrics`) on --health-bind.

200 while a generation serves and the master loop is answering (it is this loop
that answers), 503 before the first generation is ready and once shutdown has
begun.  The JSON body is the lifecycle's state (`supervisor.lifecycle.view`).
Connections are non-blocking and served by the master loop itself; each is answered
once and closed.  The server owns its sockets' registrations in the master's selector:
every socket it closes, it unregisters first."""

from __future__ import annotations

import json
import selectors
import socket
from typing import Any, Callable

import httptools

TIMEOUT = 5.0
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_REQUEST = 16384
MAX_CLIENTS = 64  # connections served at once; more wait in the listen queue


class _Request:
    def __init__(self) -> None:
        self.url = b""
        self.done = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        self.done = True


class _Client:
    def __init__(self, sock: socket.socket, now: float) -> None:
        self.sock = sock
        self.request = _Request()
        self.parser = httptools.HttpRequestParser(self.request)
        self.deadline = now + TIMEOUT
        self.size = 0
        self.out = b""  # the response, while the client's socket buffer cannot take all of it


Snapshot = Callable[[], tuple[bool, dict[str, Any]]]


class HealthServer:
    def __init__(self, listener: socket.socket, sel: selectors.BaseSelector, snapshot: Snapshot,
                 clock: Callable[[], float], metrics: Callable[[], bytes] | None = None) -> None:
        listener.setblocking(False)
        self.listener = listener
        self.sel = sel
        self.snapshot = snapshot
        self.metrics = metrics
        self.clock = clock
        self.clients: dict[socket.socket, _Client] = {}
        self._listening = False
        self._listen(True)

    def _listen(self, on: bool) -> None:
        if on and not self._listening:
            self.sel.register(self.listener, selectors.EVENT_READ, lambda mask: self._accept())
        elif not on and self._listening:
            self.sel.unregister(self.listener)
        self._listening = on

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except OSError:  # gone before we took it, or out of descriptors: the next wakeup retries
            return
        sock.setblocking(False)
        client = _Client(sock, self.clock())
        self.clients[sock] = client
        self.sel.register(sock, selectors.EVENT_READ, lambda mask: self._readable(client))
        if len(self.clients) >= MAX_CLIENTS:
            self._listen(False)

    def _readable(self, client: _Client) -> None:
        try:
            data = client.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        client.size += len(data)
        if not data or client.size > MAX_REQUEST:
            self._close(client)
            return
        try:
            client.parser.feed_data(data)
        except httptools.HttpParserError:
            self._respond(client, 400, {"error": "bad request"}, head=False)
            return
        if client.request.done:
            method = client.parser.get_method()
            head = method == b"HEAD"
            path = client.request.url.split(b"?", 1)[0]
            if path == b"/metrics" and self.metrics is not None:
                self._send(client, 200, METRICS_TYPE, self.metrics(), head)
            elif path not in (b"/health", b"/"):
                self._respond(client, 404, {"error": "not found"}, head=head)
            else:
                healthy, body = self.snapshot()
                self._respond(client, 200 if healthy else 503, body, head=head)

    def expire(self, now: float) -> None:
        for client in [c for c in self.clients.values() if now >= c.deadline]:
            self._close(client)

    def next_deadline(self) -> float | None:
        return min((c.deadline for c in self.clients.values()), default=None)

    def _respond(self, client: _Client, status: int, body: dict[str, Any], head: bool) -> None:
        self._send(client, status, "application/json", json.dumps(body, separators=(",", ":")).encode(), head)

    def _send(self, client: _Client, status: int, content_type: str, payload: bytes, head: bool) -> None:
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 503: "Service Unavailable"}[status]
        data = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nCache-Control: no-store\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode() + (b"" if head else payload)
        client.out = data
        self._write(client)

    def _write(self, client: _Client) -> None:
        """Send what the socket takes; the rest when it is writable again (a large scrape to a
        slow reader must not block the master), all within the client's deadline."""
        try:
            sent = client.sock.send(client.out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close(client)
            return
        client.out = client.out[sent:]
        if not client.out:
            self._close(client)
        else:
            self.sel.modify(client.sock, selectors.EVENT_WRITE, lambda mask: self._write(client))

    def _close(self, client: _Client) -> None:
        if self.clients.pop(client.sock, None) is None:
            return
        self.sel.unregister(client.sock)
        try:
            client.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        client.sock.close()
        self._listen(True)

    def close(self) -> None:
        for client in list(self.clients.values()):
            self._close(client)
        self._listen(False)
        self.listener.close()
