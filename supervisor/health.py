"""The master's health endpoint: `GET /health` on --health-bind.

200 while a generation serves and the master loop is answering (it is this loop
that answers), 503 before the first generation is ready and once shutdown has
begun.  The JSON body is the pool's state.  Connections are non-blocking and
served by the master loop itself; each is answered once and closed."""

from __future__ import annotations

import json
import socket
from typing import Any, Callable

import httptools

TIMEOUT = 5.0
MAX_REQUEST = 16384


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


class HealthServer:
    def __init__(self, listener: socket.socket, snapshot: Callable[[], tuple[bool, dict[str, Any]]]) -> None:
        listener.setblocking(False)
        self.listener = listener
        self.snapshot = snapshot
        self.clients: dict[int, _Client] = {}

    def accept(self, now: float) -> socket.socket | None:
        """Accept one client; returns its socket for the caller to watch."""
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError, OSError):
            return None
        sock.setblocking(False)
        self.clients[sock.fileno()] = _Client(sock, now)
        return sock

    def readable(self, fd: int) -> None:
        client = self.clients.get(fd)
        if client is None:
            return
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
            path = client.request.url.split(b"?", 1)[0]
            if path not in (b"/health", b"/"):
                self._respond(client, 404, {"error": "not found"}, head=method == b"HEAD")
            else:
                healthy, body = self.snapshot()
                self._respond(client, 200 if healthy else 503, body, head=method == b"HEAD")

    def expire(self, now: float) -> None:
        for client in [c for c in self.clients.values() if now >= c.deadline]:
            self._close(client)

    def next_deadline(self) -> float | None:
        return min((c.deadline for c in self.clients.values()), default=None)

    def _respond(self, client: _Client, status: int, body: dict[str, Any], head: bool) -> None:
        payload = json.dumps(body, separators=(",", ":")).encode()
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 503: "Service Unavailable"}[status]
        data = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nCache-Control: no-store\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode() + (b"" if head else payload)
        try:
            client.sock.send(data)  # small, into an empty socket buffer: one send is enough
        except OSError:
            pass
        self._close(client)

    def _close(self, client: _Client) -> None:
        self.clients.pop(client.sock.fileno(), None)
        try:
            client.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        client.sock.close()

    def close(self) -> None:
        for client in list(self.clients.values()):
            self._close(client)
        self.listener.close()
