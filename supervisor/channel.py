"""Newline-delimited JSON over a stream socket: the master's link to each child.

Workers and helper processes write one JSON object per line; the master reads
non-blocking and splits lines.  EOF means the other side is gone."""

from __future__ import annotations

import json
import os
import socket
from collections import deque
from typing import Any

MAX_FDS = 16  # descriptors accepted per read


class Channel:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = b""
        self.closed = False
        self.fds: deque[int] = deque()  # descriptors received (SCM_RIGHTS), in order

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, **message: Any) -> bool:
        """Blocking send of one message.  False if the peer is gone."""
        try:
            self.sock.sendall(encode(message))
            return True
        except OSError:
            return False

    def send_fd(self, fd: int, **message: Any) -> bool:
        """Send one message carrying a descriptor (SCM_RIGHTS).  False if the peer is gone."""
        blocking = self.sock.getblocking()
        try:
            self.sock.setblocking(True)
            return socket.send_fds(self.sock, [encode(message)], [fd]) > 0
        except OSError:
            return False
        finally:
            if not self.closed:
                self.sock.setblocking(blocking)

    def receive(self) -> list[dict[str, Any]]:
        """Read what is available (non-blocking socket) and return complete messages.
        Descriptors that came along are queued in `fds`, in order.  Sets `closed` on EOF."""
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self.sock, 65536, MAX_FDS)
                self.fds.extend(fds)
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
        while self.fds:
            os.close(self.fds.popleft())


def encode(message: dict[str, Any]) -> bytes:
    """One message on the wire: compact JSON and a newline."""
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def pair() -> tuple[socket.socket, socket.socket]:
    """(master end, child end); the master end is non-blocking."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    parent.setblocking(False)
    return parent, child
