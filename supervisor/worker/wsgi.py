"""The WSGI adapter: runs the app for the requests of a connection (PEP 3333)."""

from __future__ import annotations

import io
import os
import select
import sys
import threading
import time
import traceback
from typing import Any, Callable, Iterable

import httptools

from supervisor.worker.http import (
    IO_TIMEOUT, REASONS, BodyError, BodyTooLarge, ClientGone, Connection, Request, wait,
)


class Input(io.RawIOBase):
    """wsgi.input: streams the request body straight from the connection."""

    def __init__(self, conn: Connection, req: Request, resp: _Response) -> None:
        self._conn, self._req, self._resp = conn, req, resp
        self._buf = b""
        self._continue_sent = False

    def readable(self) -> bool:
        return True

    def _fill(self) -> bool:
        """Move more body into the buffer.  False at end of body."""
        req = self._req
        while not req.body:
            if req.complete:
                return False
            if self._conn.error is not None:
                # The parser failed inside this body (it cannot have reached a later request):
                # raise rather than end the body early, so the app never takes a truncated
                # body for the whole one.
                raise BodyError("malformed request body")
            if req.expect_continue and not self._continue_sent:
                self._continue_sent = True
                if not self._resp.sent:  # a 100 after the final response started would corrupt it
                    self._conn.send(b"HTTP/1.1 100 Continue\r\n\r\n")
            self._conn.read_more()
        chunk = req.body.popleft()
        limit = self._conn.limits.body
        if limit and req.received > limit:
            raise BodyTooLarge(f"request body larger than {limit} bytes")
        self._buf = self._buf + chunk if self._buf else chunk
        return True

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            while self._fill():
                pass
            data, self._buf = self._buf, b""
            return data
        while len(self._buf) < size and self._fill():
            pass
        data, self._buf = self._buf[:size], self._buf[size:]
        return data

    def readline(self, size: int | None = -1) -> bytes:
        while True:
            pos = self._buf.find(b"\n")
            if pos >= 0 and (size is None or size < 0 or pos < size):
                data, self._buf = self._buf[:pos + 1], self._buf[pos + 1:]
                return data
            if size is not None and 0 <= size <= len(self._buf):
                data, self._buf = self._buf[:size], self._buf[size:]
                return data
            if not self._fill():
                data, self._buf = self._buf, b""
                return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def readlines(self, hint: int = -1) -> list[bytes]:  # type: ignore[override]
        lines, total = [], 0
        while True:
            line = self.readline()
            if not line:
                return lines
            lines.append(line)
            total += len(line)
            if 0 < hint <= total:
                return lines

    def __iter__(self) -> Any:
        return iter(self.readline, b"")


class FileWrapper:
    """wsgi.file_wrapper: lets the server send a file with sendfile()."""

    def __init__(self, filelike: Any, blksize: int = 65536) -> None:
        self.filelike, self.blksize = filelike, blksize
        if hasattr(filelike, "close"):
            self.close = filelike.close

    def __iter__(self) -> Any:
        read = self.filelike.read
        while True:
            block = read(self.blksize)
            if not block:
                return
            yield block


class _HeaderCache(dict):
    """b"content-type" -> "CONTENT_TYPE", b"x-foo" -> "HTTP_X_FOO", computed once per name.

    A name with an underscore maps to None and is dropped, as nginx and gunicorn do: in the
    environ `X_Forwarded_For` would be indistinguishable from a proxy's `X-Forwarded-For`."""

    def __missing__(self, name: bytes) -> str | None:
        key = name.decode("latin-1").upper().replace("-", "_")
        value: str | None = key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + key
        if b"_" in name:
            value = None
        if len(self) < 2048:  # bounded: clients must not grow the worker with made-up header names
            self[name] = value
        return value


class _DateCache:
    __slots__ = ("second", "value")

    def __init__(self) -> None:
        self.second, self.value = 0, ""

    def get(self) -> str:
        now = int(time.time())
        if now != self.second:
            self.second = now
            self.value = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now))
        return self.value


class _Response:
    __slots__ = ("status", "headers", "sent", "chunked", "length", "written", "close", "head")

    def __init__(self) -> None:
        self.status: str | None = None
        self.headers: list[tuple[str, str]] = []
        self.sent = False
        self.chunked = False
        self.length: int | None = None
        self.written = 0
        self.close = False
        self.head = False


class Handler:
    """Runs a WSGI app for the requests of a connection.  One per worker; thread-safe
    (per-request state lives in locals and `_Response`)."""

    def __init__(self, app: Callable, server_name: str, server_port: str, url_scheme: str,
                 multithread: bool, access_log: Callable[..., None] | None,
                 log_error: Callable[..., None], is_draining: Callable[[], bool], keepalive: bool = True) -> None:
        self.app = app
        self.access_log = access_log
        self.log_error = log_error
        self.is_draining = is_draining
        self.keepalive = keepalive
        self.requests = 0
        self._count_lock = threading.Lock()  # pool threads finish requests concurrently
        self._names = _HeaderCache()
        self._date = _DateCache()
        self._base = {
            "wsgi.version": (1, 0), "wsgi.url_scheme": url_scheme, "wsgi.errors": sys.stderr,
            "wsgi.multithread": multithread, "wsgi.multiprocess": True, "wsgi.run_once": False,
            "wsgi.file_wrapper": FileWrapper, "SCRIPT_NAME": "", "SERVER_NAME": server_name,
            "SERVER_PORT": server_port, "SERVER_SOFTWARE": "supervise",
        }

    # ------------------------------------------------------------------ per connection
    def serve(self, conn: Connection) -> bool:
        """Answer every dispatchable request.  Returns False when the connection must close."""
        try:
            while True:
                if conn.error is not None and not conn.sound_ahead():
                    self._error_response(conn, conn.error)
                    return False
                if not conn.dispatchable():
                    return not conn.closing and not conn.eof
                req = conn.requests[0]
                keep = self._one(conn, req)
                conn.requests.popleft()
                if not keep:
                    return False
        except ClientGone:
            return False

    def _one(self, conn: Connection, req: Request) -> bool:
        started = time.monotonic()
        environ = self._environ(conn, req)
        resp = _Response()
        resp.head = req.method == b"HEAD"
        environ["wsgi.input"] = Input(conn, req, resp)
        # Close after this response if the client asked, we are draining, the request had a
        # body we cannot skip, or the parser saw an upgrade.
        conn.client_close = not req.keep_alive
        resp.close = not req.keep_alive or conn.closing or not self.keepalive
        result: Iterable[bytes] | None = None

        def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable:
            if exc_info is not None:
                try:
                    if resp.sent:
                        raise exc_info[1].with_traceback(exc_info[2])
                finally:
                    exc_info = None
            elif resp.status is not None:
                raise AssertionError("start_response called a second time without exc_info")
            if not isinstance(status, str) or len(status) < 4 or not status[:3].isdigit() or status[3] != " ":
                raise ValueError(f"invalid status {status!r}")
            resp.status, resp.headers = status, headers
            return write

        def write(data: bytes) -> None:
            if resp.status is None:
                raise AssertionError("write() before start_response()")
            self._write(conn, req, resp, data)

        try:
            try:
                result = self.app(environ, start_response)
                if isinstance(result, (list, tuple)) and len(result) <= 1 and not resp.sent:
                    # The common case: the whole body at once, so we can send a Content-Length.
                    self._finish(conn, req, resp, result[0] if result else b"")
                elif not (isinstance(result, FileWrapper) and self._sendfile(conn, req, resp, result)):
                    for chunk in result:
                        if chunk:
                            self._write(conn, req, resp, chunk)
                    if not resp.sent:
                        self._finish(conn, req, resp, b"")
                    elif resp.chunked and not resp.head:
                        conn.send(b"0\r\n\r\n")
            finally:
                if result is not None and hasattr(result, "close"):
                    result.close()
        except ClientGone:
            raise
        except BodyError as exc:
            if resp.sent:
                raise ClientGone(f"{exc} after the response started") from None
            self._error_response(conn, exc.code)
            return False
        except Exception:
            self.log_error("app_exception", method=req.method.decode("latin-1"),
                           path=environ.get("PATH_INFO"), traceback=traceback.format_exc())
            if resp.sent:
                raise ClientGone("app failed after the response started") from None
            self._error_response(conn, 500)
            return False
        with self._count_lock:
            self.requests += 1
        if self.access_log is not None:
            self.access_log("request", method=req.method.decode("latin-1"), path=environ.get("PATH_INFO"),
                            query=environ.get("QUERY_STRING"), status=int(resp.status[:3]),  # type: ignore[index]
                            bytes=resp.written, duration=round(time.monotonic() - started, 6),
                            remote=environ.get("REMOTE_ADDR"))
        if not req.complete:
            return False  # unread body still on the wire: we cannot find the next request
        if resp.length is not None and resp.written < resp.length and not resp.head:
            return False  # body shorter than its Content-Length: only a close ends it for the client
        return not resp.close

    def _environ(self, conn: Connection, req: Request) -> dict[str, Any]:
        environ = self._base.copy()
        url = req.url
        try:
            parsed = httptools.parse_url(url)
            raw_path = parsed.path or b"/"
            query = parsed.query or b""
        except httptools.HttpParserInvalidURLError:
            raw_path, query = url, b""
        if b"%" in raw_path:
            from urllib.parse import unquote_to_bytes

            raw_path = unquote_to_bytes(raw_path)
        environ["REQUEST_METHOD"] = req.method.decode("latin-1")
        environ["PATH_INFO"] = raw_path.decode("latin-1")
        environ["QUERY_STRING"] = query.decode("latin-1")
        environ["RAW_URI"] = environ["REQUEST_URI"] = url.decode("latin-1")
        environ["SERVER_PROTOCOL"] = "HTTP/" + req.version
        peer = conn.peer
        if isinstance(peer, tuple):
            environ["REMOTE_ADDR"], environ["REMOTE_PORT"] = peer[0], str(peer[1])
        else:
            environ["REMOTE_ADDR"] = ""
        names = self._names
        for name, value in req.headers:
            key = names[name]
            if key is None:
                continue
            text = value.decode("latin-1")
            if key in environ and key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                environ[key] += "," + text  # RFC 9110: repeated fields combine with commas
            else:
                environ[key] = text
        return environ

    # ------------------------------------------------------------------ responses
    def _head_bytes(self, req: Request, resp: _Response, body_len: int | None) -> bytes:
        status = resp.status
        code = int(status[:3])  # type: ignore[index]
        no_body = code < 200 or code in (204, 304)
        lines = [f"HTTP/1.1 {status}\r\n"]
        has_length = has_conn = has_date = False
        for name, value in resp.headers:
            lname = name.lower()
            if lname == "content-length":
                has_length = True
                try:
                    resp.length = int(value)
                    if resp.length < 0:
                        raise ValueError
                except ValueError:
                    raise ValueError(f"invalid Content-Length {value!r}") from None
            elif lname == "connection":
                has_conn = True
                if value.lower() == "close":
                    resp.close = True
            elif lname == "date":
                has_date = True
            elif lname == "transfer-encoding":
                raise ValueError("the app must not set Transfer-Encoding (hop-by-hop)")
            if "\n" in value or "\r" in value or "\n" in name or "\r" in name:
                raise ValueError(f"header {name!r} contains a line break")
            lines.append(f"{name}: {value}\r\n")
        if not has_length and not no_body:
            if body_len is not None:
                lines.append(f"Content-Length: {body_len}\r\n")
                resp.length = body_len
            elif req.version == "1.1" and not resp.head:
                lines.append("Transfer-Encoding: chunked\r\n")
                resp.chunked = True
            elif not resp.head:
                resp.close = True  # HTTP/1.0 without a length: the end of the body is the close
        if no_body:
            resp.length = 0  # whatever the app yields, a 1xx/204/304 response has no body
        if not req.complete:
            resp.close = True  # the app answered before reading the whole body: it stays unread
        if not has_date:
            lines.append(f"Date: {self._date.get()}\r\n")
        if not resp.close and self.is_draining():
            resp.close = True  # the worker began draining while this request ran: last response
        if not has_conn:
            if resp.close:
                lines.append("Connection: close\r\n")
            elif req.version == "1.0":
                lines.append("Connection: keep-alive\r\n")
        lines.append("\r\n")
        return "".join(lines).encode("latin-1")

    def _finish(self, conn: Connection, req: Request, resp: _Response, data: bytes) -> None:
        if resp.status is None:
            raise AssertionError("the app returned without calling start_response()")
        self._write(conn, req, resp, data, final=True)

    def _write(self, conn: Connection, req: Request, resp: _Response, data: bytes, final: bool = False) -> None:
        head = b""
        if not resp.sent:
            head = self._head_bytes(req, resp, len(data) if final else None)
            resp.sent = True
        if resp.head:
            data = b""
        elif resp.length is not None and len(data) > resp.length - resp.written:
            # Never more than the Content-Length: the excess would be read as the next response.
            data = data[:resp.length - resp.written]
        if not data:
            if head:
                conn.send(head)
            return
        if resp.chunked:
            conn.send(b"".join((head, b"%x\r\n" % len(data), data, b"\r\n")))
        else:
            conn.send(head + data if head else data)
        resp.written += len(data)

    def _sendfile(self, conn: Connection, req: Request, resp: _Response, wrapper: FileWrapper) -> bool:
        """Send a FileWrapper with os.sendfile when the file has a descriptor.  False: iterate."""
        try:
            fd = wrapper.filelike.fileno()
            offset = wrapper.filelike.tell()
            size = os.fstat(fd).st_size - offset
        except (AttributeError, OSError, io.UnsupportedOperation):
            return False
        if resp.status is None or resp.sent:  # after write(): the head is out, just iterate
            return False
        if not any(n.lower() == "content-length" for n, _ in resp.headers):
            resp.headers = list(resp.headers) + [("Content-Length", str(size))]
        conn.send(self._head_bytes(req, resp, None))
        resp.sent = True
        if resp.head:
            return True
        remaining = min(size, resp.length if resp.length is not None else size)
        while remaining > 0:
            try:
                sent = os.sendfile(conn.fd, fd, offset, min(remaining, 1 << 20))
            except BlockingIOError:
                wait(conn.sock, select.POLLOUT, IO_TIMEOUT)
                continue
            except OSError as exc:
                raise ClientGone(str(exc)) from None
            if sent == 0:
                break
            offset += sent
            remaining -= sent
            resp.written += sent
        return True

    def _error_response(self, conn: Connection, code: int) -> None:
        reason = REASONS.get(code, "Error")
        body = f"{code} {reason}\n".encode()
        head = (f"HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n"
                f"Content-Length: {len(body)}\r\nDate: {self._date.get()}\r\nConnection: close\r\n\r\n")
        try:
            conn.send(head.encode("latin-1") + body)
        except ClientGone:
            pass
