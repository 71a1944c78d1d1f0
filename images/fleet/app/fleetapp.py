"""The fleet demo's WSGI app: the example app (images/example/app) plus what a fleet needs.

A release of the fleet is images/example/app/* with this file added; supervise runs
`fleetapp:application` from /srv/code/current, the symlink scripts/deploy swaps.

    /whoami      JSON: instance, datacenter, VERSION, GREETING (from Consul KV), release dir
    /env?k=NAME  the value of one environment variable (the KV prefix's keys arrive here)
    anything else: the example app (/, /version, /pid, /slow?s=3, ...)
"""

import json
import os

from app import application as example_application
from version import VERSION

RELEASE = os.path.basename(os.getcwd())  # workers chdir into the resolved release directory


def _answer(start_response, body, ctype="text/plain; charset=utf-8"):
    data = body.encode()
    start_response("200 OK", [("Content-Type", ctype), ("Content-Length", str(len(data)))])
    return [data]


def application(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    if path == "/whoami":
        body = json.dumps({
            "instance": os.environ.get("FLEET_INSTANCE", "?"),
            "dc": os.environ.get("FLEET_DC", "?"),
            "version": VERSION,
            "greeting": os.environ.get("GREETING"),
            "release": RELEASE,
            "pid": os.getpid(),
        }, sort_keys=True)
        return _answer(start_response, body + "\n", "application/json")
    if path == "/env":
        name = environ.get("QUERY_STRING", "").partition("k=")[2].partition("&")[0]
        return _answer(start_response, os.environ.get(name, "<unset>") + "\n")
    return example_application(environ, start_response)
