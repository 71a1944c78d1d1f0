"""ASGI (issue 13): real frameworks, reloads under load, WebSockets across reloads, lifespan.

Every test runs supervise as a real process (tests/harness.py) and waits on its log events."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from tests.harness import ROOT, Load, assert_monotonic_versions, http_get, wait_until

APPS = ROOT / "tests" / "apps"

ASGI_TEMPLATE = '''
import asyncio
VERSION = {version!r}
STARTUP_FAILS = {fails!r}
{extra}

async def application(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if globals().get("STARTUP_HANGS"):
                    await asyncio.sleep(3600)  # a database that never answers
                if STARTUP_FAILS:
                    await send({{"type": "lifespan.startup.failed", "message": "database unreachable"}})
                    return
                scope["state"]["version"] = VERSION
                await send({{"type": "lifespan.startup.complete"}})
            elif message["type"] == "lifespan.shutdown":
                open("shutdown." + VERSION, "a").write("done\\n")  # the tests' proof that it ran
                await send({{"type": "lifespan.shutdown.complete"}})
                return
    elif scope["type"] == "websocket":
        await receive()
        if scope["path"] == "/deny" and "websocket.http.response" in scope.get("extensions", {{}}):
            await send({{"type": "websocket.http.response.start", "status": 401,
                        "headers": [(b"content-type", b"text/plain"), (b"content-length", b"7")]}})
            await send({{"type": "websocket.http.response.body", "body": b"go away"}})
            return
        await send({{"type": "websocket.accept"}})
        await send({{"type": "websocket.send", "text": "version=" + VERSION}})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            await send({{"type": "websocket.send", "text": "echo:" + (message.get("text") or "")}})
    else:
        path = scope["path"]
        if path == "/state":
            body = ("state=" + scope["state"].get("version", "?")).encode()
        elif path == "/slow":
            open("slow.started", "w").close()  # the test's handshake: the request is in flight
            await asyncio.sleep(float(scope["query_string"].decode() or "1"))
            body = b"slow"
        else:
            body = ("version=" + VERSION).encode()
        await send({{"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]}})
        await send({{"type": "http.response.body", "body": body}})
'''


def write_asgi_app(directory: Path, version: str = "1", fails: bool = False, extra: str = "") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "app.py"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(ASGI_TEMPLATE.format(version=version, fails=fails, extra=textwrap.dedent(extra)))
    os.replace(tmp, path)
    return path


@pytest.fixture
def asgi_dir(tmp_path: Path) -> Path:
    code = tmp_path / "code"
    write_asgi_app(code, "1")
    return code


def request(port: int, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def ws_url(port: int, path: str = "/") -> str:
    return f"ws://127.0.0.1:{port}{path}"


# --------------------------------------------------------------------------- real frameworks


def test_starlette_json_post_streaming_websocket_and_lifespan_state(supervise):
    sv = supervise("asgi_starlette:app", "--workers", "2", "--chdir", str(APPS), "--no-watch").ready()
    status, headers, body = request(sv.port, "POST", "/json", json.dumps({"b": 2, "a": [1, "x"]}).encode(),
                                    {"Content-Type": "application/json"})
    assert status == 200 and json.loads(body) == {"got": {"b": 2, "a": [1, "x"]}, "keys": ["a", "b"]}
    assert len(headers["x-request-id"]) == 32  # a fresh request id, as for WSGI
    status, headers, body = request(sv.port, "GET", "/stream")
    assert status == 200 and headers.get("transfer-encoding") == "chunked"
    assert body == b"".join(f"piece {i}\n".encode() for i in range(5))
    assert request(sv.port, "GET", "/state")[2] == b'{"greeting":"set by the lifespan startup"}'
    with connect(ws_url(sv.port, "/ws"), compression=None) as ws:
        ws.send("hello")
        assert ws.recv(timeout=5) == "echo:hello"
        ws.send(b"\x00\x01" * 50000)
        assert ws.recv(timeout=5) == b"\x00\x01" * 50000
        ws.send(["frag", "mented"])  # one message in three frames
        assert ws.recv(timeout=5) == "echo:fragmented"
        ws.ping().wait(5)
    assert request(sv.port, "GET", "/missing")[0] == 404
    assert sv.stop() == 0


def test_django_asgi_json_post_and_streaming_without_lifespan_support(supervise):
    sv = supervise("asgi_django", "--workers", "1", "--chdir", str(APPS), "--no-watch").ready()
    status, _, body = request(sv.port, "POST", "/json", b'{"n": 1}', {"Content-Type": "application/json"})
    assert status == 200 and json.loads(body) == {"got": {"n": 1}, "method": "POST"}
    status, _, body = request(sv.port, "GET", "/stream")
    assert status == 200 and body == b"piece 0\npiece 1\npiece 2\n"
    assert sv.find("lifespan_unsupported")  # Django raises on the lifespan scope: auto goes on without
    assert sv.stop() == 0


# --------------------------------------------------------------------------- interface


def test_interface_auto_runs_asgi_and_wsgi_refuses_an_async_app(supervise, asgi_dir):
    sv = supervise("app", "--chdir", str(asgi_dir), "--no-watch", "--workers", "1").ready()
    assert http_get(sv.port) == (200, "version=1")
    assert sv.stop() == 0
    bad = supervise("app", "--chdir", str(asgi_dir), "--no-watch", "--workers", "1", "--interface", "wsgi")
    assert bad.wait(30) == 3
    failed = bad.find("boot_failed")
    assert failed and "is an ASGI 3 application" in failed[0]["error"], bad.raw[-10:]


def test_asgi2_double_callable_is_detected_and_a_wsgi_app_refused_with_interface_asgi(supervise, tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    (code / "two.py").write_text(textwrap.dedent('''
        class application:
            def __init__(self, scope):
                self.scope = scope
            async def __call__(self, receive, send):
                if self.scope["type"] != "http":
                    return
                await send({"type": "http.response.start", "status": 200, "headers": []})
                await send({"type": "http.response.body", "body": b"asgi2"})

        def wsgi(environ, start_response):
            start_response("200 OK", [])
            return [b"wsgi"]
    '''))
    sv = supervise("two", "--chdir", str(code), "--no-watch", "--workers", "1").ready()
    assert http_get(sv.port) == (200, "asgi2")
    assert sv.stop() == 0
    bad = supervise("two:wsgi", "--chdir", str(code), "--no-watch", "--workers", "1", "--interface", "asgi")
    assert bad.wait(30) == 3
    assert "not an ASGI application" in bad.find("boot_failed")[0]["error"]
    # Negative control: the same WSGI app with auto is served as WSGI.
    ok = supervise("two:wsgi", "--chdir", str(code), "--no-watch", "--workers", "1").ready()
    assert http_get(ok.port) == (200, "wsgi")
    assert ok.stop() == 0


# --------------------------------------------------------------------------- reloads


def test_hups_under_load_zero_failures_and_versions_only_move_forward(supervise, asgi_dir):
    sv = supervise("app", "--workers", "2", "--chdir", str(asgi_dir), "--no-watch").ready()
    order = ["version=1"]
    with Load(sv.port, clients=6, keepalive=True) as ka, Load(sv.port, clients=4, keepalive=False) as nk:
        ka.wait_requests(100)
        for n in range(2, 7):
            write_asgi_app(asgi_dir, str(n))
            order.append(f"version={n}")
            finished = sv.reload()
            assert finished["outcome"] == "succeeded", finished
            ka.wait_requests(30)
            nk.wait_requests(10)
    for load in (ka, nk):
        assert load.count() > 200
        assert not load.failures(), load.summary()
        assert_monotonic_versions(load, order)
        assert all(r.body == "version=6" for r in load.results[-10:])
    assert sv.stop() == 0


def test_max_requests_recycles_asgi_workers_without_failures(supervise, asgi_dir):
    sv = supervise("app", "--workers", "2", "--chdir", str(asgi_dir), "--no-watch",
                   "--max-requests", "100", "--max-requests-jitter", "20").ready()
    with Load(sv.port, clients=4) as load, Load(sv.port, clients=2, keepalive=False) as fresh:
        wait_until(lambda: len(sv.find("worker_recycle")) >= 3, timeout=30, message="3 recycles")
        load.wait_requests(100)
        fresh.wait_requests(20)
    for each in (load, fresh):
        assert not each.failures(), each.summary()
    sv.wait_for("drain_started", reason="recycle")  # the worker was told why (WebSockets: 1012)
    assert sv.stop() == 0


def _late_connection(supervise, asgi_dir: Path, gate: Path, inject: list[str]) -> tuple[Any, bytes]:
    """A generation-1 worker takes a connection and the master's SIGTERM arrives before its accept()
    returns (tests/inject.py: handoff-gate-asgi).  Returns supervise and the client's response."""
    sv = supervise("app", "-w", "1", "--chdir", str(asgi_dir), "--no-watch", inject=inject,
                   env={"SUPERVISE_TEST_GATE": str(gate)}).ready()
    assert sv.get()[1] == "version=1"  # before the gate opens, served as usual
    gate.write_text("")
    with socket.create_connection(("127.0.0.1", sv.port), timeout=20) as client:
        client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        wait_until(lambda: Path(f"{gate}.held").exists(), message="a generation-1 worker holding the connection")
        write_asgi_app(asgi_dir, "2")
        assert sv.reload()["outcome"] == "succeeded"
        response = b""
        while chunk := client.recv(65536):
            response += chunk
    return sv, response


def test_a_connection_accepted_after_the_drain_is_handed_to_the_new_generation(supervise, asgi_dir, tmp_path):
    sv, response = _late_connection(supervise, asgi_dir, tmp_path / "gate", ["handoff-gate-asgi"])
    assert response.startswith(b"HTTP/1.1 200") and response.endswith(b"version=2"), response
    held_by = int((tmp_path / "gate.held").read_text())
    assert sv.find("connection_handed_off", pid=held_by, sent=True)
    assert sv.stop() == 0


def test_negative_control_a_draining_worker_serving_its_late_connection_is_detected(supervise, asgi_dir,
                                                                                   tmp_path):
    sv, response = _late_connection(supervise, asgi_dir, tmp_path / "gate", ["handoff-gate-asgi", "serve-late-asgi"])
    assert response.endswith(b"version=1"), "without the hand-off the client gets the old code"
    assert not sv.find("connection_forwarded")
    assert sv.stop() == 0


def test_lifespan_startup_failure_on_reload_leaves_the_old_generation_serving(supervise, asgi_dir):
    sv = supervise("app", "--workers", "2", "--chdir", str(asgi_dir), "--no-watch").ready()
    with Load(sv.port, clients=4) as load:
        load.wait_requests(50)
        write_asgi_app(asgi_dir, "2", fails=True)
        failed = sv.reload()
        assert failed["outcome"] == "failed", failed
        assert "lifespan startup failed: database unreachable" in failed["error"]
        load.wait_requests(50)
        assert http_get(sv.port, "/state") == (200, "state=1")  # the old generation, its own state
    assert not load.failures(), load.summary()
    assert {r.body for r in load.results} == {"version=1"}
    assert sv.proc.poll() is None
    assert sv.stop() == 0


def test_a_lifespan_startup_that_hangs_fails_the_reload_at_boot_timeout(supervise, asgi_dir):
    sv = supervise("app", "--workers", "2", "--chdir", str(asgi_dir), "--no-watch", "--boot-timeout", "2").ready()
    with Load(sv.port, clients=4) as load:
        load.wait_requests(50)
        write_asgi_app(asgi_dir, "2", extra="STARTUP_HANGS = True")
        failed = sv.reload()
        assert failed["outcome"] == "failed", failed
        load.wait_requests(50)
    assert not load.failures(), load.summary()
    assert {r.body for r in load.results} == {"version=1"}
    assert sv.stop() == 0


def test_negative_control_a_passing_lifespan_startup_reloads(supervise, asgi_dir):
    sv = supervise("app", "--workers", "2", "--chdir", str(asgi_dir), "--no-watch").ready()
    with Load(sv.port, clients=4) as load:
        load.wait_requests(50)
        write_asgi_app(asgi_dir, "2", fails=False)
        assert sv.reload()["outcome"] == "succeeded"
        load.wait_requests(50)
    assert not load.failures(), load.summary()
    assert load.results[-1].body == "version=2"
    assert http_get(sv.port, "/state") == (200, "state=2")  # lifespan state of the new code
    assert sv.stop() == 0


def test_lifespan_shutdown_runs_when_a_generation_drains_and_on_sigterm(supervise, asgi_dir):
    sv = supervise("app", "--workers", "2", "--chdir", str(asgi_dir), "--no-watch").ready()
    write_asgi_app(asgi_dir, "2")
    assert sv.reload()["outcome"] == "succeeded"  # the old generation drained: its shutdown ran
    assert (asgi_dir / "shutdown.1").read_text() == "done\n" * 2
    assert not (asgi_dir / "shutdown.2").exists()
    assert sv.stop() == 0
    assert (asgi_dir / "shutdown.2").read_text() == "done\n" * 2


def test_lifespan_on_refuses_an_app_without_lifespan_support(supervise):
    sv = supervise("asgi_django", "--workers", "1", "--chdir", str(APPS), "--no-watch", "--lifespan", "on")
    assert sv.wait(30) == 3
    assert "lifespan startup failed" in sv.find("boot_failed")[0]["error"]


def test_lifespan_startup_failure_at_start_exits_3(supervise, tmp_path):
    code = tmp_path / "code"
    write_asgi_app(code, "1", fails=True)
    sv = supervise("app", "--workers", "2", "--chdir", str(code), "--no-watch")
    assert sv.wait(30) == 3
    assert any("lifespan startup failed: database unreachable" in line for line in sv.raw + [sv.stderr])


def test_lifespan_off_never_runs_it(supervise, tmp_path):
    code = tmp_path / "code"
    write_asgi_app(code, "1", fails=True)  # would fail, were it run
    sv = supervise("app", "--workers", "1", "--chdir", str(code), "--no-watch", "--lifespan", "off").ready()
    assert http_get(sv.port, "/state") == (200, "state=?")
    assert sv.stop() == 0


# --------------------------------------------------------------------------- WebSockets


def _ws_client(port: int, out: dict[str, Any], ready: threading.Event) -> None:
    """Connect, read the greeting, wait for the server's close, reconnect, read the greeting."""
    try:
        with connect(ws_url(port), compression=None, open_timeout=10) as ws:
            out["first"] = ws.recv(timeout=10)
            ready.set()
            try:
                ws.recv(timeout=30)
                out["error"] = "a message instead of a close"
            except ConnectionClosed as exc:
                out["code"] = exc.rcvd.code if exc.rcvd else None
        with connect(ws_url(port), compression=None, open_timeout=10) as ws:
            out["second"] = ws.recv(timeout=10)
    except Exception as exc:  # noqa: BLE001 - reported by the test
        out["error"] = repr(exc)
        ready.set()


def test_websockets_across_a_reload_get_1012_and_reconnect_to_new_code(supervise, asgi_dir):
    sv = supervise("app", "--workers", "2", "--chdir", str(asgi_dir), "--no-watch").ready()
    results: list[dict[str, Any]] = [{} for _ in range(4)]
    readies = [threading.Event() for _ in results]
    threads = [threading.Thread(target=_ws_client, args=(sv.port, r, e), daemon=True)
               for r, e in zip(results, readies)]
    for t in threads:
        t.start()
    for e in readies:
        assert e.wait(15)
    write_asgi_app(asgi_dir, "2")
    assert sv.reload()["outcome"] == "succeeded"
    for t in threads:
        t.join(30)
    for r in results:
        assert r == {"first": "version=1", "code": 1012, "second": "version=2"}, r
    assert sv.stop() == 0


def test_websocket_drain_lets_old_websockets_go_on_after_the_new_generation_serves(supervise, asgi_dir):
    sv = supervise("app", "--workers", "1", "--chdir", str(asgi_dir), "--no-watch", "--graceful-timeout", "20",
                   "--websocket-drain", "10").ready()
    with connect(ws_url(sv.port), compression=None) as ws:
        assert ws.recv(timeout=5) == "version=1"
        write_asgi_app(asgi_dir, "2")
        sv.signal(signal.SIGHUP)
        sv.wait_for("generation_ready", count=2)
        assert http_get(sv.port) == (200, "version=2")
        ws.send("still here")  # the old worker drains, its WebSocket goes on meanwhile
        assert ws.recv(timeout=5) == "echo:still here"
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=30)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
    assert sv.wait_for("reload_finished")["outcome"] == "succeeded"
    assert sv.stop() == 0


def test_sigterm_closes_websockets_with_1001_and_exits_0(supervise, asgi_dir):
    """The shutdown's code (1001) against the reload's (1012) above: the drain's why is used."""
    sv = supervise("app", "--workers", "1", "--chdir", str(asgi_dir), "--no-watch", "--websocket-drain", "5").ready()
    with connect(ws_url(sv.port), compression=None) as ws:
        assert ws.recv(timeout=5) == "version=1"
        sv.signal(signal.SIGTERM)
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
    assert sv.wait(20) == 0


def test_websocket_message_over_the_limit_closes_with_1009(supervise, asgi_dir):
    sv = supervise("app", "--workers", "1", "--chdir", str(asgi_dir), "--no-watch",
                   "--websocket-max-message-size", "1k").ready()
    with connect(ws_url(sv.port), compression=None) as ws:
        assert ws.recv(timeout=5) == "version=1"
        ws.send("x" * 1000)  # negative control: under the limit
        assert ws.recv(timeout=5) == "echo:" + "x" * 1000
        ws.send(["x" * 600, "x" * 600])  # over it, in fragments
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    assert http_get(sv.port) == (200, "version=1")
    assert sv.stop() == 0


# --------------------------------------------------------------------------- HTTP behaviour


def test_limit_concurrency_answers_503_beyond_it(supervise, asgi_dir):
    sv = supervise("app", "--workers", "1", "--chdir", str(asgi_dir), "--no-watch",
                   "--limit-concurrency", "1").ready()
    slow: dict[str, Any] = {}
    t = threading.Thread(target=lambda: slow.update(r=request(sv.port, "GET", "/slow?5")), daemon=True)
    t.start()
    wait_until(lambda: (asgi_dir / "slow.started").exists(), 10, message="/slow in flight")
    assert request(sv.port, "GET", "/")[0] == 503
    t.join(15)
    assert slow["r"][0] == 200 and slow["r"][2] == b"slow"
    assert http_get(sv.port) == (200, "version=1")  # under the limit again
    assert sv.stop() == 0


def test_pipelined_requests_and_a_streamed_request_body(supervise, tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    (code / "echo.py").write_text(textwrap.dedent('''
        async def application(scope, receive, send):
            if scope["type"] != "http":
                return
            pieces = []
            while True:
                message = await receive()
                pieces.append(len(message.get("body", b"")))
                if not message.get("more_body"):
                    break
            body = (scope["path"] + " " + str(sum(pieces))).encode()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
    '''))
    sv = supervise("echo", "--workers", "1", "--chdir", str(code), "--no-watch").ready()
    with socket.create_connection(("127.0.0.1", sv.port), timeout=10) as sock:
        sock.sendall(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nPOST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
                     b"GET /c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.count(b"HTTP/1.1 200 OK") == 3
    assert data.index(b"/a 0") < data.index(b"/b 3") < data.index(b"/c 0"), data
    big = os.urandom(1 << 20)
    status, _, body = request(sv.port, "POST", "/big", big)
    assert (status, body) == (200, b"/big 1048576")
    assert sv.stop() == 0


def test_a_client_that_does_not_read_holds_only_itself(supervise, tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    (code / "big.py").write_text(textwrap.dedent('''
        async def application(scope, receive, send):
            if scope["type"] != "http":
                return
            if scope["path"] == "/big":
                await send({"type": "http.response.start", "status": 200, "headers": []})
                for _ in range(64):
                    await send({"type": "http.response.body", "body": b"x" * (1 << 20), "more_body": True})
                await send({"type": "http.response.body", "body": b""})
                return
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
    '''))
    sv = supervise("big", "--workers", "1", "--chdir", str(code), "--no-watch", "--write-timeout", "2").ready()
    with socket.create_connection(("127.0.0.1", sv.port), timeout=10) as stuck:
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        assert http_get(sv.port) == (200, "ok")  # the same worker serves others meanwhile
        event = sv.wait_for("client_timeout", phase="write")
        assert event["seconds"] == 2.0
    assert sv.stop() == 0


def test_bad_requests_get_a_clear_status_not_a_traceback(supervise, asgi_dir):
    sv = supervise("app", "--workers", "1", "--chdir", str(asgi_dir), "--no-watch").ready()
    with socket.create_connection(("127.0.0.1", sv.port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 400 ")
    with socket.create_connection(("127.0.0.1", sv.port), timeout=5) as sock:
        sock.sendall(b"GARBAGE\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 400 ")
    assert http_get(sv.port) == (200, "version=1")
    assert not sv.find("app_exception") and "Traceback" not in sv.stderr
    assert sv.stop() == 0


# --------------------------------------------------------------------------- observability


def test_access_log_request_ids_and_metrics_as_for_wsgi(supervise, asgi_dir):
    from tests.test_operations import scrape, value

    sv = supervise("app", "--workers", "1", "--chdir", str(asgi_dir), "--no-watch", "--access-log",
                   health=True).ready()
    status, headers, _ = request(sv.port, "GET", "/?q=1", headers={"X-Request-ID": "client-id-1",
                                                                   "User-Agent": "probe/1"})
    assert status == 200 and headers["x-request-id"] == "client-id-1"  # a sane client id is kept
    status, headers, _ = request(sv.port, "GET", "/", headers={"X-Request-ID": "bad id with spaces"})
    fresh = headers["x-request-id"]
    assert fresh != "bad id with spaces" and len(fresh) == 32  # junk is replaced
    line = sv.wait_for("request", request_id="client-id-1")
    assert (line["method"], line["path"], line["query"], line["status"], line["protocol"], line["user_agent"]) == \
        ("GET", "/", "q=1", 200, "HTTP/1.1", "probe/1")
    assert sv.wait_for("request", request_id=fresh)["bytes"] == len("version=1")
    wait_until(lambda: value(scrape(sv), "supervise_http_requests_total", code="200", method="GET") >= 2, 10,
               message="the requests counted in /metrics")
    assert sv.stop() == 0
    # --no-metrics: nothing counted, /metrics is gone (as for WSGI).
    quiet = supervise("app", "--workers", "1", "--chdir", str(asgi_dir), "--no-watch", "--no-metrics",
                      health=True).ready()
    assert http_get(quiet.port) == (200, "version=1")
    assert http_get(quiet.health_port, "/metrics")[0] == 404
    assert quiet.stop() == 0


def test_a_silent_websocket_peer_is_pinged_then_dropped_and_a_live_one_stays(supervise, asgi_dir):
    sv = supervise("app", "--workers", "1", "--chdir", str(asgi_dir), "--no-watch",
                   "--websocket-ping-interval", "0.5").ready()
    with connect(ws_url(sv.port), compression=None) as live:  # answers pings (the websockets library does)
        assert live.recv(timeout=5) == "version=1"
        with socket.create_connection(("127.0.0.1", sv.port), timeout=10) as dead:
            dead.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
            assert dead.recv(4096).startswith(b"HTTP/1.1 101 ")
            # ...and then it never answers anything: the server pings, waits, and drops it.
            event = sv.wait_for("client_timeout", phase="websocket ping")
            assert event["seconds"] == 0.5
        live.send("still here")
        assert live.recv(timeout=5) == "echo:still here"
    assert len(sv.find("client_timeout", phase="websocket ping")) == 1
    assert sv.stop() == 0


def test_slow_heads_and_stalled_bodies_get_408_and_cost_only_themselves(supervise, tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    (code / "reader.py").write_text(textwrap.dedent('''
        async def application(scope, receive, send):
            if scope["type"] != "http":
                return
            size = 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                size += len(message.get("body", b""))
                if not message.get("more_body"):
                    break
            body = str(size).encode()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": body})
    '''))
    sv = supervise("reader", "--workers", "1", "--chdir", str(code), "--no-watch", "--header-timeout", "1",
                   "--body-timeout", "1").ready()
    with socket.create_connection(("127.0.0.1", sv.port), timeout=10) as slow_head, \
            socket.create_connection(("127.0.0.1", sv.port), timeout=10) as slow_body:
        slow_head.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # never finishes its head
        slow_body.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")  # 7 bytes never come
        assert http_get(sv.port) == (200, "0")  # others are served meanwhile
        assert slow_head.recv(4096).startswith(b"HTTP/1.1 408 ")
        assert slow_body.recv(4096).startswith(b"HTTP/1.1 408 ")
    sv.wait_for("client_timeout", phase="head")  # the log line may come after the response
    sv.wait_for("client_timeout", phase="body")
    # Negative control: a body that arrives whole is read.
    status, _, body = request(sv.port, "POST", "/", b"0123456789")
    assert (status, body) == (200, b"10")
    assert sv.stop() == 0


def test_request_timeout_cancels_the_request_with_504_and_its_stack_and_others_go_on(supervise, asgi_dir):
    sv = supervise("app", "--workers", "1", "--chdir", str(asgi_dir), "--no-watch", "--request-timeout", "1").ready()
    status, _, body = request(sv.port, "GET", "/slow?30")
    assert status == 504
    event = sv.wait_for("request_timeout")
    assert event["path"] == "/slow" and "await asyncio.sleep" in event["stack"], event  # the app's own line
    assert http_get(sv.port) == (200, "version=1")  # negative control: a quick request is not touched
    assert not sv.find("app_exception")
    assert sv.stop() == 0


def test_proxy_protocol_and_forwarded_headers_set_the_scopes_client(supervise, tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    (code / "who.py").write_text(textwrap.dedent('''
        async def application(scope, receive, send):
            if scope["type"] != "http":
                return
            host = dict(scope["headers"]).get(b"host", b"").decode()
            body = f"{scope['client'][0]} {scope['scheme']} {host}".encode()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
    '''))
    sv = supervise("who", "--workers", "1", "--chdir", str(code), "--no-watch", "--proxy-protocol", "v1").ready()
    with socket.create_connection(("127.0.0.1", sv.port), timeout=10) as sock:
        sock.sendall(b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 80\r\n"
                     b"GET / HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.endswith(b"203.0.113.7 http example.com"), data
    with socket.create_connection(("127.0.0.1", sv.port), timeout=10) as sock:  # v1 is required from it
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(4096) == b""
    sv.wait_for("proxy_protocol_error")
    assert sv.stop() == 0
    # Forwarding headers from a trusted peer (127.0.0.1 by default), as for WSGI.
    fw = supervise("who", "--workers", "1", "--chdir", str(code), "--no-watch").ready()
    status, _, body = request(fw.port, "GET", "/", headers={"X-Forwarded-For": "198.51.100.2",
                                                            "X-Forwarded-Proto": "https",
                                                            "X-Forwarded-Host": "shop.example"})
    assert (status, body) == (200, b"198.51.100.2 https shop.example")
    assert request(fw.port, "GET", "/")[2] == b"127.0.0.1 http 127.0.0.1:%d" % fw.port  # control: none sent
    assert fw.stop() == 0


def test_app_failures_and_http_details(supervise, tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    (code / "odd.py").write_text(textwrap.dedent('''
        async def application(scope, receive, send):
            if scope["type"] != "http":
                return
            path = scope["path"]
            if path == "/raise":
                raise RuntimeError("boom")
            if path == "/nothing":
                return
            if path == "/splitting":
                await send({"type": "http.response.start", "status": 200,
                            "headers": [(b"x-evil", b"a\\r\\nSet-Cookie: stolen=1")]})
                return
            if path == "/cut":
                await send({"type": "http.response.start", "status": 200, "headers": []})
                await send({"type": "http.response.body", "body": b"partial", "more_body": True})
                raise RuntimeError("after the head")
            body = b""
            while True:
                message = await receive()
                body += message.get("body", b"")
                if not message.get("more_body"):
                    break
            out = b"got " + body
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-length", str(len(out)).encode())]})
            await send({"type": "http.response.body", "body": out})
    '''))
    sv = supervise("odd", "--workers", "1", "--chdir", str(code), "--no-watch").ready()
    for path in ("/raise", "/nothing", "/splitting"):
        status, headers, _ = request(sv.port, "GET", path)
        assert status == 500 and "set-cookie" not in headers, path
    with socket.create_connection(("127.0.0.1", sv.port), timeout=10) as sock:
        sock.sendall(b"GET /cut HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200 ") and b"partial" in data and not data.endswith(b"0\r\n\r\n")
    sv.wait_for("app_exception", count=4)  # each logged with its traceback
    # HEAD: the head only; 100-continue; a chunked request body; HTTP/1.0 keep-alive.
    status, headers, body = request(sv.port, "HEAD", "/")
    assert (status, headers["content-length"], body) == (200, "4", b"")
    with socket.create_connection(("127.0.0.1", sv.port), timeout=10) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        assert sock.recv(4096) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"hello")
        assert sock.recv(4096).endswith(b"got hello")
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
        assert sock.recv(4096).endswith(b"got abcde")
    with socket.create_connection(("127.0.0.1", sv.port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        first = sock.recv(4096)
        assert first.startswith(b"HTTP/1.1 200 ") and b"connection: keep-alive" in first.lower()
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")  # no keep-alive asked: closed after the response
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        assert data.endswith(b"got ") and b"connection: close" in data.lower()
    assert sv.stop() == 0


def test_a_pipelined_request_whose_body_comes_later_is_read(supervise, tmp_path):
    """Reading pauses while a pipelined request waits, and must resume for its body."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "sizes.py").write_text(textwrap.dedent('''
        async def application(scope, receive, send):
            if scope["type"] != "http":
                return
            size = 0
            while True:
                message = await receive()
                size += len(message.get("body", b""))
                if not message.get("more_body"):
                    break
            out = f"{scope['path']}={size};".encode()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-length", str(len(out)).encode())]})
            await send({"type": "http.response.body", "body": out})
    '''))
    sv = supervise("sizes", "--workers", "1", "--chdir", str(code), "--no-watch", "--body-timeout", "30").ready()
    with socket.create_connection(("127.0.0.1", sv.port), timeout=10) as sock:
        sock.sendall(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nPOST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 200000\r\n\r\n")
        first = sock.recv(4096)
        assert first.endswith(b"/a=0;"), first
        sock.sendall(b"y" * 200000)  # the second request's body, after the first was answered
        second = b""
        while not second.endswith(b";"):
            chunk = sock.recv(4096)
            assert chunk, second
            second += chunk
        assert second.endswith(b"/b=200000;"), second
    assert sv.stop() == 0


def test_without_uvloop_asyncios_own_loop_serves_http_websockets_and_reloads(supervise, asgi_dir, tmp_path):
    stub = tmp_path / "no-uvloop"
    stub.mkdir()
    (stub / "uvloop.py").write_text('raise ImportError("uvloop is not installed here")\n')
    sv = supervise("app", "--workers", "2", "--chdir", str(asgi_dir), "--no-watch",
                   env={"PYTHONPATH": f"{stub}{os.pathsep}{ROOT}"}).ready()
    result: dict[str, Any] = {}
    ready = threading.Event()
    client = threading.Thread(target=_ws_client, args=(sv.port, result, ready), daemon=True)
    client.start()
    assert ready.wait(15)
    with Load(sv.port, clients=4) as load:
        load.wait_requests(50)
        write_asgi_app(asgi_dir, "2")
        assert sv.reload()["outcome"] == "succeeded"
        load.wait_requests(50)
    client.join(30)
    assert result == {"first": "version=1", "code": 1012, "second": "version=2"}, result
    assert not load.failures(), load.summary()
    assert_monotonic_versions(load, ["version=1", "version=2"])
    assert sv.stop() == 0


# --------------------------------------------------------------------------- hostile conditions


def test_out_of_descriptors_the_asgi_worker_pauses_and_recovers(supervise, asgi_dir):
    import psutil

    from tests.test_hostile import _exhaust_descriptors

    sv = supervise("app", "-w", "1", "--chdir", str(asgi_dir), "--no-watch", "--keepalive-timeout", "60",
                   prefix=["prlimit", "--nofile=256:256", "--"]).ready()
    worker = psutil.Process(sv.find("worker_ready")[0]["worker_pid"])
    socks = _exhaust_descriptors(sv)
    first = sv.wait_for("accept_failed", timeout=20)
    cpu_before = sum(worker.cpu_times()[:2])
    second = sv.wait_for("accept_failed", count=2, timeout=20)
    cpu = sum(worker.cpu_times()[:2]) - cpu_before
    assert cpu < 0.5 * (second["_t"] - first["_t"]), f"the worker spun: {cpu:.2f}s of CPU"
    assert second["pause"] > first["pause"]  # the pause grows
    for s in socks:
        s.close()
    wait_until(lambda: http_get(sv.port, "/", timeout=2)[0] == 200, timeout=20, message="serving again")
    assert sv.stop() == 0


def test_an_asgi_worker_never_outlives_a_killed_master_with_the_port(supervise, asgi_dir):
    from tests.test_hostile import gone, port_is_free

    sv = supervise("app", "-w", "1", "--chdir", str(asgi_dir), "--no-watch", "--graceful-timeout", "2").ready()
    worker = sv.find("worker_ready")[0]["worker_pid"]
    slow: dict[str, Any] = {}
    threading.Thread(target=lambda: slow.update(r=_try(lambda: request(sv.port, "GET", "/slow?600"))),
                     daemon=True).start()
    wait_until(lambda: (asgi_dir / "slow.started").exists(), 10, message="/slow in flight")
    os.kill(sv.pid, signal.SIGKILL)
    sv.wait(10)
    wait_until(lambda: gone(worker), timeout=10, message="the orphaned worker to exit")
    assert port_is_free(sv.port)


def _try(call: Any) -> Any:
    try:
        return call()
    except OSError as exc:
        return exc


def test_health_is_503_while_the_only_worker_is_at_its_concurrency_limit(supervise, asgi_dir):
    sv = supervise("app", "-w", "1", "--chdir", str(asgi_dir), "--no-watch", "--limit-concurrency", "1",
                   health=True).ready()
    assert sv.health()[0] == 200
    slow: dict[str, Any] = {}
    t = threading.Thread(target=lambda: slow.update(r=request(sv.port, "GET", "/slow?4")), daemon=True)
    t.start()
    wait_until(lambda: (asgi_dir / "slow.started").exists(), 10, message="/slow in flight")
    status, body = wait_until(lambda: (h := sv.health())[0] == 503 and h, timeout=10, message="health 503")
    assert body["available_workers"] == 0
    t.join(15)
    assert slow["r"][0] == 200
    wait_until(lambda: sv.health()[0] == 200, timeout=5, message="health back to 200")
    # Negative control: without a limit the worker's capacity is --worker-connections: it stays available.
    free = supervise("app", "-w", "1", "--chdir", str(asgi_dir), "--no-watch", health=True).ready()
    (asgi_dir / "slow.started").unlink()
    t = threading.Thread(target=lambda: request(free.port, "GET", "/slow?2"), daemon=True)
    t.start()
    wait_until(lambda: (asgi_dir / "slow.started").exists(), 10, message="/slow in flight")
    while t.is_alive():  # sampled through the request (heartbeats report it busy meanwhile)
        status, body = free.health()
        assert status == 200 and body["available_workers"] == 1, body
        t.join(0.1)
    assert sv.stop() == 0 and free.stop() == 0


def test_preload_runs_asgi_apps_too(supervise, asgi_dir):
    """--preload (a zygote imports the app once per generation): the lifespan still runs in each
    worker, reloads still swap generations, WebSockets still get 1012."""
    sv = supervise("app", "--workers", "2", "--chdir", str(asgi_dir), "--no-watch", "--preload").ready()
    assert http_get(sv.port, "/state") == (200, "state=1")
    result: dict[str, Any] = {}
    ready = threading.Event()
    client = threading.Thread(target=_ws_client, args=(sv.port, result, ready), daemon=True)
    client.start()
    assert ready.wait(15)
    with Load(sv.port, clients=4) as load:
        load.wait_requests(50)
        write_asgi_app(asgi_dir, "2")
        assert sv.reload()["outcome"] == "succeeded"
        load.wait_requests(50)
    client.join(30)
    assert result == {"first": "version=1", "code": 1012, "second": "version=2"}, result
    assert not load.failures(), load.summary()
    assert http_get(sv.port, "/state") == (200, "state=2")
    assert sv.stop() == 0


def test_websocket_denial_response_and_refusal(supervise, asgi_dir):
    sv = supervise("app", "--workers", "1", "--chdir", str(asgi_dir), "--no-watch").ready()
    with pytest.raises(InvalidStatus) as denied:
        connect(ws_url(sv.port, "/deny"), compression=None, open_timeout=5)
    assert denied.value.response.status_code == 401 and denied.value.response.body == b"go away"
    with connect(ws_url(sv.port, "/"), compression=None) as ws:  # control: another path is accepted
        assert ws.recv(timeout=5) == "version=1"
    assert http_get(sv.port) == (200, "version=1")
    assert sv.stop() == 0
