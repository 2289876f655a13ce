"""Scenario state shared by replicas: the store protocol, an in-process store and a Redis
store with the same behaviour (one contract suite runs against both), and `open_store`."""

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


def open_store(redis_url: str | None, namespace: str, timeout_s: float = 5.0) -> ScenarioStore:
    return RedisStore(redis_url, namespace, timeout_s) if redis_url else MemoryStore()
