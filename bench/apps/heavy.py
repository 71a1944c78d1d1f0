"""A heavy WSGI app for the preload benchmark (bench/heavy.py): its import allocates ~220 MB of
Python objects and burns ~1 s of CPU, like a large Django project or a loaded model.

bench/heavy.py copies this file into a scratch directory and rewrites the VERSION line before a
reload.  Keep the line below in the form `VERSION = "..."`.
"""

import time

VERSION = "v0000"

_t0 = time.process_time()
DATA = [("x%d" % i, i) for i in range(1_400_000)]
while time.process_time() - _t0 < 1.0:
    pass

BODY = f"hello from {VERSION}\n".encode()
HEADERS = [("Content-Type", "text/plain"), ("Content-Length", str(len(BODY)))]


def application(environ, start_response):
    start_response("200 OK", HEADERS)
    return [BODY]
