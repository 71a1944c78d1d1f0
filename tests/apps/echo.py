"""Echoes what the server made of a request, as JSON (the HTTP corpus and fuzz tests)."""

from __future__ import annotations

import json


def application(environ, start_response):
    body = environ["wsgi.input"].read()
    seen = {
        "method": environ["REQUEST_METHOD"],
        "path": environ["PATH_INFO"],
        "query": environ["QUERY_STRING"],
        "protocol": environ["SERVER_PROTOCOL"],
        "scheme": environ["wsgi.url_scheme"],
        "remote_addr": environ.get("REMOTE_ADDR"),
        "remote_port": environ.get("REMOTE_PORT"),
        "content_length": environ.get("CONTENT_LENGTH"),
        "content_type": environ.get("CONTENT_TYPE"),
        "input_terminated": environ.get("wsgi.input_terminated"),
        "headers": {k: v for k, v in environ.items() if k.startswith("HTTP_")},
        "trailers": environ.get("supervise.trailers"),
        "body": body.decode("latin-1"),
    }
    out = json.dumps(seen).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(out)))])
    return [out]
