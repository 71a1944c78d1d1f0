"""Hello-world WSGI app served identically by every server in the benchmark.

bench/run.py copies this file into a scratch directory and rewrites the
VERSION line before each reload, so a response tells which code generation
produced it.  Keep the line below in the form `VERSION = "..."`.
"""

VERSION = "v0000"

BODY = f"hello from {VERSION}\n".encode()
HEADERS = [("Content-Type", "text/plain"), ("Content-Length", str(len(BODY)))]


def application(environ, start_response):
    start_response("200 OK", HEADERS)
    return [BODY]
