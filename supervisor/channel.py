"""One end of a master <-> child socketpair, carrying `supervisor.proto` messages.

Every process uses this class for its link: the master for each worker and helper, each
worker and helper for its link to the master.

* The master's ends never block: `send` writes what the socket takes and queues the rest
  (`pending`; the master flushes when the socket is writable).  A peer that stops reading
  until OUTBOX_LIMIT is queued is reported as gone (`send` returns False): the master never
  waits on a child.
* A child's end waits for room, up to SEND_TIMEOUT, under a lock (the Consul helper sends
  from several threads).
* `receive` reads what is there and returns the complete messages; a descriptor that came
  along (SCM_RIGHTS) is attached to the message kind that carries one.  EOF sets `closed`.
"""

from __future__ import annotations

import os
import select
import socket
import threading
from collections import deque
from dataclasses import dataclass

from supervisor import proto

MAX_FDS = 16  # descriptors accepted per read
READ_SIZE = 65536
MAX_LINE = 1 << 20  # a peer that sends a longer line is cut off
OUTBOX_LIMIT = 1 << 20
SEND_TIMEOUT = 10.0


@dataclass(frozen=True)
class Received:
    message: proto.Message
    fd: int | None = None  # for kinds that carry one; the receiver owns it


class Channel:
    def __init__(self, sock: socket.socket, *, queue_sends: bool) -> None:
        self.sock = sock
        self.queue_sends = queue_sends
        sock.setblocking(False)
        self.closed = False
        self._buf = b""
        self._fds: deque[int] = deque()
        self._outbox: deque[tuple[bytes, int | None]] = deque()  # (data, descriptor to send along)
        self._queued = 0
        self._lock = threading.Lock()

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def pending(self) -> bool:
        """Data queued for the peer (the master waits for writability to flush it)."""
        return bool(self._outbox)

    # ------------------------------------------------------------------ sending
    def send(self, message: proto.Message, fd: int | None = None) -> bool:
        """Send one message (with `fd` for kinds that carry one).  False: the peer is gone or
        stuck; the caller decides what that means.  The caller still owns `fd`."""
        if fd is not None and self.queue_sends:
            fd = os.dup(fd)  # the outbox may hold it past the caller's close
        with self._lock:
            if self.closed:
                if fd is not None and self.queue_sends:
                    os.close(fd)
                return False
            self._outbox.append((proto.encode(message), fd))
            self._queued += len(self._outbox[-1][0])
            if not self._flush_locked():
                return False
            if self.queue_sends:
                return self._queued <= OUTBOX_LIMIT
            return self._wait_flushed()

    def flush(self) -> bool:
        """Write queued data.  False when the peer is gone."""
        with self._lock:
            return self._flush_locked()

    def _flush_locked(self) -> bool:
        while self._outbox:
            data, fd = self._outbox[0]
            try:
                if fd is not None:
                    sent = socket.send_fds(self.sock, [data], [fd])
                else:
                    sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                self._drop_outbox()
                return False
            if fd is not None and self.queue_sends:
                os.close(fd)  # our dup: the peer has its own now
            self._queued -= sent
            if sent < len(data):
                self._outbox[0] = (data[sent:], None)  # the descriptor went with the first byte
                return True
            self._outbox.popleft()
        return True

    def _wait_flushed(self) -> bool:
        poller = select.poll()
        poller.register(self.sock, select.POLLOUT)
        while self._outbox:
            if not poller.poll(SEND_TIMEOUT * 1000):
                self._drop_outbox()
                return False
            if not self._flush_locked():
                return False
        return True

    def _drop_outbox(self) -> None:
        for _, fd in self._outbox:
            if fd is not None and self.queue_sends:
                os.close(fd)
        self._outbox.clear()
        self._queued = 0

    # ------------------------------------------------------------------ receiving
    def receive(self) -> list[Received]:
        """The complete messages that arrived.  Malformed lines are dropped."""
        while not self.closed:
            try:
                data, fds, _, _ = socket.recv_fds(self.sock, READ_SIZE, MAX_FDS)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                data, fds = b"", []
            self._fds.extend(fds)
            if not data:
                self.closed = True
                break
            self._buf += data
            if len(self._buf) > MAX_LINE and b"\n" not in self._buf:
                self.closed = True  # a runaway line: the peer is broken
                break
            if len(data) < READ_SIZE:
                break
        if b"\n" not in self._buf:
            return []
        *lines, self._buf = self._buf.split(b"\n")
        out: list[Received] = []
        for line in lines:
            message = proto.decode(line)
            if message is None:
                continue  # a child must never be able to crash the master with garbage
            if message.carries_fd:
                if not self._fds:
                    continue
                out.append(Received(message, self._fds.popleft()))
            else:
                out.append(Received(message))
        return out

    def close(self) -> None:
        with self._lock:
            self.closed = True
            self._drop_outbox()
        self.sock.close()
        while self._fds:
            os.close(self._fds.popleft())


def pair() -> tuple[socket.socket, socket.socket]:
    """(master end, child end) of a new link."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
