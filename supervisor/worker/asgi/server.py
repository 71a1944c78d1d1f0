"""The ASGI worker's loop: asyncio (uvloop when installed) over the listeners, the client
connections, the master's channel and SIGTERM.

Its life is the WSGI worker's (supervisor/worker/loop.py): the lifespan startup runs before
`Ready`; it accepts only once the master says `StartAccepting`; SIGTERM (or the master's death)
drains it: it stops accepting (a connection accepted after the signal goes back to the master,
`Handoff`), requests in flight finish with `Connection: close`, idle keep-alive connections
close after a short quiet, WebSockets get their close frame (1012 on a reload, recycle or
scale, after --websocket-drain; 1001 on a shutdown), then the lifespan shutdown runs, all
within --graceful-timeout.  Heartbeats carry the request counts (RequestStats).

Accepting: the listeners sit in an epoll set of their own with EPOLLEXCLUSIVE (one worker wakes
per connection), registered only while this worker accepts; the event loop watches that set.
"""

from __future__ import annotations

import asyncio
import os
import select
import signal
import _socket
import socket
import time
import traceback
from typing import Any, Callable

from supervisor import proto
from supervisor.channel import Channel
from supervisor.worker import accesslog, forwarded
from supervisor.worker.asgi.http import UPGRADED, Cycle, HttpConn, build_scope
from supervisor.worker.asgi.lifespan import Lifespan
from supervisor.worker.asgi.websocket import CLOSE_WAIT, WsConn
from supervisor.worker.http import REASONS, RejectLog, Request
from supervisor.worker.spec import WorkerSpec
from supervisor.worker.stats import NoStats, RequestStats
from supervisor.worker.wsgi import _DateCache

try:  # optional: `pip install supervise[uvloop]`
    import uvloop
except ImportError:
    uvloop = None  # type: ignore[assignment]

HEARTBEAT_INTERVAL = 1.0
SWEEP_INTERVAL = 0.1  # at most this often, look for connections past their deadline
FIRST_REQUEST_WAIT = 5.0  # with keep-alive off, how long a new connection may take to send its request
ACCEPT_BATCH = 16
ACCEPT_PAUSE_MIN, ACCEPT_PAUSE_MAX = 0.05, 1.0
LIFESPAN_SHARE = 0.25  # of --graceful-timeout, kept for the lifespan shutdown (at most 2 s)


def drain_time(graceful: float) -> float:
    """How long connections may take to finish once the drain began: what leaves the lifespan
    shutdown its share of --graceful-timeout (a quarter, at most 2 s)."""
    return max(graceful * (1 - LIFESPAN_SHARE), graceful - 2.0)


def new_loop() -> asyncio.AbstractEventLoop:
    """uvloop when it is installed (the `supervise[uvloop]` extra), else asyncio's own."""
    if uvloop is None:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()  # type: ignore[no-any-return]


class _Logged:
    """What accesslog's writers read from a finished request (they were made for WSGI's Exchange)."""

    __slots__ = ("environ", "req", "code", "written", "request_id")

    def __init__(self, scope: dict[str, Any], req: Request, code: int, written: int, rid: str | None) -> None:
        client = scope.get("client")
        environ = {"REQUEST_METHOD": scope.get("method", "GET"), "PATH_INFO": scope.get("path", ""),
                   "QUERY_STRING": scope.get("query_string", b"").decode("latin-1"),
                   "SERVER_PROTOCOL": "HTTP/" + req.version, "REMOTE_ADDR": client[0] if client else None}
        for name, value in scope.get("headers", ()):
            if name == b"user-agent":
                environ["HTTP_USER_AGENT"] = value.decode("latin-1")
            elif name == b"referer":
                environ["HTTP_REFERER"] = value.decode("latin-1")
        self.environ, self.req, self.code, self.written, self.request_id = environ, req, code, written, rid


class AsgiWorker:
    def __init__(self, spec: WorkerSpec, app: Callable, listeners: list[socket.socket], chan: Channel,
                 log: Any) -> None:
        self.spec = spec
        self.app = app
        self.listeners = listeners
        self.chan = chan
        self.log = log
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.conns: set[Any] = set()  # HttpConn and WsConn
        self.live: set[Any] = set()  # requests and WebSockets whose app call runs
        self.inflight = 0
        self.connecting = 0  # accepted connections whose transport is being set up
        self.websockets = 0
        self.requests = 0  # requests finished
        self.started = 0  # requests handed to the app
        self.requests_at_drain: int | None = None
        self.stats = RequestStats() if spec.metrics else NoStats()
        self.access = accesslog.writer(spec.access_log_format, log.info) if spec.access_log else None
        self.ids = accesslog.RequestIds(1) if spec.request_id else None
        self.trust = forwarded.Trust(spec.forwarded_allow_ips)
        self.limit = spec.limit_concurrency
        self.keepalive = spec.keepalive_timeout > 0
        self.idle_timeout = spec.keepalive_timeout or FIRST_REQUEST_WAIT
        # WebSockets must be told (and answer) before the drain is cut short: see _begin_drain.
        self.websocket_drain = max(0.0, min(spec.websocket_drain, drain_time(spec.graceful_timeout) - CLOSE_WAIT))
        self.date = _DateCache()
        self.head_lines: dict[Any, tuple[bytes, int]] = {}  # validated response header lines (bounded)
        self.lifespan = Lifespan(app, spec.lifespan, log)
        self.draining = False
        self.drain_why = "shutdown"  # from the master's Draining message
        self.drain_deadline = 0.0
        self.drain_started = 0.0
        self.accept_enabled = False
        self.accepting = False
        self.accept_paused_until: float | None = None
        self.accept_pause = ACCEPT_PAUSE_MIN
        self.term_arrived = False
        self.aep = select.epoll()
        self.listener_fds = {s.fileno(): s for s in listeners}
        for s in listeners:
            s.setblocking(False)
        self.done: asyncio.Future | None = None
        self.next_beat = 0.0
        self.rejects = RejectLog(log.info)

    # ------------------------------------------------------------------ life
    def run(self, ready: Callable[[], None]) -> str | None:
        """Start up, report ready, serve until drained, shut down.  Returns a boot error's text
        (the lifespan startup failed), else None."""
        loop = new_loop()
        try:
            return loop.run_until_complete(self._main(ready))
        finally:
            loop.close()

    async def _main(self, ready: Callable[[], None]) -> str | None:
        loop = self.loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._loop_error)
        self.done = loop.create_future()
        # The loop's handler runs the drain; ours only notes the signal at once, so that a look
        # right after accept() returned sees a SIGTERM delivered on that return.
        loop.add_signal_handler(signal.SIGTERM, self._on_signals)
        signal.signal(signal.SIGTERM, self._term_arrived)
        loop.add_reader(self.chan.fileno(), self._on_master)
        error = await self.lifespan.startup()
        if error is not None:
            return error
        if not self.draining:
            ready()
        self.next_beat = time.monotonic() + HEARTBEAT_INTERVAL
        loop.call_later(SWEEP_INTERVAL, self._tick)
        await self.done
        remaining = self.drain_started + self.spec.graceful_timeout - 0.2 - time.monotonic()
        await self.lifespan.shutdown(remaining)
        return None

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """What the event loop could not hand to anyone (a bug of ours in a callback, a task's
        exception nobody read): one structured event, not asyncio's lines on stderr."""
        exc = context.get("exception")
        trace = "".join(traceback.format_exception(exc)) if isinstance(exc, BaseException) else ""
        self.log.error("internal_error", error=context.get("message", ""),
                       exception=f"{type(exc).__name__}: {exc}" if exc is not None else None, traceback=trace)

    def beat(self) -> None:
        served = self.requests
        drained = served - self.requests_at_drain if self.requests_at_drain is not None else 0
        stats = self.stats
        self.chan.send(proto.Beat(served, drained, self.inflight + self.websockets, self.started,
                                  stats.by_label(), list(stats.hist), stats.seconds))

    def _tick(self) -> None:
        if self.done is not None and not self.done.done():
            self.loop.call_later(SWEEP_INTERVAL, self._tick)  # first: nothing below can stop the ticks
        now = time.monotonic()
        for conn in list(self.conns):
            conn.sweep(now)
        limit = self.spec.request_timeout
        if limit > 0:
            for item in list(self.live):
                if isinstance(item, Cycle) and not item.timed_out and now - item.started > limit:
                    item.time_out(now - item.started)
        if now >= self.next_beat:
            self.beat()
            self.next_beat = now + HEARTBEAT_INTERVAL
        if self.accept_paused_until is not None and now >= self.accept_paused_until:
            self.accept_paused_until = None
            self._update_accepting()
        if self.draining:
            if now >= self.drain_deadline and (self.conns or self.live):
                self.log.warning("drain_cut_short", connections=len(self.conns), busy=len(self.live))
                for conn in list(self.conns):
                    conn.transport.abort()
                for item in list(self.live):
                    if item.task is not None:
                        item.task.cancel()
                self.live.clear()
                self.conns.clear()
            self._check_drained()

    # ------------------------------------------------------------------ the master and signals
    def _term_arrived(self, signum: int, frame: Any) -> None:
        self.term_arrived = True

    def _on_signals(self) -> None:
        if self.term_arrived and not self.draining:
            self._begin_drain("SIGTERM")

    def _on_master(self) -> None:
        for received in self.chan.receive():
            message = received.message
            if isinstance(message, proto.Draining):
                self.drain_why = message.why
            elif isinstance(message, proto.StartAccepting) and not self.draining:
                self.accept_enabled = True
                self._update_accepting()
            elif received.fd is not None:
                self._adopt(received.fd)
        if self.chan.closed:
            self.loop.remove_reader(self.chan.fileno())
            self.drain_why = "shutdown"
            self._begin_drain("master gone")

    def _begin_drain(self, why: str) -> None:
        if self.draining:
            return
        if not self.chan.closed:
            self._on_master()  # the master's Draining(why) line came before its signal
            if self.draining:
                return
        now = time.monotonic()
        self.draining = True
        self.drain_started = now
        self.drain_deadline = now + drain_time(self.spec.graceful_timeout)
        self.requests_at_drain = self.requests
        self._update_accepting()
        for sock in self.listeners:
            sock.close()  # our copy only
        self.listener_fds.clear()
        self.aep.close()
        self.log.info("drain_started", why=why, reason=self.drain_why, connections=len(self.conns),
                      busy=self.inflight, websockets=self.websockets)
        for conn in list(self.conns):
            conn.drain_now()
        self._check_drained()

    def _check_drained(self) -> None:
        if (self.draining and not self.conns and not self.live and not self.connecting and self.done is not None
                and not self.done.done()):
            self.done.set_result(None)

    # ------------------------------------------------------------------ accepting
    def _update_accepting(self) -> None:
        on = (self.accept_enabled and not self.draining and self.accept_paused_until is None
              and len(self.conns) < self.spec.worker_connections)
        if on == self.accepting:
            return
        self.accepting = on
        if on:
            for fd in self.listener_fds:
                self.aep.register(fd, select.EPOLLIN | select.EPOLLEXCLUSIVE)
            self.loop.add_reader(self.aep.fileno(), self._on_listen)
        else:
            self.loop.remove_reader(self.aep.fileno())
            for fd in self.listener_fds:
                self.aep.unregister(fd)

    def _on_listen(self) -> None:
        try:
            self.aep.poll(0)
        except OSError:
            return
        for lsock in list(self.listener_fds.values()):
            family = lsock.family
            tcp = family != socket.AF_UNIX
            for _ in range(ACCEPT_BATCH):
                self._on_signals()  # see WorkerLoop._accept: a SIGTERM may come with the event
                if not self.accepting:
                    return
                try:
                    fd, _ = lsock._accept()  # type: ignore[attr-defined]
                except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                    break
                except OSError as exc:  # out of descriptors: pause, then try again
                    self._accept_failed(exc)
                    return
                # The C socket type, as the WSGI worker does: none of socket.py's per-socket extras.
                sock = _socket.socket(family, socket.SOCK_STREAM, 0, fd)
                self._on_signals()
                if self.draining:
                    self._hand_off(sock)
                    return
                self.accept_pause = ACCEPT_PAUSE_MIN
                self._serve(sock, tcp)

    def _accept_failed(self, exc: OSError) -> None:
        self.log.warning("accept_failed", error=os.strerror(exc.errno or 0), connections=len(self.conns),
                         pause=self.accept_pause)
        self.accept_paused_until = time.monotonic() + self.accept_pause
        self.accept_pause = min(ACCEPT_PAUSE_MAX, self.accept_pause * 2)
        self._update_accepting()

    def _hand_off(self, sock: Any) -> None:
        sent = self.chan.send(proto.Handoff(), fd=sock.fileno())
        self.log.info("connection_handed_off", sent=sent)
        sock.close()

    def _adopt(self, fd: int) -> None:
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            os.close(fd)
            return
        self._serve(sock, sock.family != socket.AF_UNIX)

    def _serve(self, sock: Any, tcp: bool) -> None:
        if tcp:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        conn = HttpConn(self)
        self.connecting += 1  # accepted, not in self.conns yet: the drain must wait for it too
        self.loop.create_task(self._connect(sock, conn))

    async def _connect(self, sock: Any, conn: HttpConn) -> None:
        try:
            await self.loop.connect_accepted_socket(lambda: conn, sock)
        except OSError:
            sock.close()
            return
        finally:
            self.connecting -= 1
            if self.draining:
                self._check_drained()
        if len(self.conns) >= self.spec.worker_connections:
            self._update_accepting()

    def conn_closed(self) -> None:
        if not self.accepting and not self.draining:
            self._update_accepting()
        if self.draining:
            self._check_drained()

    # ------------------------------------------------------------------ requests
    def started_request(self) -> None:
        self.inflight += 1
        self.started += 1
        if self.started == 1:
            self.beat()  # a first request that crashes the worker is no crash loop: tell the master now

    def record(self, cycle: Any) -> None:
        self.requests += 1
        seconds = time.monotonic() - cycle.started
        scope = cycle.scope
        self.stats.record(cycle.status, scope.get("method", "GET"), seconds)
        if self.access is not None:
            logged = _Logged(scope, cycle.req, cycle.status, cycle.written, cycle.request_id)
            self.access(logged, seconds)  # type: ignore[arg-type]

    def record_websocket(self, ws: WsConn, status: int) -> None:
        self.requests += 1
        seconds = time.monotonic() - ws.started
        self.stats.record(status, "GET", seconds)
        if self.access is not None:
            logged = _Logged({**ws.scope, "method": "GET"}, ws.req, status, 0, ws.request_id)
            self.access(logged, seconds)  # type: ignore[arg-type]

    def upgrade(self, conn: HttpConn, req: Request, rest: bytes) -> bool:
        """Hand an Upgrade: websocket request over to a WsConn.  False: not a WebSocket upgrade
        (it is served as a plain request, then the connection closes)."""
        if req.method != b"GET" or not any(n.lower() == b"upgrade" and b"websocket" in v.lower()
                                           for n, v in req.headers):
            return False
        scope = build_scope(self, conn, req, "websocket")
        if isinstance(scope, str):
            return False
        rid = scope.pop("_rid")
        scope["extensions"] = {"websocket.http.response": {}}
        scope["subprotocols"] = [p.strip() for n, v in req.headers if n.lower() == b"sec-websocket-protocol"
                                 for p in v.decode("latin-1").split(",") if p.strip()]
        conn.resume()
        conn.phase = UPGRADED
        self.conns.discard(conn)
        if self.draining or (self.limit and self.inflight + self.websockets >= self.limit):
            self.conns.add(conn)
            conn.phase = 0
            conn.write(self.error_bytes(503, rid))
            conn.linger()
            return True
        lines = [req.method, b" ", req.url, b" HTTP/1.1\r\n"]
        for name, value in req.headers:
            lines += [name, b": ", value, b"\r\n"]
        lines += [b"\r\n", rest]
        if conn.c is not None:
            conn.c.discard()
        ws = WsConn(self, conn.transport, scope, req, rid, b"".join(lines), time.monotonic())
        conn.transport.set_protocol(ws)
        return True

    # ------------------------------------------------------------------ answers without the app
    def error_bytes(self, code: int, request_id: str | None = None) -> bytes:
        reason = REASONS.get(code, "Error")
        body = f"{code} {reason}\n".encode()
        rid = f"X-Request-ID: {request_id}\r\n" if request_id else ""
        head = (f"HTTP/1.1 {code} {reason}\r\n{rid}Content-Type: text/plain; charset=utf-8\r\n"
                f"Content-Length: {len(body)}\r\nDate: {self.date.get()}\r\nConnection: close\r\n\r\n")
        return head.encode("latin-1") + body

    def reject(self, conn: Any, code: int, why: str) -> None:
        self.rejects(code, why, _client(conn), time.monotonic())

    def client_timeout(self, conn: Any, phase: str, seconds: float) -> None:
        self.log.info("client_timeout", phase=phase, client=_client(conn), seconds=seconds)


def _client(conn: Any) -> str:
    client = getattr(conn, "client", None) or (getattr(conn, "scope", None) or {}).get("client")
    return f"{client[0]}:{client[1]}" if client else "unix"
