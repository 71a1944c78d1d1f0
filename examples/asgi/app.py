"""The ASGI demo: a plain ASGI 3 app (no framework) with a lifespan, HTTP and a WebSocket echo.

    supervise app --chdir examples/asgi            # --interface auto sees `async def`: ASGI
    curl localhost:8000/                           # version and the lifespan's state
    python -m websockets ws://localhost:8000/ws    # an echo; a reload closes it with 1012

Edit VERSION and save (or send SIGHUP): the new generation takes over with no failed request,
and open WebSockets are told to reconnect (1012) once it serves."""

import json
import os
import time

VERSION = "1"


async def application(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                # Open pools and clients here; a failure here is a boot failure: the old
                # generation keeps serving.  What goes in the state is in every request's scope.
                scope["state"]["started_at"] = time.time()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    elif scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": f"hello from version {VERSION}"})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            await send({"type": "websocket.send", "text": message.get("text") or "", "bytes": message.get("bytes")}
                       if message.get("text") is None else {"type": "websocket.send", "text": message["text"]})
    else:
        body = json.dumps({"version": VERSION, "worker_pid": os.getpid(),
                           "up_seconds": round(time.time() - scope["state"]["started_at"], 3)}).encode() + b"\n"
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
