"""The WSGI adapter (PEP 3333): runs the app for one request and frames its response.

`Adapter.begin` builds the environ, calls the app and returns an `Exchange`: the response in
progress.  The worker loop then sends `Exchange.pending`, and asks `Adapter.more` for the next
piece only once the socket took the previous one, so the app's iterable is pulled at the
client's pace and a slow client costs the worker nothing.  `Adapter.finish` closes the
iterable, counts the request and writes the access log (`accesslog`).

With request ids on, each request gets one (the client's X-Request-ID when it is sane, else a
fresh one): in the environ as HTTP_X_REQUEST_ID and supervise.request_id, in the response as
X-Request-ID unless the app set its own (which is then the one logged), and in the log.

Nothing here waits on a client, except the legacy `write()` callable (its data is sent at
once, waiting up to the write timeout per pause) and, with request buffering off, an app
reading a body that has not arrived yet (up to the body timeout per pause).
"""

from __future__ import annotations

import io
import os
import re
import sys
import threading
import time
import traceback
from typing import Any, Callable, Iterator
from urllib.parse import unquote_to_bytes

import httptools

from supervisor.worker import accesslog, forwarded
from supervisor.worker.stats import NoStats, RequestStats
from supervisor.worker.http import REASONS, BodyError, BodyTooLarge, ClientGone, Connection, Request, send_all

EMPTY = b""
# Fields a request may carry once only (RFC 9110), as environ keys.
SINGLETONS = frozenset(("HTTP_HOST", "CONTENT_LENGTH", "CONTENT_TYPE", "HTTP_AUTHORIZATION",
                        "HTTP_PROXY_AUTHORIZATION", "HTTP_IF_MODIFIED_SINCE", "HTTP_IF_UNMODIFIED_SINCE",
                        "HTTP_IF_RANGE", "HTTP_MAX_FORWARDS", "HTTP_RANGE", "HTTP_REFERER", "HTTP_FROM",
                        "HTTP_USER_AGENT", "HTTP_CONTENT_LOCATION", "HTTP_CONTENT_RANGE", "HTTP_EXPECT",
                        "HTTP_X_FORWARDED_HOST", "HTTP_X_FORWARDED_PROTO"))


class RequestError(Exception):
    """The request is invalid (400): found while its environ is built."""
_METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")}
_PROTOCOLS = {"1.1": "HTTP/1.1", "1.0": "HTTP/1.0"}


class StreamInput(io.RawIOBase):
    """wsgi.input without request buffering: reads the body from the connection as the app asks."""

    def __init__(self, conn: Connection, req: Request, ex: "Exchange", timeout: float) -> None:
        self._conn, self._req, self._ex, self._timeout = conn, req, ex, timeout
        self._buf = b""

    def readable(self) -> bool:
        return True

    def _fill(self) -> bool:
        """Move more body into the buffer.  False at end of body."""
        req = self._req
        while not req.stream:  # None or empty
            if req.complete:
                return False
            if self._conn.error is not None:
                # The parser failed inside this body (it cannot have reached a later request):
                # raise rather than end the body early, so the app never takes a truncated
                # body for the whole one.
                if self._conn.error == 413:
                    raise BodyTooLarge(f"request body larger than {self._conn.limits.body} bytes")
                raise BodyError("malformed request body")
            if req.expect_continue and not req.continue_sent:
                req.continue_sent = True
                if not self._ex.head_sent:  # a 100 after the final response started would corrupt it
                    send_all(self._conn.sock, b"HTTP/1.1 100 Continue\r\n\r\n", self._timeout)
            self._conn.read_more(self._timeout)
        chunk = req.stream.popleft()  # type: ignore[union-attr]
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
        lines: list[bytes] = []
        total = 0
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


class _HeaderCache(dict):  # type: ignore[type-arg]
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
    """The Date header, formatted once per second."""

    __slots__ = ("second", "value", "header")

    def __init__(self) -> None:
        self.second, self.value, self.header = 0, "", b""

    def get(self) -> str:
        now = int(time.time())
        if now != self.second:
            self.second = now
            self.value = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now))
            self.header = f"Date: {self.value}\r\n".encode("latin-1")
        return self.value

    def line(self) -> bytes:
        self.get()
        return self.header


# What the app's response head may contain (RFC 9110 5.1, 5.5; RFC 9112 4): field names are
# tokens; values and the reason phrase hold no control character but HTAB (so no CR or LF:
# no response splitting); the status code has three digits.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VALUE = re.compile(r"[^\x00-\x08\x0a-\x1f\x7f]*")
_STATUS = re.compile(r"[1-5][0-9]{2} [^\x00-\x08\x0a-\x1f\x7f]*")
LENGTH, CONNECTION, DATE, REQUEST_ID = 1, 2, 3, 4
_KINDS = {"content-length": LENGTH, "connection": CONNECTION, "date": DATE, "x-request-id": REQUEST_ID}
_NOT_FROM_APPS = {"transfer-encoding", "keep-alive", "upgrade", "proxy-connection", "te", "trailer"}
CACHE_LIMIT = 4096


class _Heads:
    """Validated and encoded pieces of response heads, cached (apps repeat most of them), with
    a bound on the cache: a header is validated once however often it is sent."""

    def __init__(self) -> None:
        self.lines: dict[tuple[str, str], tuple[bytes, int]] = {}
        self.statuses: dict[str, tuple[bytes, int]] = {}

    def status(self, status: Any) -> tuple[bytes, int]:
        hit = self.statuses.get(status) if isinstance(status, str) else None
        if hit is not None:
            return hit
        if not isinstance(status, str) or not _STATUS.fullmatch(status):
            raise ValueError(f"invalid status line from the app: {status!r}")
        hit = (f"HTTP/1.1 {status}\r\n".encode("latin-1"), int(status[:3]))
        if len(self.statuses) >= CACHE_LIMIT:
            self.statuses.clear()
        self.statuses[status] = hit
        return hit

    def line(self, header: Any) -> tuple[bytes, int]:
        try:
            name, value = header
        except (TypeError, ValueError):
            raise ValueError(f"a response header must be a (name, value) pair, not {header!r}") from None
        if not isinstance(name, str) or not isinstance(value, str):
            raise ValueError(f"response header {header!r}: name and value must be str")
        if not _TOKEN.fullmatch(name):
            raise ValueError(f"invalid response header name {name!r}")
        if not _VALUE.fullmatch(value):
            raise ValueError(f"response header {name!r} has a control character (CR, LF, NUL...) in its value")
        lname = name.lower()
        if lname in _NOT_FROM_APPS:
            raise ValueError(f"the app must not set {name} (hop-by-hop, the server's business)")
        try:
            line = f"{name}: {value}\r\n".encode("latin-1")
        except UnicodeEncodeError:
            raise ValueError(f"response header {name!r} is not latin-1 (PEP 3333)") from None
        hit = (line, _KINDS.get(lname, 0))
        if type(header) is tuple:
            if len(self.lines) >= CACHE_LIMIT:
                self.lines.clear()  # bounded: varied values (lengths, dates, cookies) start it over
            self.lines[header] = hit
        return hit


def _content_length(value: str) -> int:
    if not value.isdigit() or not value.isascii():
        raise ValueError(f"invalid Content-Length from the app: {value!r}")
    return int(value)


class Exchange:
    """One request and the response in progress.  Its `start_response` and `write` are the
    callables the app gets."""

    __slots__ = ("adapter", "conn", "req", "started", "environ", "status", "code", "headers", "head_sent",
                 "chunked", "length", "written", "close", "head_only", "result", "iterator", "inline", "pending",
                 "file", "aborted", "request_id")

    def __init__(self, adapter: "Adapter", conn: Connection, req: Request, started: float) -> None:
        self.adapter = adapter
        self.conn = conn
        self.req = req
        self.started = started
        self.environ: dict[str, Any] = {}
        self.status: str | None = None
        self.code = 0  # the status code sent (set with the head)
        self.headers: list[tuple[str, str]] = []
        self.head_sent = False
        self.chunked = False
        self.length: int | None = None
        self.written = 0
        self.close = False  # the connection closes after this response
        self.head_only = req.method == b"HEAD"
        self.result: Any = None  # the app's iterable (closed at the end)
        self.iterator: Iterator[bytes] | None = None  # what is left of it (None: nothing more)
        self.inline = True  # the loop may pull the iterator itself (False: in an app thread)
        self.pending: bytes | memoryview = EMPTY  # framed bytes to send next
        self.file: list[int] | None = None  # [fd, offset, remaining] still to sendfile()
        self.aborted = False  # the response cannot be completed: drop the connection
        self.request_id: str | None = None  # as logged: ours, or the app's own X-Request-ID

    def start_response(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable:
        if exc_info is not None:
            try:
                if self.head_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.status is not None:
            raise AssertionError("start_response called a second time without exc_info")
        self.status, self.headers = status, headers  # validated when the head is built
        return self.write

    def write(self, data: bytes) -> None:
        """The legacy write(): sent at once, waiting for the client if it must."""
        if self.status is None:
            raise AssertionError("write() before start_response()")
        adapter = self.adapter
        adapter._frame(self, data)
        pending, self.pending = self.pending, EMPTY
        if pending:
            send_all(self.conn.sock, pending, adapter.write_timeout)


class Adapter:
    """Runs a WSGI app.  One per worker; thread-safe (per-request state lives in Exchange)."""

    def __init__(self, app: Callable, *, server_name: str, server_port: str, url_scheme: str, threads: int,
                 access_log: Callable[..., None] | None, log_error: Callable[..., None],
                 is_draining: Callable[[], bool], keepalive: bool, write_timeout: float,
                 body_timeout: float, trust: forwarded.Trust | None = None,
                 reject: Callable[[Connection, int, str], None] = lambda conn, code, why: None,
                 watch: Any = None, access_log_format: str = "json", request_ids: bool = False,
                 metrics: bool = True) -> None:
        self.app = app
        self.access_log = None if access_log is None else accesslog.writer(access_log_format, access_log)
        self.ids = accesslog.RequestIds(threads) if request_ids else None
        self.log_error = log_error
        self.is_draining = is_draining
        self.keepalive = keepalive
        self.write_timeout = write_timeout
        self.body_timeout = body_timeout
        self.trust = trust
        self.reject = reject  # logs a request answered with an error before reaching the app
        self.watch = watch  # supervisor.worker.watchdog.RequestWatch with --request-timeout
        self.pull_inline = threads == 1
        self.requests = 0
        self.stats = RequestStats() if metrics else NoStats()
        self._count_lock = threading.Lock()  # app threads finish requests concurrently
        self._names = _HeaderCache()
        self._date = _DateCache()
        self._heads = _Heads()
        self._base = {
            "wsgi.version": (1, 0), "wsgi.url_scheme": url_scheme, "wsgi.errors": sys.stderr,
            "wsgi.multithread": threads > 1, "wsgi.multiprocess": True, "wsgi.run_once": False,
            "wsgi.file_wrapper": FileWrapper, "wsgi.input_terminated": True, "SCRIPT_NAME": "",
            "SERVER_NAME": server_name, "SERVER_PORT": server_port, "SERVER_SOFTWARE": "supervise",
        }

    # ------------------------------------------------------------------ one request
    def begin(self, conn: Connection, req: Request, now: float) -> Exchange:
        """Call the app for `req`; the returned exchange has its first bytes pending (or is
        aborted).  Never raises."""
        ex = Exchange(self, conn, req, now)
        watch = self.watch
        ids = self.ids
        try:
            environ = ex.environ = self._environ(conn, req)
        except RequestError as exc:
            self.reject(conn, 400, str(exc))
            ex.environ = {"PATH_INFO": ""}
            if ids is not None:
                sent = next((v.decode("latin-1") for n, v in req.headers if n.lower() == b"x-request-id"), "")
                ex.request_id = sent if accesslog.valid_id(sent) else ids.new()
            ex.pending, ex.status, ex.close, ex.head_sent = self._error(ex, 400), "400 Bad Request", True, True
            ex.code = 400
            return ex
        except Exception as exc:  # noqa: BLE001 - a bug of ours must cost one request, not the worker
            self.log_error("internal_error", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
            ex.environ = {"PATH_INFO": ""}
            self._failed(ex, exc)
            return ex
        if ids is not None:
            rid = environ.get("HTTP_X_REQUEST_ID")
            if rid is None or not accesslog.valid_id(rid):
                rid = environ["HTTP_X_REQUEST_ID"] = ids.new()
            environ["supervise.request_id"] = ex.request_id = rid
        if req.body is not None:
            environ["wsgi.input"] = req.body.reader()
            environ["CONTENT_LENGTH"] = str(req.body.size)  # also for a chunked body: it is whole
            if req.trailers:  # PEP 3333 has no place for them: a server-specific key
                environ["supervise.trailers"] = [(n.decode("latin-1"), v.decode("latin-1"))
                                                 for n, v in req.trailers]
        elif conn.buffered:
            environ["wsgi.input"] = io.BytesIO()
        else:
            environ["wsgi.input"] = StreamInput(conn, req, ex, self.body_timeout)
        # Close after this response if the client asked, we are draining, the request had a
        # body we cannot skip, or the parser saw an upgrade.
        conn.client_close = not req.keep_alive
        ex.close = not req.keep_alive or conn.closing or not self.keepalive

        if watch is not None:
            watch.arm(conn, ex)
        try:
            result = ex.result = self.app(environ, ex.start_response)
            if type(result) in (list, tuple) and len(result) <= 1 and not ex.head_sent:
                # The common case: the whole body at once, so it goes with a Content-Length.
                self._frame(ex, result[0] if result else EMPTY, final=True)
            elif isinstance(result, FileWrapper) and self._sendfile(ex, result):
                pass
            else:
                ex.iterator = iter(result)
                ex.inline = self.pull_inline or isinstance(result, (list, tuple))
                self.more(ex)
        except BaseException as exc:  # noqa: BLE001 - whatever the app raises is answered
            self._failed(ex, exc)
        finally:
            if watch is not None:
                watch.disarm()
        return ex

    def more(self, ex: Exchange) -> None:
        """Pull the next non-empty chunk of the app's iterable into `ex.pending`; at its end,
        set `iterator` to None (and queue the chunked terminator).  Never raises."""
        iterator = ex.iterator
        if iterator is None:
            return
        watch = self.watch
        if watch is not None:
            watch.arm(ex.conn, ex)
        try:
            for chunk in iterator:
                if chunk:
                    self._frame(ex, chunk)
                    if ex.pending:
                        return
            ex.iterator = None
            if not ex.head_sent:
                self._frame(ex, EMPTY, final=True)
            elif ex.chunked and not ex.head_only:
                ex.pending = b"0\r\n\r\n"
        except BaseException as exc:  # noqa: BLE001
            self._failed(ex, exc)
        finally:
            if watch is not None:
                watch.disarm()

    def finish(self, ex: Exchange) -> bool:
        """The response is sent (or abandoned): close the iterable, count, log.  True when
        the connection can carry the next request."""
        result, ex.result = ex.result, None
        if result is not None and result.__class__ is not list and hasattr(result, "close"):
            try:
                result.close()
            except Exception:  # noqa: BLE001
                self._log_exception(ex)
                ex.aborted = ex.aborted or not ex.head_sent
        if ex.aborted:
            return False
        seconds = time.monotonic() - ex.started
        method = ex.environ.get("REQUEST_METHOD") or "other"
        if self.pull_inline:  # --threads 1: only the loop's thread counts
            self.requests += 1
            self.stats.record(ex.code, method, seconds)
        else:
            with self._count_lock:
                self.requests += 1
                self.stats.record(ex.code, method, seconds)
        if self.access_log is not None:
            self.access_log(ex, seconds)
        if not ex.req.complete:
            return False  # unread body still on the wire: we cannot find the next request
        if ex.length is not None and ex.written < ex.length and not ex.head_only:
            return False  # body shorter than its Content-Length: only a close ends it for the client
        return not ex.close

    def abandon(self, ex: Exchange) -> None:
        """The connection is gone mid-response: close the iterable, count nothing."""
        ex.aborted = True
        self.finish(ex)

    def error_bytes(self, code: int) -> bytes:
        reason = REASONS.get(code, "Error")
        body = f"{code} {reason}\n".encode()
        head = (f"HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n"
                f"Content-Length: {len(body)}\r\nDate: {self._date.get()}\r\nConnection: close\r\n\r\n")
        return head.encode("latin-1") + body

    def _error(self, ex: Exchange, code: int) -> bytes:
        """error_bytes, with the request's id after the status line."""
        data = self.error_bytes(code)
        if ex.request_id is not None:
            data = data.replace(b"\r\n", f"\r\nX-Request-ID: {ex.request_id}".encode("latin-1") + b"\r\n", 1)
        return data

    # ------------------------------------------------------------------ failures
    def _failed(self, ex: Exchange, exc: BaseException) -> None:
        """The app (or reading its body) failed: answer with an error if nothing was sent yet,
        else the connection must be dropped (a response cannot be taken back)."""
        ex.iterator = None
        if isinstance(exc, ClientGone):
            ex.aborted = True
            return
        if isinstance(exc, BodyError):
            code = exc.code
        else:
            self._log_exception(ex)
            code = 500
            if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: not ours to swallow
                ex.aborted = True
        if ex.head_sent:
            ex.aborted = True
            return
        ex.pending, ex.status, ex.close, ex.head_sent = self._error(ex, code), f"{code} {REASONS[code]}", True, True
        ex.code, ex.length, ex.written, ex.file = code, None, 0, None

    def _log_exception(self, ex: Exchange) -> None:
        self.log_error("app_exception", method=ex.req.method.decode("latin-1"),
                       path=ex.environ.get("PATH_INFO"), traceback=traceback.format_exc())

    # ------------------------------------------------------------------ environ
    def _environ(self, conn: Connection, req: Request) -> dict[str, Any]:
        environ = self._base.copy()
        url = req.url
        raw_uri = url.decode("latin-1")
        if url[:1] == b"/" and b"?" not in url and b"%" not in url and b"#" not in url:
            path, query = raw_uri, ""  # the common case: a plain path
        else:
            try:
                parsed = httptools.parse_url(url)
                raw_path = parsed.path or b"/"
                query = (parsed.query or b"").decode("latin-1")
            except httptools.HttpParserInvalidURLError:
                raw_path, query = url, ""
            if b"%" in raw_path:
                raw_path = unquote_to_bytes(raw_path)
            path = raw_path.decode("latin-1")
        method = req.method
        environ["REQUEST_METHOD"] = _METHODS.get(method) or method.decode("latin-1")
        environ["PATH_INFO"] = path
        environ["QUERY_STRING"] = query
        environ["RAW_URI"] = environ["REQUEST_URI"] = raw_uri
        environ["SERVER_PROTOCOL"] = _PROTOCOLS.get(req.version) or "HTTP/" + req.version
        remote = conn.remote
        if remote is None:
            peer = conn.peer
            remote = conn.remote = (peer[0], str(peer[1])) if isinstance(peer, tuple) else ("", "")
        environ["REMOTE_ADDR"], environ["REMOTE_PORT"] = remote
        names = self._names
        for name, value in req.headers:
            key = names[name]
            if key is None:
                continue
            text = value.decode("latin-1")
            if key in environ:
                if key in SINGLETONS and (key == "HTTP_HOST" or environ[key] != text):
                    # Once-only fields repeated (RFC 9110; Host: RFC 9112 3.2) make a request
                    # ambiguous: which one did an intermediary act on?  A smuggling vector.
                    raise RequestError(f"{key[5:] if key.startswith('HTTP_') else key} repeated")
                environ[key] += "," + text  # RFC 9110: repeated fields combine with commas
            else:
                environ[key] = text
        if "HTTP_HOST" not in environ and req.version == "1.1":
            raise RequestError("an HTTP/1.1 request needs a Host field (RFC 9112 3.2)")
        if ("HTTP_X_FORWARDED_FOR" in environ or "HTTP_FORWARDED" in environ or "HTTP_X_FORWARDED_PROTO" in environ
                or "HTTP_X_FORWARDED_HOST" in environ) and self.trust is not None:
            trusted = conn.trusted
            if trusted is None:
                peer = conn.peer
                trusted = conn.trusted = self.trust(peer[0]) if isinstance(peer, tuple) else True
            if trusted:
                forwarded.apply(environ, self.trust)
        return environ

    # ------------------------------------------------------------------ responses
    def _head_bytes(self, ex: Exchange, body_len: int | None) -> bytes:
        """The response head, from what the app gave start_response (validated: a bad status
        line or header is the app's error, answered with a 500, never sent)."""
        if ex.status is None:
            raise AssertionError("the app returned without calling start_response()")
        heads = self._heads
        status_line, code = heads.status(ex.status)
        ex.code = code
        req = ex.req
        no_body = code < 200 or code in (204, 304)
        lines = [status_line]
        has_length = has_conn = has_date = False
        own_id = None
        cache = heads.lines
        for header in ex.headers:
            try:
                hit = cache.get(header)
            except TypeError:  # a list instead of a tuple
                hit = None
            if hit is None:
                hit = heads.line(header)
            line, kind = hit
            lines.append(line)
            if kind:
                if kind == LENGTH:
                    has_length = True
                    ex.length = _content_length(header[1])
                elif kind == CONNECTION:
                    has_conn = True
                    if header[1].lower() == "close":
                        ex.close = True
                elif kind == DATE:
                    has_date = True
                else:
                    own_id = header[1]
        if not has_length and not no_body:
            if body_len is not None:
                lines.append(b"Content-Length: %d\r\n" % body_len)
                ex.length = body_len
            elif req.version == "1.1" and not ex.head_only:
                lines.append(b"Transfer-Encoding: chunked\r\n")
                ex.chunked = True
            elif not ex.head_only:
                ex.close = True  # HTTP/1.0 without a length: the end of the body is the close
        if no_body:
            ex.length = 0  # whatever the app yields, a 1xx/204/304 response has no body
        if not req.complete:
            ex.close = True  # the app answered before reading the whole body: it stays unread
        if not has_date:
            lines.append(self._date.line())
        if own_id is not None:
            ex.request_id = own_id  # the app's own X-Request-ID wins, and is the one logged
        elif ex.request_id is not None:
            lines.append(b"X-Request-ID: " + ex.request_id.encode("latin-1") + b"\r\n")
        if not ex.close and self.is_draining():
            ex.close = True  # the worker began draining while this request ran: last response
        if not has_conn:
            if ex.close:
                lines.append(b"Connection: close\r\n")
            elif req.version == "1.0":
                lines.append(b"Connection: keep-alive\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)

    def _frame(self, ex: Exchange, data: bytes, final: bool = False) -> None:
        """Append `data` (a piece of the body) to `ex.pending`, with the head before the first
        piece and chunk framing when the length is not known."""
        if ex.aborted:
            raise ClientGone("the request timed out")  # the watchdog answered it (504)
        head = EMPTY
        if not ex.head_sent:
            if not isinstance(data, bytes):
                raise TypeError(f"the app yielded {type(data).__name__}, not bytes")
            if self.watch is None:
                head = self._head_bytes(ex, len(data) if final else None)
                ex.head_sent = True
            else:
                with self.watch.lock:  # the watchdog may be answering 504 right now
                    if ex.aborted:
                        raise ClientGone("the request timed out")
                    head = self._head_bytes(ex, len(data) if final else None)
                    ex.head_sent = True
        if ex.head_only:
            data = EMPTY
        elif ex.length is not None and len(data) > ex.length - ex.written:
            # Never more than the Content-Length: the excess would be read as the next response.
            data = data[:ex.length - ex.written]
        if data:
            ex.written += len(data)
            if ex.chunked:
                data = b"".join((b"%x\r\n" % len(data), data, b"\r\n"))
        out = head + data if head else data
        ex.pending = (bytes(ex.pending) + out) if ex.pending else out

    def _sendfile(self, ex: Exchange, wrapper: FileWrapper) -> bool:
        """A FileWrapper over a real file: the head now, the file by sendfile().  False: iterate."""
        try:
            fd = wrapper.filelike.fileno()
            offset = wrapper.filelike.tell()
            size = os.fstat(fd).st_size - offset
        except (AttributeError, OSError, io.UnsupportedOperation):
            return False
        if ex.status is None or ex.head_sent:  # after write(): the head is out, just iterate
            return False
        if not any(n.lower() == "content-length" for n, _ in ex.headers):
            ex.headers = list(ex.headers) + [("Content-Length", str(size))]
        ex.pending = self._head_bytes(ex, None)
        ex.head_sent = True
        if not ex.head_only:
            remaining = min(size, ex.length if ex.length is not None else size)
            if remaining > 0:
                ex.file = [fd, offset, remaining]
        return True
