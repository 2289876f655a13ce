"""Scenario state shared by replicas: the store protocol, an in-process store and a Redis
store with the same behaviour (one contract suite runs against both), and `open_store`."""

from pathlib import Path

from pydantic import SecretStr

from service.store.memory import MemoryStore
from service.store.protocol import (
    SCENARIO_EVENT,
    SUBSCRIBED_EVENT,
    ScenarioState,
    ScenarioStore,
    StoredScenario,
)
from service.store.redis import RedisStore

__all__ = [
    "SCENARIO_EVENT",
    "SUBSCRIBED_EVENT",
    "MemoryStore",
    "RedisStore",
    "ScenarioState",
    "ScenarioStore",
    "StoredScenario",
    "open_store",
]


def open_store(
    redis_url: str | None,
    namespace: str,
    timeout_s: float = 5.0,
    *,
    password: SecretStr | None = None,
    tls_ca_file: Path | None = None,
) -> ScenarioStore:
    """The Redis store at `redis_url` (with its password and, for rediss://, its CA file), or
    an in-process store when there is no URL."""
    if not redis_url:
        return MemoryStore()
    return RedisStore(redis_url, namespace, timeout_s, password=password, tls_ca_file=tls_ca_file)
