"""A WSGI app exercising every corner of the server's WSGI/HTTP support (used by tests/test_http.py).

Every route except those under /raw/ runs inside `wsgiref.validate.validator`, so any PEP 3333
violation by the server (environ, start_response, write, iterable protocol) raises inside the app
and shows up as a 500 plus an `app_exception` log event.  /raw/ routes skip the validator where
it would hide what is tested (the validator wraps the response iterable, which hides a
`wsgi.file_wrapper` object from the server's sendfile path).

Cross-request observations (was close() called? how many requests are in flight?) live in
module globals: tests run it with one worker so every request sees the same process.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tempfile
import threading
from urllib.parse import parse_qsl
from wsgiref.validate import validator

CLOSED: dict[str, int] = {}  # token -> number of close() calls seen
BARRIERS: dict[str, threading.Barrier] = {}
LOCK = threading.Lock()
FILE_DATA = bytes(range(256)) * 4096  # 1 MiB, every byte value
# The served file lives only as an open descriptor (unlinked at once: nothing to clean up);
# /proc/self/fd/N opens it again with an independent offset, as a real on-disk file.
_fd, _tmp = tempfile.mkstemp(prefix="wsgi_features_", suffix=".bin")
os.unlink(_tmp)
os.write(_fd, FILE_DATA)
FILE_PATH = f"/proc/self/fd/{_fd}"


def _reply(start_response, body: bytes, status: str = "200 OK", ctype: str = "text/plain",
           extra: list | None = None) -> list[bytes]:
    headers = [("Content-Type", ctype), ("Content-Length", str(len(body)))] + (extra or [])
    start_response(status, headers)
    return [body]


class Closeable:
    """A response iterable whose close() is recorded under `token`; may fail mid-iteration."""

    def __init__(self, token: str, parts: list[bytes], fail_at: int | None) -> None:
        self.token, self.parts, self.fail_at = token, parts, fail_at

    def __iter__(self):
        for i, part in enumerate(self.parts):
            if i == self.fail_at:
                raise RuntimeError(f"iteration failed for {self.token}")
            yield part

    def close(self) -> None:
        with LOCK:
            CLOSED[self.token] = CLOSED.get(self.token, 0) + 1


class _RecordsClose:
    """Mixin: count close() per token (the server must close what it was given)."""

    token = ""

    def close(self) -> None:
        if not self.closed:  # type: ignore[attr-defined]
            with LOCK:
                CLOSED[self.token] = CLOSED.get(self.token, 0) + 1
        super().close()  # type: ignore[misc]


class RecordingFile(_RecordsClose, io.FileIO):
    """A real file (has a descriptor, so sendfile applies) whose close() is recorded."""


class RecordingBytesIO(_RecordsClose, io.BytesIO):
    """An in-memory file (no descriptor: the server iterates it) whose close() is recorded."""


def _read_body(inp, mode: str, n: int) -> bytes:
    parts = []
    if mode == "read":  # read(n) until b"" (wsgiref's validator requires the size argument)
        while True:
            block = inp.read(n)
            if not block:
                break
            assert len(block) <= n, (len(block), n)
            parts.append(block)
    elif mode == "readline":
        while True:
            line = inp.readline()
            if not line:
                break
            assert line.endswith(b"\n") or b"\n" not in line, line
            parts.append(line)
    elif mode == "readline_n":
        while True:
            line = inp.readline(n)
            if not line:
                break
            assert len(line) <= n, (len(line), n)
            parts.append(line)
    elif mode == "iter":
        for line in inp:
            parts.append(line)
    elif mode == "readlines":
        parts.extend(inp.readlines())
    else:
        raise ValueError(mode)
    return b"".join(parts)


def app(environ, start_response):
    path = environ["PATH_INFO"]
    if path.startswith("/raw/"):  # same routes, without the validator in between
        path = path[4:]
    q = dict(parse_qsl(environ.get("QUERY_STRING", ""), keep_blank_values=True))

    if path == "/pid":
        return _reply(start_response, str(os.getpid()).encode())

    if path == "/hello":
        return _reply(start_response, b"hello world")

    if path.startswith("/env"):
        out = {}
        for key, value in environ.items():
            if isinstance(value, str):
                out[key] = value
            elif key in ("wsgi.version",):
                out[key] = list(value)
            elif isinstance(value, bool):
                out[key] = value
            else:
                out[key] = "<%s>" % type(value).__name__
        inp = environ["wsgi.input"]
        out["_input_api"] = [m for m in ("read", "readline", "readlines", "__iter__") if hasattr(inp, m)]
        out["_errors_api"] = [m for m in ("write", "writelines", "flush") if hasattr(environ["wsgi.errors"], m)]
        out["_file_wrapper_callable"] = callable(environ.get("wsgi.file_wrapper"))
        out["_body"] = inp.read(int(environ.get("CONTENT_LENGTH") or 0) or 1 << 30).decode("latin-1")
        return _reply(start_response, json.dumps(out).encode(), ctype="application/json")

    if path == "/echo":  # reads the whole body one way; answers its size and sha256 (or itself)
        data = _read_body(environ["wsgi.input"], q.get("mode", "read"), int(q.get("n", "65536")))
        if q.get("raw"):
            return _reply(start_response, data, ctype="application/octet-stream")
        body = json.dumps({"len": len(data), "sha256": hashlib.sha256(data).hexdigest()}).encode()
        return _reply(start_response, body, ctype="application/json")

    if path == "/noread":  # never touches wsgi.input
        return _reply(start_response, b"did not read")

    if path == "/boom":
        raise RuntimeError("kaboom-secret-detail")

    if path == "/exc_before":  # error before anything was sent: replace the response
        start_response("200 OK", [("Content-Type", "text/plain")])
        try:
            raise ValueError("handled before headers")
        except ValueError:
            body = b"replaced response"
            start_response("503 Service Unavailable",
                           [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))],
                           sys.exc_info())
            return [body]

    if path == "/exc_after":  # error after headers and some body went out: must drop the connection
        def gen():
            start_response("200 OK", [("Content-Type", "text/plain")])
            yield b"first part;"
            try:
                raise ValueError("failed after headers")
            except ValueError:
                start_response("500 Internal Server Error", [("Content-Type", "text/plain")],
                               sys.exc_info())
            yield b"must never be sent"
        return gen()

    if path == "/write":  # the legacy write() callable, then more from the iterable
        headers = [("Content-Type", "text/plain")]
        if q.get("cl"):
            headers.append(("Content-Length", q["cl"]))
        write = start_response("200 OK", headers)
        write(b"written;")
        write(b"again;")
        return [b"returned"]

    if path == "/gen":  # no Content-Length: chunked on HTTP/1.1, close-delimited on HTTP/1.0
        n = int(q.get("n", "5"))

        def gen():
            start_response("200 OK", [("Content-Type", "text/plain")])
            for i in range(n):
                yield b"chunk-%d;" % i
                yield b""  # empty strings must not end the chunked body
        return gen()

    if path == "/closeable":
        token = q["token"]
        fail_at = int(q["fail_at"]) if "fail_at" in q else None
        start_response("200 OK", [("Content-Type", "text/plain")])
        return Closeable(token, [b"a;", b"b;", b"c;"], fail_at)

    if path == "/closed":
        with LOCK:
            return _reply(start_response, str(CLOSED.get(q["token"], 0)).encode())

    if path == "/file":  # as /raw/file it reaches the server as a FileWrapper (the sendfile path)
        kind = q.get("kind", "real")
        offset = int(q.get("offset", "0"))
        if kind == "real":
            f = RecordingFile(FILE_PATH, "rb")
        else:
            f = RecordingBytesIO(FILE_DATA)
        f.token = q.get("token", "")
        f.seek(offset)
        write = start_response("200 OK", [("Content-Type", "application/octet-stream")])
        if q.get("prewrite"):  # the head goes out before the file wrapper is returned
            write(b"prefix;")
        return environ["wsgi.file_wrapper"](f, 8192)

    if path == "/badlength":  # an app whose Content-Length does not match what it returns
        body = q.get("body", "").encode()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", q["declared"])])
        return [body] if q.get("parts", "1") == "1" else [body[:2], body[2:]]

    if path == "/nobody":  # a status that has no body, with an app that yields one anyway
        def gen():
            start_response(q.get("status", "204 No Content"), [])
            yield b"this must not be sent"
        return gen()

    if path == "/write_then_read":  # starts the response, then reads the body
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"started;")
        data = environ["wsgi.input"].read(1 << 20)
        return [b"got %d" % len(data)]

    if path == "/badresponse":  # (as /raw/badresponse) what a buggy app may hand the server
        kind = q["kind"]
        status, headers, body = "200 OK", [("Content-Type", "text/plain")], [b"fine"]
        if kind == "split-status":
            status = "200 OK\r\nSet-Cookie: evil=1"
        elif kind == "crlf-value":
            headers.append(("X-Note", "a\r\nSet-Cookie: evil=1"))
        elif kind == "lf-name":
            headers.append(("X-Bad\nSet-Cookie", "evil=1"))
        elif kind == "space-name":
            headers.append(("X Bad", "v"))
        elif kind == "nul-value":
            headers.append(("X-Bad", "a\x00b"))
        elif kind == "not-latin1":
            headers.append(("X-Bad", "\u2603"))
        elif kind == "bad-code":
            status = "20 OK"
        elif kind == "str-body":
            body = ["text, not bytes"]
        elif kind == "str-later":
            body = [b"first", "second"]
        start_response(status, headers)
        return body

    if path == "/barrier":  # answers only when `n` requests are inside the app at the same time
        n = int(q["n"])
        with LOCK:
            barrier = BARRIERS.setdefault(q["token"], threading.Barrier(n))
        try:
            barrier.wait(timeout=float(q.get("timeout", "5")))
        except threading.BrokenBarrierError:
            return _reply(start_response, b"alone", status="504 Gateway Timeout")
        return _reply(start_response, b"together")

    return _reply(start_response, b"not found", status="404 Not Found")


_validated = validator(app)


def application(environ, start_response):
    if environ["PATH_INFO"].startswith("/raw/"):
        return app(environ, start_response)
    return _validated(environ, start_response)
