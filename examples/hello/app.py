"""The demo app: `make demo` serves it under supervise.

Edit VERSION and save (the code directory is watched), or send SIGHUP, and watch
the new generation take over with no failed request."""

import os
import time

VERSION = "1"


def application(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/slow":
        time.sleep(float(environ.get("QUERY_STRING", "").partition("=")[2] or 2))
    body = f"hello from supervise: version {VERSION}, worker pid {os.getpid()}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))])
    return [body]
