"""The master's side of the Consul registration, as decisions.

The Consul helper process does the HTTP; this decides what to tell it and when:

* `Register` once the first generation serves, and again to a restarted helper;
* `Alive` every ttl/3 while the master's loop turns (the helper lets the TTL check lapse
  when these stop, so a hung master goes critical);
* a `Note` on each reload's outcome (the check stays passing through reloads);
* the helper's reports (registered, Consul down or up, withdrawn) kept for the health JSON.

The withdrawal itself is sequenced by `Shutdown`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from supervisor import proto


@dataclass
class ConsulStatus:
    service_id: str | None = None
    registered: bool = False
    reachable: bool | None = None  # None: not known yet
    error: str | None = None


class ConsulLink:
    def __init__(self, ttl: float) -> None:
        self.alive_interval = ttl / 3
        self.wanted = False  # the service became ready: it must be registered
        self.next_alive: float | None = None
        self.status = ConsulStatus()

    def generation_serving(self, now: float, number: int, first: bool,
                           env: Mapping[str, str]) -> list[proto.Message]:
        if first:
            self.wanted = True
            self.next_alive = now
            return [proto.Register(dict(env))]
        return [proto.Note(f"generation {number} serving")]

    def reload_failed(self, number: int, error: str) -> list[proto.Message]:
        return [proto.Note(f"reload to generation {number} failed: {error}; generation still serving")]

    def helper_started(self, now: float, env: Mapping[str, str], running: bool) -> list[proto.Message]:
        """A (re)started helper knows nothing: register again if the service is ready (and no
        shutdown has begun)."""
        if not self.wanted or not running:
            return []
        self.next_alive = now
        return [proto.Register(dict(env))]

    def shutdown_began(self) -> None:
        """No more heartbeats: the withdrawal is on its way."""
        self.next_alive = None

    def due(self, now: float) -> list[proto.Message]:
        if self.next_alive is None or now < self.next_alive:
            return []
        self.next_alive = now + self.alive_interval
        return [proto.Alive()]

    def heard(self, message: proto.Message) -> None:
        """What the helper reports, for the health JSON (the helper logs it itself)."""
        status = self.status
        if isinstance(message, proto.Registered):
            status.service_id, status.registered, status.reachable = message.service_id, True, True
        elif isinstance(message, proto.ConsulDown):
            status.reachable, status.error = False, message.error
        elif isinstance(message, proto.ConsulUp):
            status.reachable, status.error = True, None
        elif isinstance(message, proto.Withdrawn):
            status.registered = status.registered and not message.ok
            if message.error:
                status.error = message.error

    def view(self) -> dict[str, Any]:
        s = self.status
        return {"service_id": s.service_id, "registered": s.registered, "reachable": s.reachable,
                "error": s.error}
