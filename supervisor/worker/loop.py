"""The worker's event loop: epoll over the listeners, the client connections, the
master's channel and the signal wakeup pipe."""

from __future__ import annotations

import os
import queue
import select
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from supervisor import proto
from supervisor.channel import Channel
from supervisor.worker.http import Connection
from supervisor.worker.spec import WorkerSpec
from supervisor.worker.wsgi import Handler

HEARTBEAT_INTERVAL = 1.0
DRAIN_IDLE = 1.0  # while draining, an idle keep-alive connection is closed after this much quiet
HEAD_TIMEOUT = 30.0  # a request head that stalls this long is dropped (slowloris)
ACCEPT_BATCH = 16  # connections accepted per listener wakeup
SWEEP_INTERVAL = 0.1  # at most this often, look for connections past their timeout
FIRST_REQUEST_WAIT = 5.0  # with keep-alive off, how long a new connection may take to send its request
LINGER = 2.0  # how long a closing connection keeps reading so the client never gets a RST


class WorkerLoop:
    """The worker's event loop: epoll over the listeners, the client connections, the
    master channel and the signal wakeup pipe."""

    def __init__(self, spec: WorkerSpec, app: Callable, listeners: list[socket.socket], chan: Channel,
                 wake_r: int, log: Any) -> None:
        self.spec = spec
        self.listeners = listeners
        self.chan = chan
        self.wake_r = wake_r
        self.log = log
        self.ep = select.epoll()
        self.conns: dict[int, Connection] = {}
        self.owned: set[int] = set()  # connections being served by an app thread
        self.polled: set[int] = set()  # connections registered with epoll
        self.lingering: dict[int, float] = {}  # fd -> close deadline
        self.accepting = False
        self.draining = False
        self.accept_enabled = False  # the master said `accept`
        self.requests_at_drain: int | None = None
        first = listeners[0].getsockname() if listeners else ("", 0)
        is_inet = isinstance(first, tuple)
        self.handler = Handler(
            app, server_name=str(first[0]) if is_inet else "localhost",
            server_port=str(first[1]) if is_inet else "", url_scheme="http",
            multithread=spec.threads > 1, access_log=log.info if spec.access_log else None,
            log_error=log.error, is_draining=self._draining_now if spec.threads == 1 else lambda: self.draining,
            keepalive=spec.keepalive_timeout > 0)
        # --keepalive-timeout 0 turns keep-alive off: responses say Connection: close, and a new
        # connection still gets time to send its first request.
        self.idle_timeout = spec.keepalive_timeout or FIRST_REQUEST_WAIT
        self.executor: ThreadPoolExecutor | None = None
        self.done: queue.SimpleQueue[tuple[Connection, bool]] = queue.SimpleQueue()
        self.done_r = self.done_w = -1
        if spec.threads > 1:
            self.executor = ThreadPoolExecutor(spec.threads, thread_name_prefix="app")
            self.done_r, self.done_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self.ep.register(self.done_r, select.EPOLLIN)
        self.ep.register(wake_r, select.EPOLLIN)
        self.ep.register(chan.fileno(), select.EPOLLIN)
        self.listener_fds = {s.fileno(): s for s in listeners}
        self.tcp_listeners = {s.fileno() for s in listeners if s.family != socket.AF_UNIX}
        for s in listeners:
            s.setblocking(False)

    # ------------------------------------------------------------------ main loop
    def run(self) -> None:
        next_beat = time.monotonic() + HEARTBEAT_INTERVAL
        next_sweep = next_beat
        while not (self.draining and not self.conns and not self.owned):
            now = time.monotonic()
            events = self.ep.poll(max(0.0, min(next_beat, next_sweep) - now))
            for fd, mask in events:
                if fd in self.conns:
                    self._on_readable(self.conns[fd])
                elif fd in self.listener_fds:
                    self._accept(self.listener_fds[fd])
                elif fd == self.wake_r:
                    self._on_signals()
                elif fd == self.chan.fileno():
                    self._on_master()
                elif fd == self.done_r:
                    self._on_done()
            now = time.monotonic()
            if now >= next_beat:
                self.beat()
                next_beat = now + HEARTBEAT_INTERVAL
            if now >= next_sweep or self.draining:
                # Timeouts are whole seconds: sweeping every connection on every event would make
                # each request cost O(open connections).
                next_sweep = max(self._expire(now), now + SWEEP_INTERVAL)
        if self.executor is not None:
            self.executor.shutdown(wait=True)

    def beat(self) -> None:
        """Heartbeat: proves the loop turns, and reports requests served (and since draining)."""
        served = self.handler.requests
        drained = served - self.requests_at_drain if self.requests_at_drain is not None else 0
        self.chan.send(proto.Beat(served, drained))

    def _expires_at(self, conn: Connection) -> float:
        """An idle connection (between requests) gets the keep-alive timeout, or DRAIN_IDLE
        while draining; one in the middle of a request head gets HEAD_TIMEOUT."""
        if not conn.idle():
            return conn.last_active + HEAD_TIMEOUT
        return conn.last_active + (min(DRAIN_IDLE, self.idle_timeout) if self.draining else self.idle_timeout)

    def _expire(self, now: float) -> float:
        """Close idle keep-alive connections and stalled request heads past their timeout, and
        finished lingerers.  Returns when the next one is due."""
        due = now + HEARTBEAT_INTERVAL
        for fd, conn in list(self.conns.items()):
            if fd in self.owned:
                continue
            deadline = self.lingering.get(fd) or self._expires_at(conn)
            if now < deadline:
                due = min(due, deadline)
            elif fd in self.lingering:
                self._close(conn)
            else:
                self._linger(conn, now)
                due = min(due, now + LINGER)
        return due

    # ------------------------------------------------------------------ events
    def _on_signals(self) -> None:
        try:
            signums = os.read(self.wake_r, 512)
        except BlockingIOError:
            return
        if signal.SIGTERM in signums:
            self._begin_drain("SIGTERM")

    def _on_master(self) -> None:
        for received in self.chan.receive():
            if isinstance(received.message, proto.StartAccepting) and not self.draining:
                self.accept_enabled = True
                self._set_accepting(True)
            elif received.fd is not None:
                self._adopt(received.fd)
        if self.chan.closed:
            self.ep.unregister(self.chan.fileno())
            self._begin_drain("master gone")

    def _draining_now(self) -> bool:
        """With --threads 1 the app runs on this thread, so a SIGTERM that arrived during the
        request has not been seen yet: look when the response head is written, so the request
        in flight gets `Connection: close` and counts as finished while draining."""
        if not self.draining:
            self._on_signals()
        return self.draining

    def _begin_drain(self, why: str) -> None:
        if self.draining:
            return
        self.draining = True
        self.requests_at_drain = self.handler.requests  # a request in flight is counted when it ends
        self._set_accepting(False)
        for sock in self.listeners:
            sock.close()  # our copy only: the master and the new generation keep the socket open
        self.listener_fds.clear()
        self.log.info("worker_draining", why=why, connections=len(self.conns), busy=len(self.owned))

    def _set_accepting(self, on: bool) -> None:
        if on == self.accepting or (on and self.draining):
            return
        self.accepting = on
        for fd in self.listener_fds:
            if on:
                # EPOLLEXCLUSIVE: wake one worker per new connection, not all of them.
                self.ep.register(fd, select.EPOLLIN | select.EPOLLEXCLUSIVE)
            else:
                self.ep.unregister(fd)

    def _accept(self, lsock: socket.socket) -> None:
        """Accept and serve up to ACCEPT_BATCH queued connections: one epoll wakeup for many.
        EPOLLEXCLUSIVE still wakes an idle sibling for the connections that keep arriving."""
        tcp = lsock.fileno() in self.tcp_listeners
        for _ in range(ACCEPT_BATCH):
            # epoll_wait returns ready events in preference to EINTR, so a SIGTERM sent while we
            # slept can arrive *with* this listener event: its byte lands in the wakeup pipe
            # only as epoll returns.  Look before every accept, so a draining worker never
            # takes a connection the new generation should get.
            self._on_signals()
            if not self.accepting:
                return
            try:
                sock, peer = lsock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:  # EMFILE and friends: back off until the next wakeup
                self.log.warning("accept_failed", error=str(exc))
                return
            # The check above leaves a window: descheduled between it and accept(), we may take
            # a connection after the master told us to drain.  A signal sent before accept()
            # returned has been delivered by now (on the syscall's return), so this second look
            # is airtight: such a late connection goes back to the master, for the new generation.
            self._on_signals()
            if self.draining:
                self._hand_off(sock)
                return
            self._serve_new(sock, peer, tcp)

    def _hand_off(self, sock: socket.socket) -> None:
        """Give a connection accepted too late to the master (SCM_RIGHTS), which passes it to a
        worker of the newest generation, so its client never gets the old code."""
        sent = self.chan.send(proto.Handoff(), fd=sock.fileno())
        self.log.info("connection_handed_off", sent=sent)
        sock.close()  # our copy; the master holds its own

    def _adopt(self, fd: int) -> None:
        """Serve a connection another worker accepted too late (passed on by the master)."""
        sock = socket.socket(fileno=fd)
        try:
            peer = sock.getpeername()
        except OSError:  # the client is already gone
            sock.close()
            return
        self._serve_new(sock, peer, sock.family != socket.AF_UNIX)

    def _serve_new(self, sock: socket.socket, peer: Any, tcp: bool) -> None:
        sock.setblocking(False)
        if tcp:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = Connection(sock, peer, self.spec.limits, time.monotonic())
        self.conns[conn.fd] = conn
        self._on_readable(conn)  # the request is usually there already
        if self.conns.get(conn.fd) is conn and conn.fd not in self.owned:
            self._watch(conn)  # only connections that live on need epoll (saves two syscalls)

    def _on_readable(self, conn: Connection) -> None:
        fd = conn.fd
        if fd in self.lingering:
            self._drain_lingering(conn)
            return
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)
            return
        conn.last_active = time.monotonic()
        conn.feed(data)
        if conn.error is None and not conn.dispatchable():
            return
        if self.executor is None:
            self._served(conn, self.handler.serve(conn))
        else:
            self._unwatch(conn)
            self.owned.add(fd)
            if len(self.owned) >= self.spec.threads:
                self._set_accepting(False)  # saturated: let other workers take new connections
            self.executor.submit(self._serve_in_thread, conn)

    def _serve_in_thread(self, conn: Connection) -> None:
        keep = False
        try:
            keep = self.handler.serve(conn)
        finally:
            self.done.put((conn, keep))
            os.write(self.done_w, b".")

    def _on_done(self) -> None:
        try:
            os.read(self.done_r, 4096)
        except BlockingIOError:
            pass
        while True:
            try:
                conn, keep = self.done.get_nowait()
            except queue.Empty:
                break
            self.owned.discard(conn.fd)
            self._watch(conn)
            self._served(conn, keep)
        if self.accept_enabled and len(self.owned) < self.spec.threads:
            self._set_accepting(True)

    def _served(self, conn: Connection, keep: bool) -> None:
        conn.last_active = time.monotonic()
        if keep:
            return
        if conn.client_close and conn.idle():
            self._close(conn)  # the client asked to close and sent nothing more: a plain FIN
        else:
            self._linger(conn, conn.last_active)

    def _watch(self, conn: Connection) -> None:
        if conn.fd not in self.polled:
            self.ep.register(conn.fd, select.EPOLLIN)
            self.polled.add(conn.fd)

    def _unwatch(self, conn: Connection) -> None:
        if conn.fd in self.polled:
            self.ep.unregister(conn.fd)
            self.polled.discard(conn.fd)

    # ------------------------------------------------------------------ closing
    def _linger(self, conn: Connection, now: float) -> None:
        """Server-side close: send FIN, then keep reading (and discarding) until the client
        closes too or LINGER passes.  Closing with unread data would send a RST, which can
        destroy a response the client has not read yet."""
        if conn.fd in self.lingering:
            return
        if conn.eof:
            self._close(conn)
            return
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        self.lingering[conn.fd] = now + LINGER
        self._watch(conn)  # to see the client's EOF

    def _drain_lingering(self, conn: Connection) -> None:
        try:
            while conn.sock.recv(65536):
                pass
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self._close(conn)  # EOF: the client closed its side

    def _close(self, conn: Connection) -> None:
        self.conns.pop(conn.fd, None)
        self.lingering.pop(conn.fd, None)
        self.polled.discard(conn.fd)
        conn.sock.close()  # closing the fd also removes it from the epoll set
