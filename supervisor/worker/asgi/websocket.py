"""One WebSocket connection (RFC 6455) of the ASGI worker, framed by wsproto.

The HTTP connection hands over after an Upgrade head: its bytes (and what followed them) go to
a wsproto server connection, which checks the handshake.  The app gets `websocket.connect`,
answers `websocket.accept` (or `websocket.close`: 403), then messages flow both ways.  Pings
are answered by the server; fragmented messages are put together, and one over
--websocket-max-message-size closes the connection with 1009.  Reading stops while the app has
not taken MAX_QUEUED messages; `send()` waits while the client does not read (--write-timeout).

When the worker drains, the server closes the connection: 1012 (service restart: reconnect)
on a reload, recycle or scale, after --websocket-drain; 1001 (going away) on a shutdown.  The
app gets `websocket.disconnect` with that code.
"""

from __future__ import annotations

import asyncio
import time
import traceback
from collections import deque
from typing import TYPE_CHECKING, Any

from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (AcceptConnection, BytesMessage, CloseConnection, Ping, RejectConnection, RejectData,
                            Request, TextMessage)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

if TYPE_CHECKING:
    from supervisor.worker.asgi.server import AsgiWorker

MAX_QUEUED = 16  # messages read ahead of the app before reading pauses
CLOSE_WAIT = 2.0  # how long the server waits for the client's close frame after its own
RECONNECT_SETTLE = 0.25  # the least time between a drain's start and its 1012 (see drain_now)
HANDSHAKE, OPEN, CLOSING, CLOSED, DENYING = range(5)
GOING_AWAY, SERVICE_RESTART, TOO_BIG, PROTOCOL_ERROR, INTERNAL_ERROR, NORMAL = 1001, 1012, 1009, 1002, 1011, 1000


class WsConn(asyncio.Protocol):
    def __init__(self, worker: AsgiWorker, transport: Any, scope: dict[str, Any], req: Any,
                 request_id: str | None, handshake: bytes, started: float) -> None:
        self.worker = worker
        self.req = req
        self.transport = transport
        self.scope = scope
        self.request_id = request_id
        self.started = started
        self.ws = WSConnection(ConnectionType.SERVER)
        self.state = HANDSHAKE
        self.inbox: deque[dict[str, Any]] = deque()
        self.waiter: asyncio.Future | None = None
        self.parts: list[Any] = []  # the pieces of a fragmented message
        self.size = 0
        self.paused = False
        self.write_paused = False
        self.write_paused_at = 0.0
        self.write_waiter: asyncio.Future | None = None
        self.gone = False
        self.deadline: float | None = None  # while CLOSING: the close frame's deadline
        self.close_at: float | None = None  # while draining: when the server closes it
        self.close_code = SERVICE_RESTART
        self.task: asyncio.Task | None = None
        self.status = 0  # the handshake's answer (101, 403, 500...) for the log
        self.max_size = worker.spec.websocket_max_message_size
        self.told = False  # the app got its websocket.disconnect
        self.heard = started  # when the client last sent anything
        self.pinged = False  # a keep-alive ping is unanswered
        worker.conns.add(self)
        worker.websockets += 1
        self._feed(handshake)

    # ------------------------------------------------------------------ asyncio callbacks
    def data_received(self, data: bytes) -> None:
        self.heard = time.monotonic()  # any bytes prove the peer alive (a pong among them)
        self.pinged = False
        self._feed(data)

    def eof_received(self) -> bool | None:
        self._lost()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost()

    def pause_writing(self) -> None:
        self.write_paused, self.write_paused_at = True, time.monotonic()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._release(self.write_waiter)

    # ------------------------------------------------------------------ frames in
    def _feed(self, data: bytes) -> None:
        if self.gone:
            return
        try:
            self.ws.receive_data(data)
            events = list(self.ws.events())
        except RemoteProtocolError as exc:
            self._protocol_error(exc)
            return
        for event in events:
            if isinstance(event, (TextMessage, BytesMessage)):
                self._message(event)
            elif isinstance(event, Ping):
                if self.state == OPEN:  # once closing, no more pongs (wsproto refuses them too)
                    self._write(self.ws.send(event.response()))
            elif isinstance(event, Request):
                self._push({"type": "websocket.connect"})
                self.worker.live.add(self)
                self.task = self.worker.loop.create_task(self._run())
            elif isinstance(event, CloseConnection):
                if self.ws.state is ConnectionState.REMOTE_CLOSING:
                    self._write(self.ws.send(event.response()))
                self._push({"type": "websocket.disconnect", "code": event.code, "reason": event.reason or ""})
                self._close_transport()
                return
            if self.gone or self.state == CLOSED:
                return
        if len(self.inbox) >= MAX_QUEUED and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def _message(self, event: TextMessage | BytesMessage) -> None:
        if self.state != OPEN:
            return  # closing: what still arrives is dropped, not kept
        self.parts.append(event.data)
        self.size += len(event.data)
        if self.max_size and self.size > self.max_size:
            self.parts, self.size = [], 0
            self.close(TOO_BIG, "message too big")
            return
        if not event.message_finished:
            return
        empty = "" if isinstance(event, TextMessage) else b""
        data = self.parts[0] if len(self.parts) == 1 else empty.join(self.parts)
        self.parts, self.size = [], 0
        if isinstance(event, TextMessage):
            self._push({"type": "websocket.receive", "text": data})
        else:
            self._push({"type": "websocket.receive", "bytes": data})

    def _protocol_error(self, exc: RemoteProtocolError) -> None:
        if self.state == HANDSHAKE:
            self.worker.reject(self, 400, f"WebSocket handshake: {exc}")
            self.status = 400
            self._write(self.worker.error_bytes(400))
            self._close_transport()
        else:
            self.close(PROTOCOL_ERROR, "protocol error")

    def _push(self, message: dict[str, Any]) -> None:
        if message["type"] == "websocket.disconnect":
            if self.told:
                return  # the app hears of the end once
            self.told = True
        self.inbox.append(message)
        self._release(self.waiter)

    # ------------------------------------------------------------------ the app
    async def receive(self) -> dict[str, Any]:
        while not self.inbox:
            if self.state == CLOSED and self.gone:
                return {"type": "websocket.disconnect", "code": 1006, "reason": ""}
            self.waiter = self.worker.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        message = self.inbox.popleft()
        if self.paused and len(self.inbox) < MAX_QUEUED // 2 and not self.gone:
            self.paused = False
            self.transport.resume_reading()
        return message

    async def send(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "websocket.send":
            if self.state != OPEN:
                if self.state == HANDSHAKE:
                    raise RuntimeError("websocket.send before websocket.accept")
                return  # closing or closed: the app learns from websocket.disconnect
            text, data = message.get("text"), message.get("bytes")
            event = TextMessage(data=text) if text is not None else BytesMessage(data=data or b"")
            self._write(self.ws.send(event))
            if self.write_paused:
                await self._drain()
        elif kind == "websocket.accept":
            if self.state != HANDSHAKE:
                raise RuntimeError("websocket.accept after the handshake")
            headers = [(bytes(n).lower(), bytes(v)) for n, v in message.get("headers") or ()]
            if self.request_id is not None and not any(n == b"x-request-id" for n, _ in headers):
                headers.append((b"x-request-id", self.request_id.encode("latin-1")))
            self._write(self.ws.send(AcceptConnection(subprotocol=message.get("subprotocol"),
                                                      extra_headers=headers)))
            self.state = OPEN
            self._handshake_done(101)
        elif kind == "websocket.close":
            if self.state == HANDSHAKE:
                self._reject(403)
            else:
                self.close(int(message.get("code") or NORMAL), message.get("reason") or "", tell_app=False)
        elif kind == "websocket.http.response.start":  # the denial response extension
            if self.state != HANDSHAKE:
                raise RuntimeError("websocket.http.response.start after the handshake")
            status = message["status"]
            if type(status) is not int or not 100 <= status <= 599 or status == 101:
                raise RuntimeError(f"invalid denial status from the app: {status!r}")
            headers = [(bytes(n).lower(), bytes(v)) for n, v in message.get("headers") or ()]
            self._write(self.ws.send(RejectConnection(status_code=status, headers=headers, has_body=True)))
            self.state = DENYING
            self._handshake_done(status)
        elif kind == "websocket.http.response.body":
            if self.state != DENYING:
                raise RuntimeError("websocket.http.response.body without websocket.http.response.start")
            more = bool(message.get("more_body", False))
            self._write(self.ws.send(RejectData(data=message.get("body", b""), body_finished=not more)))
            if not more:
                self._close_transport()
            elif self.write_paused:
                await self._drain()
        else:
            raise RuntimeError(f"unexpected ASGI message in the websocket scope: {kind!r}")

    async def _run(self) -> None:
        try:
            await self._call()
        finally:
            self.worker.live.discard(self)
            self.worker.conn_closed()

    async def _call(self) -> None:
        worker = self.worker
        try:
            await worker.app(self.scope, self.receive, self.send)
        except BaseException as exc:  # noqa: BLE001 - the app's failure costs its connection
            if not isinstance(exc, asyncio.CancelledError):
                worker.log.error("app_exception", method="GET", path=self.scope["path"], websocket=True,
                                 traceback=traceback.format_exc())
            if self.state == HANDSHAKE:
                self._reject(500)
            else:
                self.close(INTERNAL_ERROR, "", tell_app=False)
            if not isinstance(exc, Exception) and not isinstance(exc, asyncio.CancelledError):
                raise
            return
        if self.state == HANDSHAKE:
            self._reject(403)  # the app returned without accepting: refused
        elif self.state == DENYING:
            self._close_transport()  # a denial response left unfinished: the client sees it cut
        elif self.state == OPEN:
            self.close(NORMAL, "", tell_app=False)

    def _reject(self, status: int) -> None:
        if self.state != HANDSHAKE:
            return
        body = b"" if status == 403 else b"%d\n" % status
        self._write(self.ws.send(RejectConnection(status_code=status, headers=[
            (b"content-length", str(len(body)).encode()), (b"connection", b"close")], has_body=bool(body))))
        if body:
            self._write(self.ws.send(RejectData(data=body, body_finished=True)))
        self.state = CLOSED
        self._handshake_done(status)
        self._close_transport()

    def _handshake_done(self, status: int) -> None:
        self.status = status
        self.worker.record_websocket(self, status)

    # ------------------------------------------------------------------ closing
    def close(self, code: int, reason: str = "", tell_app: bool = True) -> None:
        """The server closes: a close frame, then the client's within CLOSE_WAIT."""
        if self.state == HANDSHAKE:
            self._reject(503 if code in (GOING_AWAY, SERVICE_RESTART) else 500)
            self._push({"type": "websocket.disconnect", "code": code, "reason": reason})
            return
        if self.state == DENYING:
            self._close_transport()  # a denial response cut short
            return
        if self.state != OPEN:
            return
        self.state = CLOSING
        try:
            self._write(self.ws.send(CloseConnection(code=code, reason=reason or None)))
        except LocalProtocolError:
            self._close_transport()
        self.deadline = time.monotonic() + CLOSE_WAIT
        if tell_app:
            self._push({"type": "websocket.disconnect", "code": code, "reason": reason})

    def drain_now(self) -> None:
        """The worker drains: close after --websocket-drain (reload) or at once (shutdown)."""
        worker = self.worker
        if worker.drain_why == "shutdown":
            self.close_code = GOING_AWAY
            self.close(GOING_AWAY, "server shutting down")
        else:
            # Not at once even with --websocket-drain 0: the master signals the old generation's
            # workers one after the other, and a client told to reconnect must not find a sibling
            # that still accepts (it would get the old code again).
            self.close_code = SERVICE_RESTART
            self.close_at = time.monotonic() + max(worker.websocket_drain, RECONNECT_SETTLE)

    def sweep(self, now: float) -> None:
        if self.gone:
            return
        if self.write_paused and now - self.write_paused_at > self.worker.spec.write_timeout:
            self.worker.client_timeout(self, "write", self.worker.spec.write_timeout)
            self.transport.abort()
            return
        interval = self.worker.spec.websocket_ping_interval
        if interval > 0 and self.state == OPEN and now - self.heard >= interval:
            if self.pinged and now - self.heard >= 2 * interval:
                self.worker.client_timeout(self, "websocket ping", interval)
                self.transport.abort()  # a dead peer: no close handshake to wait for
                return
            if not self.pinged:
                self.pinged = True
                self._write(self.ws.send(Ping(b"supervise")))
        if self.close_at is not None and now >= self.close_at and self.state in (HANDSHAKE, OPEN):
            self.close_at = None
            self.close(self.close_code, "service restart")
        elif self.deadline is not None and now >= self.deadline:
            self.transport.abort()  # no close frame from the client in time

    def _close_transport(self) -> None:
        self.state = CLOSED
        if not self.gone:
            self.transport.close()  # what was written is flushed first

    def _lost(self) -> None:
        if self.gone:
            return
        self.gone = True
        worker = self.worker
        worker.conns.discard(self)
        worker.websockets -= 1
        if self.state in (HANDSHAKE, OPEN, CLOSING, DENYING) and self.task is not None:
            self._push({"type": "websocket.disconnect", "code": 1006, "reason": ""})
        self.state = CLOSED
        self._release(self.waiter)
        self._release(self.write_waiter)
        worker.conn_closed()

    # ------------------------------------------------------------------ writing
    def _write(self, data: bytes) -> None:
        if data and not self.gone:
            self.transport.write(data)

    async def _drain(self) -> None:
        while self.write_paused and not self.gone:
            self.write_waiter = self.worker.loop.create_future()
            await self.write_waiter

    @staticmethod
    def _release(future: asyncio.Future | None) -> None:
        if future is not None and not future.done():
            future.set_result(None)
