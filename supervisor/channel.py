"""Newline-delimited JSON over a stream socket: the master's link to each child.

Workers and helper processes write one JSON object per line; the master reads
non-blocking and splits lines.  EOF means the other side is gone."""

from __future__ import annotations

import json
import socket
from typing import Any


class Channel:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = b""
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, **message: Any) -> bool:
        """Blocking send of one message.  False if the peer is gone."""
        try:
            self.sock.sendall(encode(message))
            return True
        except OSError:
            return False

    def receive(self) -> list[dict[str, Any]]:
        """Read what is available (non-blocking socket) and return complete messages.
        Sets `closed` on EOF."""
        while True:
            try:
                data = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                data = b""
            if not data:
                self.closed = True
                break
            self._buf += data
            if len(data) < 65536:
                break
        if b"\n" not in self._buf:
            return []
        *lines, self._buf = self._buf.split(b"\n")
        messages = []
        for line in lines:
            try:
                message = json.loads(line)
            except ValueError:
                continue  # a child must never be able to crash the master with garbage
            if isinstance(message, dict):
                messages.append(message)
        return messages

    def close(self) -> None:
        self.closed = True
        self.sock.close()


def encode(message: dict[str, Any]) -> bytes:
    """One message on the wire: compact JSON and a newline."""
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def pair() -> tuple[socket.socket, socket.socket]:
    """(master end, child end); the master end is non-blocking."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    parent.setblocking(False)
    return parent, child
