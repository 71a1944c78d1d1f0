"""The ASGI worker: the same process life as the WSGI worker (import, Ready, StartAccepting,
drain, heartbeats), with an asyncio loop (uvloop when installed) serving ASGI 3 apps.

    server.py    the worker: accept gate, drain, heartbeats, lifespan order
    http.py      one HTTP/1.1 connection (httptools, through supervisor.worker.http)
    websocket.py one WebSocket connection (wsproto)
    lifespan.py  the lifespan protocol: startup before Ready, shutdown on drain
"""
