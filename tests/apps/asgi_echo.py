"""Echoes what the ASGI worker made of a request, as JSON, in the shape of tests/apps/echo.py
(the WSGI one), so the HTTP corpus checks both workers (tests/test_asgi_corpus.py)."""

from __future__ import annotations

import json


async def application(scope, receive, send):
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    headers: dict[str, str] = {}
    content_length = content_type = None
    for name, value in scope["headers"]:
        key, text = name.decode("latin-1"), value.decode("latin-1")
        if key == "content-length":
            content_length = text
        elif key == "content-type":
            content_type = text
        else:
            env = "HTTP_" + key.upper().replace("-", "_")
            headers[env] = headers[env] + "," + text if env in headers else text
    client = scope.get("client")
    seen = {
        "method": scope["method"],
        "path": scope["path"].encode("utf-8").decode("latin-1"),  # ASGI decodes UTF-8; shown as WSGI does
        "query": scope["query_string"].decode("latin-1"),
        "protocol": "HTTP/" + scope["http_version"],
        "scheme": scope["scheme"],
        "remote_addr": client[0] if client else None,
        "remote_port": str(client[1]) if client else None,
        # As the WSGI worker sets CONTENT_LENGTH: the body's size once it is whole (chunked too).
        "content_length": str(len(body)) if body or content_length or "HTTP_TRANSFER_ENCODING" in headers
        else None,
        "content_type": content_type,
        "input_terminated": True,
        "headers": headers,
        "trailers": None,
        "body": body.decode("latin-1"),
    }
    out = json.dumps(seen).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(out)).encode())]})
    await send({"type": "http.response.body", "body": out})
