"""A Starlette app run by the real framework (tests/test_asgi.py): JSON, streaming, WebSocket
echo, and state set by its lifespan."""

from __future__ import annotations

import asyncio
import contextlib

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect


@contextlib.asynccontextmanager
async def lifespan(app):
    yield {"greeting": "set by the lifespan startup"}


async def json_echo(request: Request) -> JSONResponse:
    data = await request.json()
    return JSONResponse({"got": data, "keys": sorted(data)})


async def stream(request: Request) -> StreamingResponse:
    async def pieces():
        for i in range(5):
            await asyncio.sleep(0)
            yield f"piece {i}\n".encode()

    return StreamingResponse(pieces(), media_type="text/plain")


async def state(request: Request) -> JSONResponse:
    return JSONResponse({"greeting": request.state.greeting})


async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") is not None:
                await websocket.send_text("echo:" + message["text"])
            else:
                await websocket.send_bytes(message.get("bytes") or b"")
    except WebSocketDisconnect:
        return


app = Starlette(routes=[Route("/json", json_echo, methods=["POST"]), Route("/stream", stream),
                        Route("/state", state), WebSocketRoute("/ws", echo)], lifespan=lifespan)
