"""The ASGI lifespan protocol: `startup` before the worker reports Ready, `shutdown` when it
drains.  `state` (the lifespan scope's "state") is copied into every request's scope.

With --lifespan auto, an app that raises before it takes the startup message (Django's ASGI
handler does) has no lifespan support: that is logged and the worker goes on.  An app that
took the message and then raised, or that sent `lifespan.startup.failed`, failed its startup
whatever the mode: a boot failure.  With --lifespan on, every failure is one; off never runs it.
"""

from __future__ import annotations

import asyncio
import traceback
from typing import Any, Callable


class Lifespan:
    def __init__(self, app: Callable, mode: str, log: Any) -> None:
        self.app = app
        self.mode = mode
        self.log = log
        self.state: dict[str, Any] = {}
        self.task: asyncio.Task | None = None
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.took_startup = False
        self.started: asyncio.Future | None = None  # result: None (ok) or an error text
        self.stopped: asyncio.Future | None = None
        self.supported = mode != "off"

    async def startup(self) -> str | None:
        """Run the startup; None when the app may serve, else the boot error's text.  Its time
        is bounded by the master's --boot-timeout (a worker that never reports Ready is killed)."""
        if self.mode == "off":
            return None
        loop = asyncio.get_running_loop()
        self.started, self.stopped = loop.create_future(), loop.create_future()
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": self.state}
        self.task = loop.create_task(self._run(scope))
        self.inbox.put_nowait({"type": "lifespan.startup"})
        return await self.started

    async def _run(self, scope: dict[str, Any]) -> None:
        try:
            await self.app(scope, self._receive, self._send)
        except BaseException as exc:  # noqa: BLE001 - the app's failure is reported, never ours
            first = f"{type(exc).__name__}: {exc}"
            if not self.took_startup and self.mode == "auto":
                self.supported = False
                self.log.info("lifespan_unsupported", error=first)
                self._settle(self.started, None)
            else:
                self.log.error("lifespan_error", error=first, traceback=traceback.format_exc())
                self._settle(self.started, f"lifespan startup failed: {first}")
            self._settle(self.stopped, None)
            if not isinstance(exc, Exception):
                raise
            return
        # The app returned: it has no lifespan support (auto), or it ended it.
        if self.started is not None and not self.started.done():
            if self.mode == "on":
                self._settle(self.started, "lifespan startup failed: the app returned without "
                                           "completing the startup")
            else:
                self.supported = False
                self.log.info("lifespan_unsupported", error="the app returned from the lifespan scope")
                self._settle(self.started, None)
        self._settle(self.stopped, None)

    async def _receive(self) -> dict[str, Any]:
        message = await self.inbox.get()
        if message["type"] == "lifespan.startup":
            self.took_startup = True
        return message

    async def _send(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "lifespan.startup.complete":
            self._settle(self.started, None)
        elif kind == "lifespan.startup.failed":
            text = str(message.get("message") or "lifespan.startup.failed")
            last = text.strip().splitlines()[-1] if text.strip() else text  # a traceback's last line
            self._settle(self.started, f"lifespan startup failed: {last}")
        elif kind == "lifespan.shutdown.complete":
            self._settle(self.stopped, None)
        elif kind == "lifespan.shutdown.failed":
            self.log.error("lifespan_shutdown_failed", error=str(message.get("message", "")))
            self._settle(self.stopped, None)
        else:
            raise RuntimeError(f"unexpected ASGI message in the lifespan scope: {kind!r}")

    async def shutdown(self, timeout: float) -> None:
        """Run the shutdown, at most `timeout` seconds."""
        if self.task is None or not self.supported or self.task.done() or self.stopped is None:
            return
        self.inbox.put_nowait({"type": "lifespan.shutdown"})
        try:
            await asyncio.wait_for(asyncio.shield(self.stopped), max(0.0, timeout))
        except asyncio.TimeoutError:
            self.log.warning("lifespan_shutdown_timeout", seconds=round(timeout, 3))
            self.task.cancel()

    @staticmethod
    def _settle(future: asyncio.Future | None, value: Any) -> None:
        if future is not None and not future.done():
            future.set_result(value)
