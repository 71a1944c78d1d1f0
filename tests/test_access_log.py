"""The access log (--access-log, --access-log-format json|combined) and request ids, against a
real supervise and real sockets.

The combined format is written by every worker straight to stdout: lines must never interleave
and a hostile request must not be able to forge or break a line.  The negative control runs
the same hostile requests with the escaping patched out (tests/inject.py `raw-access-log`) and
checks that the test then sees a broken line.
"""

from __future__ import annotations

import re
import socket
import threading
from pathlib import Path
from typing import Any

from tests.harness import Supervise, wait_until

APP = '''
import json

def app(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/boom":
        raise RuntimeError("boom")
    headers = [("Content-Type", "application/json")]
    if path == "/own-id":
        headers.append(("X-Request-ID", "app-chose-this"))
    body = json.dumps({"environ": environ.get("HTTP_X_REQUEST_ID"),
                       "supervise": environ.get("supervise.request_id")}).encode()
    start_response("200 OK", headers)
    return [body]
'''

# REMOTE - - [TIME] "REQUEST" STATUS BYTES "REFERER" "USER-AGENT" SECONDS ID: no field may hold a
# bare quote, so the regex anchors every field.
COMBINED = re.compile(r'(?P<remote>\S+) - - \[(?P<time>\d{2}/[A-Z][a-z]{2}/\d{4}:\d{2}:\d{2}:\d{2} \+0000)\] '
                      r'"(?P<request>(?:[^"\\]|\\x[0-9a-f]{2})*)" (?P<status>\d{3}) (?P<bytes>\d+|-) '
                      r'"(?P<referer>(?:[^"\\]|\\x[0-9a-f]{2})*)" "(?P<agent>(?:[^"\\]|\\x[0-9a-f]{2})*)" '
                      r'(?P<seconds>\d+\.\d{6}) (?P<id>\S+)')
HEX32 = re.compile(r"[0-9a-f]{32}")


def start(supervise: Any, tmp_path: Path, *extra: str, workers: int = 1, inject: tuple[str, ...] = ()) -> Supervise:
    code = tmp_path / "code"
    code.mkdir(exist_ok=True)
    (code / "logapp.py").write_text(APP)
    return supervise("logapp:app", "--workers", str(workers), "--chdir", str(code), "--no-watch",
                     *extra, inject=list(inject)).ready()


def request(port: int, head: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send one raw request (Connection: close) and read the whole response."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head_bytes, _, body = data.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


def get(port: int, path: str = "/", *headers: str) -> tuple[int, dict[str, str], bytes]:
    extra = "".join(h + "\r\n" for h in headers)
    return request(port, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{extra}\r\n".encode("latin-1"))


# --------------------------------------------------------------------------- request ids


def test_a_fresh_id_is_in_the_environ_the_response_and_the_json_log(supervise, tmp_path):
    sv = start(supervise, tmp_path, "--access-log")
    status, headers, body = get(sv.port, "/a?b=1", "User-Agent: tester/1", "Referer: http://r.example/")
    rid = headers["x-request-id"]
    assert status == 200 and HEX32.fullmatch(rid), headers
    assert body == b'{"environ": "%s", "supervise": "%s"}' % (rid.encode(), rid.encode())
    event = sv.wait_for("request", request_id=rid)
    assert {k: event[k] for k in ("method", "path", "query", "protocol", "status", "user_agent", "referer")} == {
        "method": "GET", "path": "/a", "query": "b=1", "protocol": "HTTP/1.1", "status": 200,
        "user_agent": "tester/1", "referer": "http://r.example/"}
    assert event["bytes"] == len(body) and event["remote"] == "127.0.0.1" and event["duration"] >= 0
    # Ids are unique.
    assert len({get(sv.port)[1]["x-request-id"] for _ in range(20)}) == 20


def test_a_sane_client_id_is_kept_and_junk_is_replaced(supervise, tmp_path):
    sv = start(supervise, tmp_path, "--access-log")
    status, headers, body = get(sv.port, "/", "X-Request-ID: lb-4711.abc")
    assert status == 200 and headers["x-request-id"] == "lb-4711.abc" and b'"supervise": "lb-4711.abc"' in body
    sv.wait_for("request", request_id="lb-4711.abc")
    # Negative control: an id with a quote, a space or 201 characters is not passed on.
    for junk in ('a"b', "a b", "x" * 201):
        _, headers, body = get(sv.port, "/", f"X-Request-ID: {junk}")
        assert HEX32.fullmatch(headers["x-request-id"]), (junk, headers)
        assert junk.encode() not in body


def test_the_apps_own_id_wins_and_is_logged(supervise, tmp_path):
    sv = start(supervise, tmp_path, "--access-log")
    status, headers, _ = get(sv.port, "/own-id")
    raw = request(sv.port, b"GET /own-id HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status == 200 and headers["x-request-id"] == "app-chose-this"
    assert raw[0] == 200
    sv.wait_for("request", path="/own-id", request_id="app-chose-this", count=2)


def test_an_error_response_carries_the_id(supervise, tmp_path):
    sv = start(supervise, tmp_path, "--access-log")
    status, headers, _ = get(sv.port, "/boom", "X-Request-ID: trace-me")
    assert status == 500 and headers["x-request-id"] == "trace-me"
    sv.wait_for("request", request_id="trace-me", status=500)


def test_no_request_id_turns_it_all_off(supervise, tmp_path):
    sv = start(supervise, tmp_path, "--access-log", "--no-request-id")
    status, headers, body = get(sv.port, "/off")
    assert status == 200 and "x-request-id" not in headers
    assert body == b'{"environ": null, "supervise": null}'
    assert sv.wait_for("request", path="/off")["request_id"] is None
    # The client's own header still reaches the app untouched (it is just a header then).
    assert b'"environ": "a b"' in get(sv.port, "/", "X-Request-ID: a b")[2]


# --------------------------------------------------------------------------- combined format

HOSTILE = [
    # (request target, extra headers): quotes, backslashes, tabs and UTF-8 where a field could end.
    ('/q"uote\\back', ['User-Agent: ua" 200 1 "-" "forged', 'Referer: r\te\\f']),
    ("/caf%C3%A9", ["User-Agent: caf\xc3\xa9", "X-Request-ID: ok-id"]),
    ("/long", ["User-Agent: " + "U" * 6000, "Referer: " + '"' * 3000]),
]


def combined_lines(sv: Supervise) -> list[str]:
    return [line for line in sv.raw if not line.startswith("{")]


def send_hostile(sv: Supervise) -> None:
    for target, headers in HOSTILE:
        status, _, _ = get(sv.port, target, *headers)
        assert status == 200


def test_combined_lines_escape_what_could_end_a_field(supervise, tmp_path):
    sv = start(supervise, tmp_path, "--access-log", "--access-log-format", "combined")
    send_hostile(sv)
    lines = wait_until(lambda: (ls := combined_lines(sv)) and len(ls) >= len(HOSTILE) and ls, message="3 lines")
    parsed = [COMBINED.fullmatch(line) for line in lines]
    assert all(parsed), lines
    first, second, third = parsed
    assert first["request"] == 'GET /q\\x22uote\\x5cback HTTP/1.1'
    assert first["agent"] == 'ua\\x22 200 1 \\x22-\\x22 \\x22forged' and first["referer"] == "r\\x09e\\x5cf"
    assert first["status"] == "200" and HEX32.fullmatch(first["id"])
    assert second["agent"] == "caf\\xc3\\xa9" and second["id"] == "ok-id" and second["request"] == "GET /caf%C3%A9 HTTP/1.1"
    # Huge values are cut: one line stays a single atomic pipe write.
    assert len(lines[2].encode()) < 4096 and third["agent"].startswith("UUU")


def test_negative_control_unescaped_lines_are_caught(supervise, tmp_path):
    """With escaping patched out, the same requests give lines the parser rejects or misreads:
    the test above would catch a regression."""
    sv = start(supervise, tmp_path, "--access-log", "--access-log-format", "combined", inject=("raw-access-log",))
    send_hostile(sv)
    lines = wait_until(lambda: (ls := combined_lines(sv)) and len(ls) >= len(HOSTILE) and ls, message="3 lines")
    first = COMBINED.fullmatch(lines[0])
    assert first is None or first["agent"] != 'ua\\x22 200 1 \\x22-\\x22 \\x22forged', lines[0]


def test_combined_lines_of_many_workers_and_clients_never_interleave(supervise, tmp_path):
    sv = start(supervise, tmp_path, "--access-log", "--access-log-format", "combined", "--threads", "4",
               workers=2)
    ua = "User-Agent: " + "agent-" * 300  # long lines: a torn write would show
    errors: list[BaseException] = []

    def client(n: int) -> None:
        try:
            for i in range(40):
                assert get(sv.port, f"/c{n}/{i}", ua, f"X-Request-ID: c{n}-{i}")[0] == 200
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
    lines = wait_until(lambda: (ls := combined_lines(sv)) and len(ls) >= 320 and ls, message="320 lines")
    ids = set()
    for line in lines:
        match = COMBINED.fullmatch(line)
        assert match, line[:300]
        ids.add(match["id"])
        assert match["request"].startswith(f"GET /{match['id'].replace('-', '/')} ")
    assert len(ids) == 320
