"""The worker's event loop: epoll over the listeners, the client connections, the master's
channel and the signal wakeup pipe.

A client's pace never holds the worker.  A request is read whole (head and, with request
buffering, body) before the app is called; the response is sent without blocking, and the
app's iterable is pulled only once the socket took the previous piece.  Every wait on a
client has a deadline (`--header-timeout`, `--body-timeout`, `--write-timeout`, the
keep-alive timeout), and every connection costs at most one response piece and one request
body (in memory up to `--body-spool-size`, then in a temporary file).

Per connection, `conn.phase` says what it waits for:

    IDLE --first byte--> HEAD --head complete--> BODY --body complete--> APP --> WRITE
      ^                                                                           |
      +------------------- keep-alive: the next request (or close) ---------------+
"""

from __future__ import annotations

import errno
import os
import queue
import select
import signal
import _socket
import socket
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from supervisor import proto
from supervisor.channel import Channel
from supervisor.worker import forwarded
from supervisor.worker.http import Connection, RejectLog, Request
from supervisor.worker.spec import WorkerSpec
from supervisor.worker.watchdog import RequestWatch
from supervisor.worker.wsgi import Adapter, Exchange

HEARTBEAT_INTERVAL = 1.0
DRAIN_IDLE = 1.0  # while draining, an idle keep-alive connection is closed after this much quiet
ACCEPT_BATCH = 16  # connections accepted per listener wakeup
SWEEP_INTERVAL = 0.1  # at most this often, look for connections past their deadline
FIRST_REQUEST_WAIT = 5.0  # with keep-alive off, how long a new connection may take to send its request
LINGER = 2.0  # how long a closing connection keeps reading so the client never gets a RST
ACCEPT_PAUSE_MIN, ACCEPT_PAUSE_MAX = 0.05, 1.0  # back-off after accept() failed (out of descriptors)
ACCEPT_LOG_INTERVAL = 2.0  # at most one accept_failed line per interval, with a count
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
RESET_ON_CLOSE = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST

# conn.phase
IDLE, HEAD, BODY, APP, WRITE, LINGERING, PROXY = range(7)
PHASE_NAMES = {HEAD: "head", BODY: "body", WRITE: "write", PROXY: "proxy header"}
# what a pump of the response ended with
WAITING, KEEP, CLOSED = range(3)

EPOLLIN, EPOLLOUT = select.EPOLLIN, select.EPOLLOUT
PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT


class WorkerLoop:
    def __init__(self, spec: WorkerSpec, app: Callable, listeners: list[socket.socket], chan: Channel,
                 wake_r: int, log: Any) -> None:
        self.spec = spec
        self.listeners = listeners
        self.chan = chan
        self.wake_r = wake_r
        self.log = log
        self.ep = select.epoll()
        self.conns: dict[int, Connection] = {}
        self.events: dict[int, int] = {}  # fd -> epoll mask it is registered with
        self.owned: set[int] = set()  # connections an app thread is working on
        self.accepting = False
        self.draining = False
        self.accept_enabled = False  # the master said StartAccepting
        self.requests_at_drain: int | None = None
        self.accept_paused_until: float | None = None
        self.accept_pause = ACCEPT_PAUSE_MIN
        self.accept_failures = 0
        self.accept_logged_at = float("-inf")
        self.started = 0  # requests handed to the app
        self.rejects = RejectLog(self.log.info)
        self.term_arrived = False
        signal.signal(signal.SIGTERM, self._term_arrived)
        self.trust = forwarded.Trust(spec.forwarded_allow_ips)
        self.watch = None
        if spec.request_timeout > 0:
            self.watch = RequestWatch(spec.request_timeout, log, lambda code: self.adapter.error_bytes(code),
                                      lambda method, path, seconds: self.chan.send(
                                          proto.RequestTimedOut(method, path, seconds)))
        first = listeners[0].getsockname() if listeners else ("", 0)
        is_inet = isinstance(first, tuple)
        self.adapter = Adapter(
            app, server_name=str(first[0]) if is_inet else "localhost",
            server_port=str(first[1]) if is_inet else "", url_scheme="http", threads=spec.threads,
            access_log=log.info if spec.access_log else None, log_error=log.error,
            is_draining=self._draining_now if spec.threads == 1 else lambda: self.draining,
            keepalive=spec.keepalive_timeout > 0, write_timeout=spec.write_timeout,
            body_timeout=spec.body_timeout, trust=self.trust,
            reject=lambda conn, code, why: self._log_reject(conn, code, why), watch=self.watch,
            access_log_format=spec.access_log_format, request_ids=spec.request_id,
            metrics=spec.metrics)
        # --keepalive-timeout 0 turns keep-alive off: responses say Connection: close, and a new
        # connection still gets time to send its first request.
        self.idle_timeout = spec.keepalive_timeout or FIRST_REQUEST_WAIT
        self.executor: ThreadPoolExecutor | None = None
        self.done: queue.SimpleQueue[tuple[Connection, Callable[[], None]]] = queue.SimpleQueue()
        self.done_r = self.done_w = -1
        if spec.threads > 1:
            self.executor = ThreadPoolExecutor(spec.threads, thread_name_prefix="app")
            self.done_r, self.done_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self.ep.register(self.done_r, EPOLLIN)
        self.ep.register(wake_r, EPOLLIN)
        self.ep.register(chan.fileno(), EPOLLIN)
        self.listener_fds = {s.fileno(): s for s in listeners}
        for s in listeners:
            s.setblocking(False)

    # ------------------------------------------------------------------ main loop
    def run(self) -> None:
        next_beat = time.monotonic() + HEARTBEAT_INTERVAL
        next_sweep = next_beat
        conns, listener_fds = self.conns, self.listener_fds
        while not (self.draining and not conns and not self.owned):
            now = time.monotonic()
            wake = min(next_beat, next_sweep)
            if self.accept_paused_until is not None:
                wake = min(wake, self.accept_paused_until)
            for fd, mask in self.ep.poll(max(0.0, wake - now)):
                conn = conns.get(fd)
                if conn is not None:
                    self._on_conn(conn, mask)
                elif fd in listener_fds:
                    self._accept(listener_fds[fd])
                elif fd == self.wake_r:
                    self._drain_wakeup()
                elif fd == self.chan.fileno():
                    self._on_master()
                elif fd == self.done_r:
                    self._on_done()
            now = time.monotonic()
            if self.accept_paused_until is not None and now >= self.accept_paused_until:
                self.accept_paused_until = None
                self._update_accepting()
            if now >= next_beat:
                self.beat()
                next_beat = now + HEARTBEAT_INTERVAL
            if now >= next_sweep or self.draining:
                # Deadlines are coarse: sweeping every connection on every event would make each
                # request cost O(open connections).
                next_sweep = max(self._sweep(now), now + SWEEP_INTERVAL)
        if self.executor is not None:
            self.executor.shutdown(wait=True)

    def beat(self) -> None:
        """Heartbeat: proves the loop turns; requests served (and since draining); app threads busy."""
        served = self.adapter.requests
        drained = served - self.requests_at_drain if self.requests_at_drain is not None else 0
        stats = self.adapter.stats
        self.chan.send(proto.Beat(served, drained, len(self.owned), self.started, stats.by_label(),
                                  list(stats.hist), stats.seconds))

    # ------------------------------------------------------------------ the master and signals
    def _term_arrived(self, signum: int, frame: Any) -> None:
        """SIGTERM's handler only notes it (and the wakeup fd wakes the loop); the loop acts.
        It runs in this thread before the next Python function starts, so a look at the flag
        right after a syscall returned sees a signal delivered on that return."""
        self.term_arrived = True

    def _on_signals(self) -> None:
        """Act on a SIGTERM that arrived.  Cheap when none did (no syscall): it is looked at
        around every accept and before every response head."""
        if self.term_arrived and not self.draining:
            self._begin_drain("SIGTERM")

    def _drain_wakeup(self) -> None:
        try:
            os.read(self.wake_r, 512)
        except BlockingIOError:
            pass
        self._on_signals()

    def _on_master(self) -> None:
        for received in self.chan.receive():
            if isinstance(received.message, proto.StartAccepting) and not self.draining:
                self.accept_enabled = True
                self._update_accepting()
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
        self.requests_at_drain = self.adapter.requests  # a request in flight is counted when it ends
        self._update_accepting()
        for sock in self.listeners:
            sock.close()  # our copy only: the master and the new generation keep the socket open
        self.listener_fds.clear()
        self.log.info("drain_started", why=why, connections=len(self.conns), busy=len(self.owned))
        now = time.monotonic()
        for conn in self.conns.values():
            if conn.phase == IDLE:
                conn.deadline = min(conn.deadline, now + DRAIN_IDLE)

    # ------------------------------------------------------------------ accepting
    def _update_accepting(self) -> None:
        """Accept while told to, not draining, not paused after a failure, and under the
        connection and thread limits."""
        on = (self.accept_enabled and not self.draining and self.accept_paused_until is None
              and len(self.conns) < self.spec.worker_connections
              and (self.executor is None or len(self.owned) < self.spec.threads))
        if on == self.accepting:
            return
        self.accepting = on
        for fd in self.listener_fds:
            if on:
                # EPOLLEXCLUSIVE: wake one worker per new connection, not all of them.
                self.ep.register(fd, EPOLLIN | select.EPOLLEXCLUSIVE)
            else:
                self.ep.unregister(fd)

    def _accept(self, lsock: socket.socket) -> None:
        """Accept and serve up to ACCEPT_BATCH queued connections: one epoll wakeup for many.
        EPOLLEXCLUSIVE still wakes an idle sibling for the connections that keep arriving."""
        family = lsock.family
        tcp = family != socket.AF_UNIX
        for _ in range(ACCEPT_BATCH):
            # epoll_wait returns ready events in preference to EINTR, so a SIGTERM sent while we
            # slept can arrive *with* this listener event: its byte lands in the wakeup pipe
            # only as epoll returns.  Look before every accept, so a draining worker never
            # takes a connection the new generation should get.
            self._on_signals()
            if not self.accepting:
                return
            try:
                fd, peer = lsock._accept()  # type: ignore[attr-defined]
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:  # EMFILE, ENFILE, ENOBUFS, ENOMEM: pause, then try again
                self._accept_failed(exc)
                return
            # The check above leaves a window: descheduled between it and accept(), we may take
            # a connection after the master told us to drain.  A signal sent before accept()
            # returned has been delivered by now (on the syscall's return), so this second look
            # is airtight: such a late connection goes back to the master, for the new generation.
            # The C socket type, not socket.py's subclass: client sockets need none of its
            # Python-level extras, and each connection saves their cost.
            sock = _socket.socket(family, socket.SOCK_STREAM, 0, fd)
            self._on_signals()
            if self.draining:
                self._hand_off(sock)
                return
            self.accept_pause = ACCEPT_PAUSE_MIN
            self._serve_new(sock, peer, tcp)
            if not self.accepting:
                return

    def _accept_failed(self, exc: OSError) -> None:
        """Out of descriptors (or kernel memory): the queued connection stays queued and the
        listener stays readable, so retrying at once would spin.  Stop accepting for a short,
        growing pause; log once per interval with a count."""
        now = time.monotonic()
        self.accept_failures += 1
        if now - self.accept_logged_at >= ACCEPT_LOG_INTERVAL:
            self.log.warning("accept_failed", error=os.strerror(exc.errno or 0), errno=errno.errorcode.get(exc.errno or 0),
                             count=self.accept_failures, connections=len(self.conns),
                             pause=self.accept_pause)
            self.accept_logged_at, self.accept_failures = now, 0
        self.accept_paused_until = now + self.accept_pause
        self.accept_pause = min(ACCEPT_PAUSE_MAX, self.accept_pause * 2)
        self._update_accepting()

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
        spec = self.spec
        conn = Connection(sock, peer, spec.limits, spec.request_buffering, spec.body_spool_size)
        conn.nagle = tcp  # TCP_NODELAY is set before a second write: a single one needs none
        if spec.proxy_protocol != "off" and self._trusted(conn):
            conn.phase, conn.deadline = PROXY, time.monotonic() + spec.header_timeout
        else:
            conn.phase, conn.deadline = IDLE, time.monotonic() + self.idle_timeout
        self.conns[conn.fd] = conn
        self._read(conn)  # the request is usually there already
        if len(self.conns) >= spec.worker_connections:
            self._update_accepting()

    # ------------------------------------------------------------------ reading
    def _on_conn(self, conn: Connection, mask: int) -> None:
        phase = conn.phase
        if phase == LINGERING:
            self._drain_lingering(conn)
        elif phase == WRITE:
            if self._pump(conn) == KEEP:
                self._advance(conn)
        elif conn.exchange is None:
            self._read(conn)

    def _read(self, conn: Connection) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            self._advance(conn)
            return
        except OSError:
            data = b""
        if not data:
            conn.eof = True
            self._close(conn)  # nothing in flight: a half-sent request is of no use now
            return
        if conn.phase == PROXY:
            data = self._proxy_header(conn, data)
            if not data:
                return
        if conn.phase == IDLE:
            conn.phase, conn.deadline = HEAD, time.monotonic() + self.spec.header_timeout
        conn.feed(data)
        self._advance(conn)

    def _trusted(self, conn: Connection) -> bool:
        trusted = conn.trusted
        if trusted is None:
            peer = conn.peer
            trusted = conn.trusted = self.trust(peer[0]) if isinstance(peer, tuple) else True  # unix: local
        return trusted

    def _proxy_header(self, conn: Connection, data: bytes) -> bytes:
        """The PROXY protocol header a trusted proxy sends first: the client's address.  Returns
        what follows it (the request), b"" while the header is not whole (or the connection
        was dropped for a malformed or missing one)."""
        buf = conn.proxy_buf + data
        mode = self.spec.proxy_protocol
        if mode == "auto":
            ahead = forwarded.proxy_header_ahead(buf)
            if ahead is None:
                conn.proxy_buf = buf
                self._watch(conn, EPOLLIN)
                return b""
            if not ahead:  # a trusted peer may also speak plain HTTP in auto mode
                conn.phase, conn.proxy_buf = IDLE, b""
                return buf
        try:
            got = forwarded.read_proxy_header(mode, buf)
        except ValueError as exc:
            self.log.warning("proxy_protocol_error", error=str(exc), client=_client(conn.peer))
            self._close(conn)
            return b""
        if got is None:
            conn.proxy_buf = buf
            self._watch(conn, EPOLLIN)
            return b""
        result, taken = got
        client = forwarded.client_address(result)
        if client is not None:
            conn.peer, conn.remote = client, None
            conn.trusted = self.trust(client[0])  # forwarding headers are the client's own now
        conn.phase, conn.proxy_buf = IDLE, b""
        conn.deadline = time.monotonic() + self.idle_timeout
        rest = buf[taken:]
        if not rest:
            self._await_request(conn)
        return rest

    def _advance(self, conn: Connection) -> None:
        """Serve what has been parsed, then wait for what comes next (nothing is in flight)."""
        while True:
            if conn.error is not None and conn.failed_now():
                self._reject(conn, conn.error, conn.why)
                return
            req = conn.next_ready()
            if req is None:
                break
            status = self._dispatch(conn, req)
            if status != KEEP:
                return
            if conn.closing or conn.eof:
                self._finish(conn)
                return
        self._await_request(conn)

    def _await_request(self, conn: Connection) -> None:
        """Wait for (more of) the next request, with the deadline of what is missing."""
        now = time.monotonic()
        req = conn.requests[0] if conn.requests else None
        if req is None:
            if conn.phase != IDLE:
                conn.phase = IDLE
                conn.deadline = now + (min(DRAIN_IDLE, self.idle_timeout) if self.draining else self.idle_timeout)
        elif not req.head_complete:
            if conn.phase != HEAD:  # the head's time counts from its first byte
                conn.phase, conn.deadline = HEAD, now + self.spec.header_timeout
        else:
            # The body's time counts from the last progress.
            conn.phase, conn.deadline = BODY, now + self.spec.body_timeout
            if req.expect_continue and not req.continue_sent:
                req.continue_sent = True
                try:
                    conn.sock.send(CONTINUE)  # tiny, into an empty buffer; if it fails the client goes on
                except OSError:
                    pass
        self._watch(conn, EPOLLIN)

    # ------------------------------------------------------------------ the response
    def _dispatch(self, conn: Connection, req: Request) -> int:
        conn.phase = APP
        self.started += 1
        if self.started == 1:
            # Tell the master at once that this worker took a request: should the request crash
            # it, its slot is respawned without backoff (that is no crash loop).
            self.beat()
        if self.executor is None:
            conn.exchange = self.adapter.begin(conn, req, time.monotonic())
            return self._pump(conn)
        self._submit(conn, lambda: self._begin_in_thread(conn, req))
        return WAITING

    def _begin_in_thread(self, conn: Connection, req: Request) -> None:
        conn.exchange = self.adapter.begin(conn, req, time.monotonic())

    def _pump(self, conn: Connection) -> int:
        """Send what the response has ready, pulling the app's iterable as the socket takes it.
        Returns WAITING (the socket is full, or an app thread pulls), KEEP (done, the connection
        goes on) or CLOSED."""
        ex: Exchange = conn.exchange
        sock = conn.sock
        adapter = self.adapter
        while True:
            data = ex.pending
            if data:
                if conn.nagle and conn.wrote:
                    # A second write while the first may be unacknowledged: without NODELAY,
                    # Nagle would hold it until the client's (delayed) ACK.
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    conn.nagle = False
                conn.wrote = True
                try:
                    sent = sock.send(data)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError:
                    return self._abort(conn, reset=True)  # the client is gone
                if sent < len(data):
                    ex.pending = memoryview(data)[sent:]
                    return self._await_write(conn, sent > 0)
                ex.pending = b""
            if ex.file is not None:
                before = ex.written
                if not self._send_file(conn, ex):
                    return self._abort(conn) if ex.aborted else self._await_write(conn, ex.written > before)
                continue
            if ex.aborted:
                return self._abort(conn)
            if ex.iterator is None:
                return self._end_exchange(conn)
            if not ex.inline:
                self._submit(conn, lambda: adapter.more(ex))
                return WAITING
            adapter.more(ex)

    def _send_file(self, conn: Connection, ex: Exchange) -> bool:
        """sendfile() without blocking.  False: the socket is full (or the client gone)."""
        file = ex.file
        assert file is not None
        fd, offset, remaining = file
        while remaining > 0:
            try:
                sent = os.sendfile(conn.fd, fd, offset, min(remaining, 1 << 20))
            except (BlockingIOError, InterruptedError):
                file[1], file[2] = offset, remaining
                return False
            except OSError:
                ex.aborted = True
                return False
            if sent == 0:
                break  # the file is shorter than it said
            offset += sent
            remaining -= sent
            ex.written += sent
        ex.file = None
        return True

    def _await_write(self, conn: Connection, progress: bool) -> int:
        if conn.phase != WRITE or progress:
            conn.phase, conn.deadline = WRITE, time.monotonic() + self.spec.write_timeout
        self._watch(conn, EPOLLOUT)
        return WAITING

    def _end_exchange(self, conn: Connection) -> int:
        ex = conn.exchange
        keep = self.adapter.finish(ex)
        conn.exchange = None
        if conn.requests and conn.requests[0] is ex.req:
            conn.drop_request()
        if keep:
            return KEEP
        self._finish(conn)
        return CLOSED

    def _abort(self, conn: Connection, reset: bool = False) -> int:
        """The response cannot be completed (the app failed after the head was sent, or the
        client went away or stopped reading): closing is the only way to tell the client.  A
        truncated response ends with a FIN, so the client reads what was sent and sees it cut;
        a client that stopped reading gets a reset, so the kernel drops what is still unsent
        at once instead of keeping it for a client that does not read."""
        ex = conn.exchange
        if ex is not None:
            conn.exchange = None
            self.adapter.abandon(ex)
        if not reset:
            self._linger(conn, time.monotonic())
            return CLOSED
        try:
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET_ON_CLOSE)
        except OSError:
            pass
        self._close(conn)
        return CLOSED

    def _reject(self, conn: Connection, code: int, why: str) -> None:
        """Answer a request that never reaches the app (malformed, too large, too slow), then close."""
        try:
            conn.sock.send(self.adapter.error_bytes(code))  # small, into an empty buffer
        except OSError:
            pass
        self._log_reject(conn, code, why)
        self._linger(conn, time.monotonic())

    def _log_reject(self, conn: Connection, code: int, why: str) -> None:
        self.rejects(code, why, _client(conn.peer), time.monotonic())

    def _finish(self, conn: Connection) -> None:
        """The server is done with this connection."""
        if conn.client_close and conn.idle():
            self._close(conn)  # the client asked to close and sent nothing more: a plain FIN
        else:
            self._linger(conn, time.monotonic())

    # ------------------------------------------------------------------ app threads
    def _submit(self, conn: Connection, work: Callable[[], None]) -> None:
        assert self.executor is not None
        conn.phase = APP
        self._watch(conn, 0)
        self.owned.add(conn.fd)
        if len(self.owned) >= self.spec.threads:
            self._update_accepting()  # saturated: let other workers take new connections
        self.executor.submit(self._in_thread, conn, work)

    def _in_thread(self, conn: Connection, work: Callable[[], None]) -> None:
        try:
            work()
        finally:
            self.done.put((conn, work))
            os.write(self.done_w, b".")

    def _on_done(self) -> None:
        try:
            os.read(self.done_r, 4096)
        except BlockingIOError:
            pass
        while True:
            try:
                conn, _ = self.done.get_nowait()
            except queue.Empty:
                break
            self.owned.discard(conn.fd)
            if self._pump(conn) == KEEP:
                self._advance(conn)
        self._update_accepting()

    # ------------------------------------------------------------------ deadlines
    def _sweep(self, now: float) -> float:
        """Act on connections past their deadline.  Returns when the next one is due."""
        due = now + HEARTBEAT_INTERVAL
        for conn in list(self.conns.values()):
            phase = conn.phase
            if phase == APP:
                continue  # the app's time is the master's business (heartbeat, graceful timeout)
            if now < conn.deadline:
                due = min(due, conn.deadline)
            elif phase == IDLE:
                self._idle_expired(conn, now)
            elif phase == PROXY:
                self.log.warning("proxy_protocol_error", error="no PROXY protocol header in time",
                                 client=_client(conn.peer))
                self._close(conn)
            elif phase == LINGERING:
                self._close(conn)
            else:
                self.log.info("client_timeout", phase=PHASE_NAMES[phase], client=_client(conn.peer),
                              seconds={HEAD: self.spec.header_timeout, BODY: self.spec.body_timeout,
                                       WRITE: self.spec.write_timeout}[phase])
                if phase == WRITE:
                    self._abort(conn, reset=True)
                else:
                    self._reject(conn, 408, f"request {PHASE_NAMES[phase]} too slow")
        return due

    def _idle_expired(self, conn: Connection, now: float) -> None:
        """An idle keep-alive connection timed out.  Bytes that arrived while the loop was busy
        (one long request with --threads 1) are a request: serve it, never drop it."""
        try:
            waiting = conn.sock.recv(1, PEEK)
        except (BlockingIOError, InterruptedError):
            waiting = None
        except OSError:
            waiting = b""
        if waiting:
            self._read(conn)
        elif waiting == b"":
            self._close(conn)
        else:
            self._linger(conn, now)

    # ------------------------------------------------------------------ closing
    def _watch(self, conn: Connection, mask: int) -> None:
        fd = conn.fd
        current = self.events.get(fd, 0)
        if current == mask:
            return
        if not mask:
            self.ep.unregister(fd)
            del self.events[fd]
        elif current:
            self.ep.modify(fd, mask)
            self.events[fd] = mask
        else:
            self.ep.register(fd, mask)
            self.events[fd] = mask

    def _linger(self, conn: Connection, now: float) -> None:
        """Server-side close: send FIN, then keep reading (and discarding) until the client
        closes too or LINGER passes.  Closing with unread data would send a RST, which can
        destroy a response the client has not read yet."""
        if conn.phase == LINGERING:
            return
        conn.discard()
        if conn.eof:
            self._close(conn)
            return
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        conn.phase, conn.deadline = LINGERING, now + LINGER
        self._watch(conn, EPOLLIN)  # to see the client's EOF

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
        if self.conns.pop(conn.fd, None) is None:
            return
        self.events.pop(conn.fd, None)
        conn.discard()
        if conn.exchange is not None:
            ex, conn.exchange = conn.exchange, None
            self.adapter.abandon(ex)
        conn.sock.close()  # closing the fd also removes it from the epoll set
        if not self.accepting:
            self._update_accepting()


def _client(peer: Any) -> str:
    if isinstance(peer, tuple):
        return f"{peer[0]}:{peer[1]}"
    return str(peer or "unix")
