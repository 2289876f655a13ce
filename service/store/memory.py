"""The in-process scenario store: the Redis store's behaviour for one replica without Redis."""

import asyncio
import copy
import secrets
from collections.abc import AsyncIterator

from service.store.protocol import (
    SCENARIO_EVENT,
    SUBSCRIBED_EVENT,
    ScenarioState,
    StoredScenario,
    with_ids,
)


class MemoryStore:
    """The in-process store: one replica, state lost at exit. Every method runs without an
    await inside, so on the event loop each is atomic like its Redis counterpart. It keeps
    copies, so a caller changing what it wrote or read cannot change a stored revision."""

    def __init__(self) -> None:
        self._records: dict[str, StoredScenario] = {}
        self._previous: dict[str, ScenarioState] = {}
        self._revisions: dict[str, int] = {}
        self._locks: dict[str, tuple[str, float]] = {}
        self._subscribers: list[asyncio.Queue[dict[str, object]]] = []

    async def ping(self) -> None:
        return None

    async def put(
        self, scenario_id: str, state: ScenarioState, expected_revision: int | None = None
    ) -> int | None:
        current = self._records.get(scenario_id)
        if expected_revision is not None and (current.revision if current else 0) != (
            expected_revision
        ):
            return None
        revision = self._revisions.get(scenario_id, 0) + 1
        self._revisions[scenario_id] = revision
        self._records[scenario_id] = StoredScenario(revision, copy.deepcopy(state))
        self._announce(scenario_id)
        return revision

    def _announce(self, scenario_id: str) -> None:
        for queue in self._subscribers:
            queue.put_nowait({"type": SCENARIO_EVENT, "scenario": scenario_id})

    async def revision(self, scenario_id: str) -> int | None:
        record = self._records.get(scenario_id)
        return record.revision if record else None

    async def get(self, scenario_id: str) -> StoredScenario | None:
        record = self._records.get(scenario_id)
        return copy.deepcopy(record) if record else None

    async def get_meta(self, scenario_id: str) -> dict[str, object] | None:
        record = self._records.get(scenario_id)
        return with_ids(scenario_id, record.revision, record.state.meta) if record else None

    async def list_meta(self, after: str | None, limit: int) -> list[dict[str, object]]:
        ids = sorted(i for i in self._records if after is None or i > after)[:limit]
        return [with_ids(i, self._records[i].revision, self._records[i].state.meta) for i in ids]

    async def delete(self, scenario_id: str, expected_revision: int | None = None) -> bool | None:
        current = self._records.get(scenario_id)
        if current is None:
            return False
        if expected_revision is not None and current.revision != expected_revision:
            return None
        del self._records[scenario_id]
        self._previous.pop(scenario_id, None)
        self._announce(scenario_id)
        return True

    async def put_previous(self, scenario_id: str, state: ScenarioState) -> None:
        self._previous[scenario_id] = copy.deepcopy(state)

    async def get_previous(self, scenario_id: str) -> ScenarioState | None:
        previous = self._previous.get(scenario_id)
        return copy.deepcopy(previous) if previous else None

    async def acquire_lock(self, name: str, ttl_s: int) -> str | None:
        now = asyncio.get_running_loop().time()
        held = self._locks.get(name)
        if held is not None and held[1] > now:
            return None
        token = secrets.token_hex(16)
        self._locks[name] = (token, now + ttl_s)
        return token

    async def release_lock(self, name: str, token: str) -> None:
        if self._locks.get(name, ("", 0.0))[0] == token:
            del self._locks[name]

    async def publish(self, event: dict[str, object]) -> None:
        for queue in self._subscribers:
            queue.put_nowait(event)

    async def events(self) -> AsyncIterator[dict[str, object]]:
        queue: asyncio.Queue[dict[str, object]] = asyncio.Queue()
        self._subscribers.append(queue)
        try:
            yield {"type": SUBSCRIBED_EVENT}
            while True:
                yield await queue.get()
        finally:
            self._subscribers.remove(queue)

    async def close(self) -> None:
        return None
