"""Flask and Django themselves receive chunked uploads intact (they ignore a body without a
CONTENT_LENGTH unless the server says the input is terminated, or sets the length)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

import httptools
import pytest

APPS = Path(__file__).resolve().parent / "apps"
BODY = os.urandom(300_000)  # larger than --body-spool-size: buffered through a temporary file


def chunked_upload(port: int, body: bytes, piece: int = 7000) -> dict:
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + piece]), body[i:i + piece])
                      for i in range(0, len(body), piece))
    request = (b"POST /upload HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n"
               b"Content-Type: application/octet-stream\r\nConnection: close\r\n\r\n" + chunks + b"0\r\n\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(request)
        response = b""
        while data := sock.recv(65536):
            response += data
    assert response.startswith(b"HTTP/1.1 200"), response[:500]
    return json.loads(body_of(response))


def body_of(response: bytes) -> bytes:
    """The body of one HTTP/1.1 response (Content-Length or chunked), parsed by httptools."""
    parts: list[bytes] = []

    class Collect:
        def on_body(self, body: bytes) -> None:
            parts.append(body)

    httptools.HttpResponseParser(Collect()).feed_data(response)
    return b"".join(parts)


EXPECTED = {"length": len(BODY), "sha256": hashlib.sha256(BODY).hexdigest()}


@pytest.mark.parametrize("app", ["flask_app:app", "django_app"])
def test_a_chunked_upload_reaches_the_framework_whole(supervise, app):
    sv = supervise(app, "-w", "1", "--chdir", str(APPS), "--no-watch").ready()
    assert chunked_upload(sv.port, BODY) == EXPECTED


def test_negative_control_django_loses_a_streamed_chunked_body(supervise):
    """Without buffering there is no CONTENT_LENGTH for a chunked body, and Django, which does not
    look at wsgi.input_terminated, reads none: the upload is silently lost."""
    sv = supervise("django_app", "-w", "1", "--chdir", str(APPS), "--no-watch", "--request-buffering", "0").ready()
    assert chunked_upload(sv.port, BODY)["length"] == 0
