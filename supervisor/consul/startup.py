"""Consul at start, in the master: the KV environment for the first generation (one read)."""

from __future__ import annotations

from supervisor.consul.client import Client, kv_query, log_skipped
from supervisor.consul.spec import ConsulError, ConsulSpec, one_line, split_kv


def fetch_kv_env(spec: ConsulSpec) -> dict[str, str]:
    """Every key under the KV prefix as {NAME: value}.  One read; ConsulError on failure."""
    prefix = spec.kv_prefix
    if prefix is None:
        return {}
    client = Client(spec)
    try:
        env, skipped = split_kv(prefix, kv_query(client, prefix)[1])
    except ConsulError as exc:
        raise type(exc)(one_line(exc)) from None
    finally:
        client.http.close()
    log_skipped(skipped)
    return env
