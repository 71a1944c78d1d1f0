"""Hello-world ASGI app served identically by every ASGI server in the benchmark.

bench/run.py copies this file into a scratch directory (as hello.py) and rewrites the
VERSION line before each reload, so a response tells which code generation produced it.
Keep the line below in the form `VERSION = "..."`.
"""

VERSION = "v0000"

BODY = f"hello from {VERSION}\n".encode()
START = {"type": "http.response.start", "status": 200,
         "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(BODY)).encode())]}
END = {"type": "http.response.body", "body": BODY}


async def application(scope, receive, send):
    if scope["type"] == "lifespan":  # nothing to set up; say so, for servers that run the protocol
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    await send(START)
    await send(END)
