"""HTTP/1.1 + WSGI behaviour of the workers, against a real supervise process and real sockets.

The app is tests/apps/wsgi_features.py: most routes run inside wsgiref's validator, so a PEP 3333
violation by the server turns into a 500 and an `app_exception` log event; tests assert there is
none.  Nothing sleeps for a fixed time: tests wait on log events, socket answers and deadlines.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Supervise, wait_until

APPS = Path(__file__).resolve().parent / "apps"
FILE_DATA = bytes(range(256)) * 4096  # what the app's /file route serves (1 MiB)


# --------------------------------------------------------------------------- helpers


def start(supervise: Any, *extra: str, workers: int = 1) -> Supervise:
    return supervise("wsgi_features", "--workers", str(workers), "--chdir", str(APPS), "--no-watch",
                     "--access-log", *extra).ready()


def assert_no_app_errors(sv: Supervise) -> None:
    # A worker logs in order: once a last request's access-log event has been read, every event it
    # logged before (an app_exception among them) has been read too.
    token = uuid.uuid4().hex
    assert get(sv.port, f"/hello?sentinel={token}").status == 200
    sv.wait_for("request", query=f"sentinel={token}")
    errors = sv.find("app_exception")
    assert not errors, "unexpected app_exception events:\n" + "\n".join(e.get("traceback", "") for e in errors)


class Response:
    def __init__(self, version: str, status: int, reason: str, headers: list[tuple[str, str]], body: bytes,
                 chunks: list[bytes] | None) -> None:
        self.version, self.status, self.reason = version, status, reason
        self.headers, self.body, self.chunks = headers, body, chunks

    def header(self, name: str) -> str | None:
        values = [v for n, v in self.headers if n.lower() == name.lower()]
        return ",".join(values) if values else None

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.headers} {self.body[:200]!r}>"


class Client:
    """A raw HTTP/1.1 client over one socket: send exact bytes, read responses one at a time."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b"",
                version: str = "1.1") -> None:
        lines = [f"{method} {path} HTTP/{version}", "Host: test"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if body and not any(k.lower() in ("content-length", "transfer-encoding") for k in (headers or {})):
            lines.append(f"Content-Length: {len(body)}")
        self.send(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)

    def _more(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError(f"server closed the connection; unread: {self.buf[:200]!r}")
        self.buf += data

    def read_until(self, sep: bytes) -> bytes:
        while sep not in self.buf:
            self._more()
        data, _, self.buf = self.buf.partition(sep)
        return data + sep

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._more()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def read_to_eof(self) -> bytes:
        while True:
            try:
                self._more()
            except EOFError:
                data, self.buf = self.buf, b""
                return data

    def response(self, head: bool = False) -> Response:
        status_line, *header_lines = self.read_until(b"\r\n\r\n")[:-4].decode("latin-1").split("\r\n")
        version, status, reason = status_line.split(" ", 2)
        headers = [tuple(part.strip() for part in line.split(":", 1)) for line in header_lines]
        resp = Response(version, int(status), reason, headers, b"", None)  # type: ignore[arg-type]
        if head or resp.status < 200 or resp.status in (204, 304):
            return resp
        if "chunked" in (resp.header("transfer-encoding") or "").lower():
            resp.chunks = []
            while True:
                size = int(self.read_until(b"\r\n")[:-2].split(b";")[0], 16)
                if size == 0:
                    assert self.read_until(b"\r\n") == b"\r\n"  # no trailers
                    break
                resp.chunks.append(self.read_exact(size))
                assert self.read_exact(2) == b"\r\n"
            resp.body = b"".join(resp.chunks)
        elif resp.header("content-length") is not None:
            resp.body = self.read_exact(int(resp.header("content-length")))  # type: ignore[arg-type]
        else:
            resp.body = self.read_to_eof()
        return resp

    def closed_by_server(self, timeout: float = 5.0) -> bool:
        """True when the server closes the connection within `timeout` with nothing more sent."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return False
        except ConnectionResetError:
            return True
        assert not data and not self.buf, f"unexpected bytes instead of a close: {self.buf + data!r}"
        return True


def get(port: int, path: str, method: str = "GET", **kwargs: Any) -> Response:
    with Client(port) as c:
        c.request(method, path, **kwargs)
        return c.response(head=method == "HEAD")


def worker_pid(port: int) -> int:
    resp = get(port, "/pid")
    assert resp.status == 200, resp
    return int(resp.body)


def env_of(port: int, path: str = "/env", **kwargs: Any) -> dict[str, Any]:
    resp = get(port, path, **kwargs)
    assert resp.status == 200, resp
    return json.loads(resp.body)


def echo(resp: Response) -> dict[str, Any]:
    assert resp.status == 200, resp
    return json.loads(resp.body)


def digest(data: bytes) -> dict[str, Any]:
    return {"len": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


# --------------------------------------------------------------------------- environ


def test_environ_is_complete_and_pep3333_valid(supervise):
    sv = start(supervise)
    with Client(sv.port) as c:
        c.send(b"POST /env/a%20b/%C3%A9%2Fx/?x=1&y=%20&z=%C3%A9 HTTP/1.1\r\nHost: example.org:8080\r\n"
               b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: 3\r\n"
               b"X-Rep: one\r\nX-Rep: two\r\nx-rep: three\r\nX-Latin: caf\xe9\r\n"
               b"\r\nabc")
        client_port = c.sock.getsockname()[1]
        resp = c.response()
    assert resp.status == 200, resp
    env = json.loads(resp.body)
    assert env["REQUEST_METHOD"] == "POST"
    assert env["SCRIPT_NAME"] == ""
    # percent-decoded (an encoded slash included), then decoded as latin-1 (PEP 3333 "bytes as str")
    assert env["PATH_INFO"] == "/env/a b/\xc3\xa9/x/"
    assert env["QUERY_STRING"] == "x=1&y=%20&z=%C3%A9"  # not decoded
    assert env["CONTENT_TYPE"] == "text/plain; charset=utf-8"
    assert env["CONTENT_LENGTH"] == "3"
    assert "HTTP_CONTENT_TYPE" not in env and "HTTP_CONTENT_LENGTH" not in env
    assert env["SERVER_NAME"] == "127.0.0.1"
    assert env["SERVER_PORT"] == str(sv.port)
    assert env["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert env["HTTP_HOST"] == "example.org:8080"
    assert env["HTTP_X_REP"] == "one,two,three"  # repeated fields combine with commas, in order
    assert env["HTTP_X_LATIN"] == "caf\xe9"
    assert env["REMOTE_ADDR"] == "127.0.0.1"
    assert env["REMOTE_PORT"] == str(client_port)
    assert env["wsgi.version"] == [1, 0]
    assert env["wsgi.url_scheme"] == "http"
    assert env["wsgi.multithread"] is False
    assert env["wsgi.multiprocess"] is True
    assert env["wsgi.run_once"] is False
    assert set(env["_input_api"]) == {"read", "readline", "readlines", "__iter__"}
    assert set(env["_errors_api"]) == {"write", "writelines", "flush"}
    assert env["_file_wrapper_callable"] is True
    assert env["_body"] == "abc"
    assert_no_app_errors(sv)


def test_environ_simple_get_http10_and_absolute_form(supervise):
    sv = start(supervise, "--threads", "2")
    env = env_of(sv.port, "/env")
    assert env["REQUEST_METHOD"] == "GET"
    assert env["PATH_INFO"] == "/env"
    assert env["QUERY_STRING"] == ""
    assert env.get("CONTENT_LENGTH", "") == "" and "CONTENT_TYPE" not in env
    assert env["wsgi.multithread"] is True  # --threads 2

    env = env_of(sv.port, "/env?q", version="1.0")
    assert env["SERVER_PROTOCOL"] == "HTTP/1.0"
    assert env["QUERY_STRING"] == "q"

    env = env_of(sv.port, "http://example.org/env?k=v")  # absolute-form target (proxies)
    assert env["PATH_INFO"] == "/env" and env["QUERY_STRING"] == "k=v"
    assert_no_app_errors(sv)


# --------------------------------------------------------------------------- wsgi.input


@pytest.mark.parametrize("mode", ["read", "readline", "readline_n", "iter", "readlines"])
def test_large_content_length_body_streamed_in_pieces(supervise, mode):
    sv = start(supervise)
    line = b"".join(b"line %07d of the body with some padding...\n" % i for i in range(1000))
    data = (line * 120)[: 5 * 1024 * 1024 - 7]  # ~5 MB, the last line without a newline
    path = f"/echo?mode={mode}&n=7777" if mode != "iter" else "/raw/echo?mode=iter"  # raw: our __iter__
    with Client(sv.port, timeout=20) as c:
        c.send(f"PUT {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(data)}\r\n\r\n".encode())
        view = memoryview(data)
        for i in range(0, len(data), 100_003):  # odd-sized pieces, one send each
            c.send(view[i:i + 100_003])
        assert echo(c.response()) == digest(data)
        # the connection stays usable after a fully read body
        c.request("GET", "/hello")
        assert c.response().body == b"hello world"
    assert_no_app_errors(sv)


@pytest.mark.parametrize("mode", ["read", "readline", "iter"])
def test_chunked_request_body(supervise, mode):
    sv = start(supervise)
    parts = [b"first line\nsecond", b" line\n", b"x" * 70000, b"\nlast line no newline"]
    data = b"".join(parts)
    path = f"/echo?mode={mode}&n=1000&raw=1" if mode != "iter" else "/raw/echo?mode=iter&raw=1"
    with Client(sv.port) as c:
        c.send(f"POST {path} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        for part in parts:  # every chunk in its own send
            c.send(b"%x\r\n%s\r\n" % (len(part), part))
        c.send(b"0\r\n\r\n")
        resp = c.response()
        assert resp.status == 200 and resp.body == data
        c.request("GET", "/hello")  # keep-alive after a chunked body
        assert c.response().body == b"hello world"
    assert_no_app_errors(sv)


def test_read_n_returns_at_most_n_and_keeps_the_rest(supervise):
    sv = start(supervise)
    data = bytes(range(256)) * 40
    for n in (1, 3, 1000, 20000):
        resp = get(sv.port, f"/echo?mode=read&n={n}&raw=1", method="POST", body=data)
        assert resp.status == 200 and resp.body == data, n
    assert_no_app_errors(sv)


def test_expect_100_continue_sent_when_app_reads_body(supervise):
    sv = start(supervise)
    body = b"the body after continue"
    with Client(sv.port) as c:
        c.send(f"POST /echo?raw=1 HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n"
               f"Content-Length: {len(body)}\r\n\r\n".encode())
        interim = c.response()  # the body is not sent until the server asks for it
        assert (interim.status, interim.version) == (100, "HTTP/1.1")
        c.send(body)
        final = c.response()
        assert final.status == 200 and final.body == body
        c.request("GET", "/hello")
        assert c.response().body == b"hello world"
    assert_no_app_errors(sv)


def test_expect_100_continue_with_buffering_is_sent_before_the_app_runs(supervise):
    """The server reads the body before the app: it asks for it at once, whatever the app does."""
    sv = start(supervise)
    body = b"x" * 1000
    with Client(sv.port) as c:
        c.send(b"POST /noread HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 1000\r\n\r\n")
        assert c.response().status == 100
        c.send(body)
        resp = c.response()
        assert resp.status == 200 and resp.body == b"did not read" and resp.header("connection") is None
        c.request("GET", "/hello")
        assert c.response().body == b"hello world"
    assert_no_app_errors(sv)


def test_expect_100_continue_not_sent_when_a_streaming_app_ignores_body(supervise):
    sv = start(supervise, "--request-buffering", "0")
    with Client(sv.port) as c:
        c.send(b"POST /noread HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 1000000\r\n\r\n")
        resp = c.response()  # straight to the final response, no 100
        assert resp.status == 200 and resp.body == b"did not read"
        # the unsent body makes the connection unusable: the server says so, and closes it
        assert resp.header("connection") == "close"
        assert c.closed_by_server()
    assert_no_app_errors(sv)


def test_100_continue_not_sent_once_the_response_started(supervise):
    sv = start(supervise, "--request-buffering", "0")  # the app reads the body as it arrives
    with Client(sv.port) as c:
        c.send(b"POST /write_then_read HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
        head = c.read_until(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and b"chunked" in head.lower()
        assert c.read_until(b"started;\r\n") == b"8\r\nstarted;\r\n"
        c.send(b"abc")  # the app now waits for the body: a 100 here would land inside the body
        assert c.read_until(b"0\r\n\r\n") == b"5\r\ngot 3\r\n0\r\n\r\n"
    assert_no_app_errors(sv)


def test_100_continue_never_sent_to_http10(supervise):
    sv = start(supervise)
    with Client(sv.port) as c:
        c.send(b"POST /echo HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
        # RFC 9110 10.1.1: an HTTP/1.0 request's expectation is ignored.  Half-close instead of
        # sending the body: whatever the server says before seeing the EOF is all it would say.
        c.sock.shutdown(socket.SHUT_WR)
        assert c.read_to_eof() == b""
    assert worker_pid(sv.port)  # the worker is fine


def test_unread_complete_body_does_not_break_keepalive(supervise):
    sv = start(supervise)
    with Client(sv.port) as c:
        for _ in range(3):  # the app ignores a body that fully arrived: it is skipped, not fatal
            c.request("POST", "/noread", body=b"ignored body")
            resp = c.response()
            assert resp.status == 200 and resp.header("connection") is None
        c.request("GET", "/hello")
        assert c.response().body == b"hello world"
    assert_no_app_errors(sv)


def test_expect_100_continue_with_body_over_limit_gets_413_without_100(supervise):
    sv = start(supervise, "--limit-request-body", "1k")
    with Client(sv.port) as c:
        c.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 5000\r\n\r\n")
        resp = c.response()
        assert resp.status == 413
        assert c.closed_by_server()
    assert_no_app_errors(sv)


def test_malformed_chunk_inside_a_body_being_read_is_400(supervise):
    sv = start(supervise)
    with Client(sv.port) as c:
        c.send(b"POST /echo?raw=1 HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nTransfer-Encoding: chunked\r\n\r\n")
        assert c.response().status == 100  # the app is reading the body now
        c.send(b"5\r\nhello\r\nZZZ\r\nbroken\r\n0\r\n\r\n")
        resp = c.response()
        # not a 200 echoing the truncated body "hello" as if it were all of it
        assert resp.status == 400, resp
        assert c.closed_by_server()
    assert_no_app_errors(sv)


# --------------------------------------------------------------------------- start_response / iterables


def test_exc_info_before_headers_replaces_response(supervise):
    sv = start(supervise)
    with Client(sv.port) as c:
        c.request("GET", "/exc_before")
        resp = c.response()
        assert resp.status == 503 and resp.body == b"replaced response"
        c.request("GET", "/hello")  # a handled error: the connection stays usable
        assert c.response().body == b"hello world"
    assert_no_app_errors(sv)


def test_exc_info_after_headers_drops_connection(supervise):
    sv = start(supervise)
    pid = worker_pid(sv.port)
    with Client(sv.port) as c:
        c.request("GET", "/exc_after")
        raw = c.read_to_eof()  # the server must close the connection
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"transfer-encoding: chunked" in head.lower()
    assert b"first part;" in body
    assert b"must never be sent" not in body and b"500" not in body
    assert not body.endswith(b"0\r\n\r\n"), "a truncated chunked body must not look complete"
    event = sv.wait_for("app_exception")
    assert "failed after headers" in event["traceback"]
    assert worker_pid(sv.port) == pid


@pytest.mark.parametrize("cl", ["", "22"])
def test_write_callable(supervise, cl):
    sv = start(supervise)
    with Client(sv.port) as c:
        c.request("GET", f"/write?cl={cl}")
        resp = c.response()
        assert resp.status == 200 and resp.body == b"written;again;returned"
        if cl:
            assert resp.header("content-length") == cl and resp.header("transfer-encoding") is None
        else:
            assert resp.header("transfer-encoding") == "chunked"
        c.request("GET", "/hello")
        assert c.response().body == b"hello world"
    assert_no_app_errors(sv)


def test_iterable_close_called_on_success_and_on_error(supervise):
    sv = start(supervise)
    resp = get(sv.port, "/closeable?token=ok")
    assert resp.status == 200 and resp.body == b"a;b;c;"
    assert get(sv.port, "/closed?token=ok").body == b"1"

    # fails before anything was sent: a 500, and close() still called
    resp = get(sv.port, "/closeable?token=fail0&fail_at=0")
    assert resp.status == 500
    assert get(sv.port, "/closed?token=fail0").body == b"1"

    # fails after the headers went out: connection dropped, close() still called
    with Client(sv.port) as c:
        c.request("GET", "/closeable?token=fail2&fail_at=2")
        raw = c.read_to_eof()
    assert raw.startswith(b"HTTP/1.1 200 ") and not raw.endswith(b"0\r\n\r\n")
    assert get(sv.port, "/closed?token=fail2").body == b"1"
    sv.wait_for("app_exception", count=2)


@pytest.mark.parametrize("offset", [0, 12345])
def test_file_wrapper_real_file_uses_sendfile(supervise, offset):
    sv = start(supervise)
    with Client(sv.port) as c:
        c.request("GET", f"/raw/file?kind=real&token=f{offset}&offset={offset}")
        resp = c.response()
        assert resp.status == 200
        # the sendfile path knows the size up front: Content-Length, not chunked
        assert resp.header("content-length") == str(len(FILE_DATA) - offset)
        assert resp.header("transfer-encoding") is None
        assert resp.body == FILE_DATA[offset:]
        c.request("HEAD", "/raw/file?kind=real")
        head = c.response(head=True)
        assert head.status == 200 and head.header("content-length") == str(len(FILE_DATA))
        c.request("GET", "/hello")  # a HEAD sent no body: the next response parses
        assert c.response().body == b"hello world"
    assert get(sv.port, f"/closed?token=f{offset}").body == b"1"
    assert_no_app_errors(sv)


def test_file_wrapper_after_write_sends_one_head(supervise):
    sv = start(supervise)
    with Client(sv.port) as c:
        c.request("GET", "/raw/file?kind=real&prewrite=1&token=pw")
        resp = c.response()
        assert resp.status == 200 and resp.header("transfer-encoding") == "chunked"
        assert resp.body == b"prefix;" + FILE_DATA  # no second status line inside the body
        c.request("GET", "/hello")
        assert c.response().body == b"hello world"
    assert get(sv.port, "/closed?token=pw").body == b"1"
    assert_no_app_errors(sv)


def test_file_wrapper_bytesio_is_iterated(supervise):
    sv = start(supervise)
    for path in ("/raw/file?kind=bytesio&token=b1", "/file?kind=bytesio&token=b2&offset=7"):
        resp = get(sv.port, path)
        assert resp.status == 200
        assert resp.header("transfer-encoding") == "chunked"
        assert resp.body == FILE_DATA[7 if "offset" in path else 0:]
    assert get(sv.port, "/closed?token=b1").body == b"1"
    assert get(sv.port, "/closed?token=b2").body == b"1"
    # a real file through the validator is iterated too (the validator hides the wrapper)
    resp = get(sv.port, "/file?kind=real&token=r1")
    assert resp.body == FILE_DATA and get(sv.port, "/closed?token=r1").body == b"1"
    assert_no_app_errors(sv)


# --------------------------------------------------------------------------- connections


def test_keepalive_many_requests_one_connection(supervise):
    sv = start(supervise, workers=2)
    with Client(sv.port) as c:
        ports = set()
        for i in range(20):
            c.request("GET", f"/env?i={i}")
            resp = c.response()
            assert resp.status == 200 and resp.header("connection") is None
            env = json.loads(resp.body)
            assert env["QUERY_STRING"] == f"i={i}"
            ports.add(env["REMOTE_PORT"])
        assert len(ports) == 1  # all on the same TCP connection
    assert_no_app_errors(sv)


@pytest.mark.parametrize("threads", ["1", "3"])
def test_pipelined_requests_answered_in_order(supervise, threads):
    sv = start(supervise, "--threads", threads)
    body = b"posted body"
    with Client(sv.port) as c:
        c.send(b"GET /env?n=1 HTTP/1.1\r\nHost: t\r\n\r\n"
               + b"POST /echo?raw=1 HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
               + b"HEAD /hello HTTP/1.1\r\nHost: t\r\n\r\n"
               + b"POST /noread HTTP/1.1\r\nHost: t\r\nContent-Length: 7\r\n\r\nskipped"
               + b"POST /echo?raw=1&mode=read&n=2 HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
               + chunked(b"chunk", b"ed")
               + b"GET /gen?n=2 HTTP/1.1\r\nHost: t\r\n\r\n"
               + b"GET /env?n=6 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert json.loads(c.response().body)["QUERY_STRING"] == "n=1"
        assert c.response().body == body
        head = c.response(head=True)
        assert head.status == 200 and head.header("content-length") == "11"
        assert c.response().body == b"did not read"  # its unread body is skipped, not parsed
        assert c.response().body == b"chunked"
        assert c.response().body == b"chunk-0;chunk-1;"
        last = c.response()
        assert json.loads(last.body)["QUERY_STRING"] == "n=6" and last.header("connection") == "close"
        assert c.closed_by_server()
    assert_no_app_errors(sv)


def test_head_has_headers_and_length_but_no_body(supervise):
    sv = start(supervise)
    with Client(sv.port) as c:
        c.request("GET", "/hello")
        got = c.response()
        c.request("HEAD", "/hello")
        head = c.response(head=True)
        assert head.status == 200
        assert head.header("content-length") == str(len(got.body)) == "11"
        assert head.header("content-type") == "text/plain"
        c.request("HEAD", "/gen")  # no length known: neither a length nor a chunked body
        head = c.response(head=True)
        assert head.status == 200 and head.header("transfer-encoding") is None
        c.request("GET", "/pid")  # would fail to parse had any HEAD body been sent
        assert c.response().body.isdigit()
        assert c.buf == b""
    assert_no_app_errors(sv)


def test_chunked_response_without_content_length(supervise):
    sv = start(supervise, workers=2)
    with Client(sv.port) as c:
        c.request("GET", "/gen?n=4")
        resp = c.response()
        assert resp.header("transfer-encoding") == "chunked" and resp.header("content-length") is None
        assert resp.body == b"chunk-0;chunk-1;chunk-2;chunk-3;"
        assert all(resp.chunks), "an empty chunk inside the body would end it early"
        c.request("GET", "/gen?n=0")  # an empty generator body
        resp = c.response()
        assert resp.status == 200 and resp.body == b""
        c.request("GET", "/hello")
        assert c.response().body == b"hello world"
    assert_no_app_errors(sv)


def test_response_never_overruns_its_content_length(supervise):
    sv = start(supervise)
    with Client(sv.port) as c:
        for parts in ("1", "2"):  # longer than declared: cut at the length, the connection stays in sync
            c.request("GET", f"/badlength?declared=5&body=hello+world&parts={parts}")
            resp = c.response()
            assert resp.status == 200 and resp.body == b"hello"
            c.request("GET", "/hello")
            assert c.response().body == b"hello world"
        for status in ("204 No Content", "304 Not Modified"):  # no body, whatever the app yields
            c.request("GET", f"/nobody?status={status.replace(' ', '+')}")
            resp = c.response()
            assert resp.status == int(status[:3]) and resp.header("transfer-encoding") is None
            c.request("GET", "/hello")
            assert c.response().body == b"hello world", c.buf
    assert_no_app_errors(sv)


def test_response_shorter_than_its_content_length_closes(supervise):
    sv = start(supervise)
    with Client(sv.port) as c:
        c.request("GET", "/badlength?declared=20&body=short")
        c.request("GET", "/hello")  # pipelined: must not be read as the rest of the first body
        head = c.read_until(b"\r\n\r\n")
        assert b"Content-Length: 20" in head
        assert c.read_to_eof() == b"short"  # the close tells the client the body ended early
    assert_no_app_errors(sv)


def test_http10_closes_unless_keepalive_requested(supervise):
    sv = start(supervise)
    with Client(sv.port) as c:
        c.send(b"GET /hello HTTP/1.0\r\n\r\n")
        resp = c.response()
        assert resp.status == 200 and resp.body == b"hello world"
        assert resp.header("connection") == "close", "an HTTP/1.0 response says it closes"
        assert c.closed_by_server()

    with Client(sv.port) as c:
        for _ in range(3):
            c.send(b"GET /hello HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            resp = c.response()
            assert resp.body == b"hello world" and resp.header("connection").lower() == "keep-alive"
        # no length known on HTTP/1.0: no chunking, the body ends with the connection
        c.send(b"GET /gen?n=3 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        resp = c.response()
        assert resp.header("transfer-encoding") is None and resp.header("connection") == "close"
        assert resp.body == b"chunk-0;chunk-1;chunk-2;"
    assert_no_app_errors(sv)


def test_keepalive_idle_timeout_closes_connection(supervise):
    sv = start(supervise, "--keepalive-timeout", "0.5")
    with Client(sv.port) as c:
        c.request("GET", "/hello")
        assert c.response().status == 200
        idle_from = time.monotonic()
        assert c.closed_by_server(timeout=5)
        elapsed = time.monotonic() - idle_from
        assert 0.4 <= elapsed < 3, elapsed
    with Client(sv.port) as c:  # a connection that never sends anything is closed too
        opened = time.monotonic()
        assert c.closed_by_server(timeout=5)
        assert 0.4 <= time.monotonic() - opened < 3


def test_keepalive_timeout_zero_still_serves_requests(supervise):
    sv = supervise("wsgi_features", "--workers", "1", "--chdir", str(APPS), "--no-watch",
                   "--keepalive-timeout", "0")
    wait_until(lambda: sv.proc.poll() is not None or sv.find("generation_ready"), 20, message="start or exit")
    if sv.proc.poll() is not None:  # refusing 0 as a configuration error would be a fix too
        assert sv.proc.returncode == 2
        return
    with Client(sv.port) as c:
        c.send(b"GET /hello HTTP/1.1\r\nHost: t\r\n")  # the head arrives in two pieces
        assert not c.closed_by_server(timeout=1.0), "closed in the middle of a request head"
        c.send(b"\r\n")
        resp = c.response()
        assert resp.body == b"hello world"
        assert (resp.header("connection") or "").lower() == "close", "keep-alive is off with timeout 0"


def test_header_names_with_underscores_are_dropped(supervise):
    """`X_Forwarded_For` must not pass for the proxy's `X-Forwarded-For` in the environ."""
    sv = start(supervise)
    with Client(sv.port) as c:
        c.send(b"GET /env HTTP/1.1\r\nHost: t\r\nX_Forwarded_For: 6.6.6.6\r\nX-Real: 1\r\n\r\n")
        body = c.response().body
    assert b"6.6.6.6" not in body and b"HTTP_X_REAL" in body


@pytest.mark.parametrize("threads", ["1", "2"])
def test_idle_keepalive_connections_do_not_block_others(supervise, threads):
    sv = start(supervise, "--threads", threads, "--keepalive-timeout", "30")
    idle = []
    try:
        for i in range(12):
            c = Client(sv.port)
            idle.append(c)
            if i % 3 == 0:  # served once, now idle
                c.request("GET", "/hello")
                assert c.response().status == 200
            elif i % 3 == 1:  # half a request head
                c.send(b"GET /hello HTTP/1.1\r\nHost: t\r\n")
            # else: connected, nothing sent
        for _ in range(3):
            started = time.monotonic()
            resp = get(sv.port, "/hello")
            assert resp.status == 200
            assert time.monotonic() - started < 3.0  # blocked would mean the 30 s keep-alive timeout
        # the idle ones are still alive and usable
        c = idle[1]
        c.send(b"\r\n")
        assert c.response().body == b"hello world"
    finally:
        for c in idle:
            c.close()
    assert_no_app_errors(sv)


def test_threads_run_slow_requests_in_parallel(supervise):
    sv = start(supervise, "--threads", "4")
    results: list[Response] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            results.append(get(sv.port, "/barrier?n=4&token=t&timeout=5"))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    clients = [threading.Thread(target=one) for _ in range(4)]
    for t in clients:
        t.start()
    for t in clients:
        t.join(15)
    assert not errors, errors
    # every request waited inside the app for the 3 others: they ran at the same time in one worker
    assert [r.body for r in results] == [b"together"] * 4, results
    assert_no_app_errors(sv)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad, status", [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /" + b"u" * 2000 + b" HTTP/1.1\r\nHost: t\r\n\r\n", 414),
    (b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 99999999\r\n\r\n", 413),
])
def test_requests_pipelined_before_a_bad_one_are_answered_first(supervise, bad, status):
    sv = start(supervise, "--limit-request-line", "1024", "--limit-request-body", "64k")
    with Client(sv.port) as c:
        c.send(b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n"
               b"POST /echo?raw=1 HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n\r\nbody" + bad)
        assert c.response().body == b"hello world"
        assert c.response().body == b"body"
        resp = c.response()
        assert resp.status == status and resp.header("connection") == "close"
        assert c.closed_by_server()
    assert_no_app_errors(sv)


@pytest.fixture
def guarded(supervise):
    """A 1-worker server with small limits, and a check that bad input harms nobody else."""
    sv = start(supervise, "--limit-request-line", "1024", "--limit-request-headers", "4k",
               "--limit-request-body", "64k", "--keepalive-timeout", "60")
    bystander = Client(sv.port)
    bystander.request("GET", "/pid")
    pid = int(bystander.response().body)

    yield sv

    # the worker survived, and an unrelated keep-alive connection is still served
    bystander.request("GET", "/pid")
    assert int(bystander.response().body) == pid
    bystander.close()
    assert worker_pid(sv.port) == pid


def bad_input(port: int, data: bytes) -> Response:
    with Client(port) as c:
        c.send(data)
        resp = c.response()
        assert resp.header("connection") == "close"
        assert c.closed_by_server(), "the server must close after answering bad input"
        return resp


@pytest.mark.parametrize("data", [
    b"GARBAGE\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: t\r\nBad Header Line\r\n\r\n",
    b"GET / HTTP/9.Z\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: abc\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nZZZ\r\nabc\r\n0\r\n\r\n",
    # request smuggling shapes: conflicting framing is refused, never guessed
    b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
])
def test_malformed_request_400(guarded, data):
    assert bad_input(guarded.port, data).status == 400
    assert_no_app_errors(guarded)


def test_request_line_too_long_414(guarded):
    assert bad_input(guarded.port, b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\nHost: t\r\n\r\n").status == 414
    # arriving in small pieces too
    with Client(guarded.port) as c:
        c.send(b"GET /")
        for _ in range(20):
            c.send(b"b" * 100)
        assert c.response().status == 414
        assert c.closed_by_server()


def test_headers_too_large_431(guarded):
    many = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 60) for i in range(100))  # ~7 KB of headers
    assert bad_input(guarded.port, b"GET / HTTP/1.1\r\nHost: t\r\n" + many + b"\r\n").status == 431
    # one endless header that never completes
    with Client(guarded.port) as c:
        c.send(b"GET / HTTP/1.1\r\nX-Big: ")
        for _ in range(10):
            c.send(b"v" * 1000)
        assert c.response().status == 431
        assert c.closed_by_server()


def test_content_length_over_limit_413(guarded):
    body = b"x" * 70000
    resp = bad_input(guarded.port, b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    assert resp.status == 413
    # refused on the head alone, before any body arrives
    with Client(guarded.port) as c:
        c.send(b"POST /noread HTTP/1.1\r\nHost: t\r\nContent-Length: 999999999\r\n\r\n")
        assert c.response().status == 413
        assert c.closed_by_server()
    assert_no_app_errors(guarded)


def test_chunked_body_over_limit_413(guarded):
    with Client(guarded.port) as c:
        c.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        try:
            for _ in range(10):  # 100 KB > 64k, in 10 KB chunks
                c.send(b"%x\r\n%s\r\n" % (10000, b"y" * 10000))
            c.send(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer and close before everything is sent
        resp = c.response()
        assert resp.status == 413
        assert c.closed_by_server()
    assert_no_app_errors(guarded)


def test_app_exception_500_without_traceback(guarded):
    resp = bad_input(guarded.port, b"GET /boom HTTP/1.1\r\nHost: t\r\n\r\n")
    assert resp.status == 500
    assert b"kaboom" not in resp.body and b"Traceback" not in resp.body and b"RuntimeError" not in resp.body
    event = guarded.wait_for("app_exception")
    assert event["path"] == "/boom" and event["method"] == "GET"
    assert "Traceback" in event["traceback"] and "RuntimeError: kaboom-secret-detail" in event["traceback"]
    assert event["level"] == "error"


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_made_up_header_names_do_not_grow_the_worker(supervise):
    sv = start(supervise, "--limit-request-fields", "1000")
    pid = worker_pid(sv.port)
    before = _rss(pid)
    with Client(sv.port) as c:
        for i in range(300):  # 150,000 distinct header names in all
            names = "".join(f"X-{i:04d}-{j:04d}-{'n' * 20}: v\r\n" for j in range(500))
            c.send(f"GET /hello HTTP/1.1\r\nHost: t\r\n{names}\r\n".encode())
            assert c.response().status == 200
    growth = _rss(pid) - before
    assert growth < 10_000_000, f"worker grew {growth / 1e6:.1f} MB"  # ~30 MB with an unbounded cache
    assert_no_app_errors(sv)


# --------------------------------------------------------------------------- what the app hands the server


BAD_RESPONSES = ["split-status", "crlf-value", "lf-name", "space-name", "nul-value", "not-latin1", "bad-code",
                 "str-body"]


@pytest.mark.parametrize("kind", BAD_RESPONSES)
def test_an_invalid_response_from_the_app_is_a_500_never_sent(supervise, kind):
    sv = start(supervise)
    with Client(sv.port) as c:
        c.request("GET", f"/raw/badresponse?kind={kind}")
        raw = c.read_to_eof()
    assert raw.startswith(b"HTTP/1.1 500 "), raw[:300]
    assert b"evil" not in raw and b"fine" not in raw
    event = sv.wait_for("app_exception", path="/raw/badresponse")
    assert "Error" in event["traceback"]
    if kind == "str-body":
        assert "not bytes" in event["traceback"]


def test_a_str_after_the_head_went_out_drops_the_connection_with_a_log_line(supervise):
    sv = start(supervise)
    with Client(sv.port) as c:
        c.request("GET", "/raw/badresponse?kind=str-later")
        raw = c.read_to_eof()
    assert raw.startswith(b"HTTP/1.1 200 ") and not raw.endswith(b"0\r\n\r\n"), "a cut body never looks complete"
    assert "str" in sv.wait_for("app_exception", path="/raw/badresponse")["traceback"]


def test_negative_control_without_validation_the_split_header_goes_out(supervise):
    sv = supervise("wsgi_features", "--workers", "1", "--chdir", str(APPS), "--no-watch",
                   inject=["no-response-validation"]).ready()
    with Client(sv.port) as c:
        c.request("GET", "/raw/badresponse?kind=crlf-value")
        assert b"\r\nSet-Cookie: evil=1\r\n" in c.read_until(b"\r\n\r\n")
