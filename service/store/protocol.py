"""What every scenario store keeps and promises (`ScenarioStore`); `MemoryStore` and
`RedisStore` implement it, and one contract suite runs against both.

Per scenario the store holds one record: its revision, metadata and learning trace (JSON),
the adapted parameters (safetensors bytes), the candidates and interactions as registered
(what a re-adaptation starts from) and the pool's popularity. A write replaces the whole
record and assigns the next revision in one atomic step (a Lua script in Redis), so a reader
sees the old record or the new one, never a mix. Revisions only grow, also across a delete,
so a (scenario, revision) pair names one record forever (the service caches by it).

Every write and delete also announces itself on the events channel, in the same atomic step
({"type": "scenario", "scenario": id}), and a subscription starts with a {"type":
"subscribed"} event once it is live: a replica that hears both knows, without asking the
store, that a revision it read after subscribing is still current until an announcement for
that scenario arrives. A subscription that loses its connection ends with StoreError.
"""

import copy
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

SUBSCRIBED_EVENT = "subscribed"  # first event of a subscription, once it is live
SCENARIO_EVENT = "scenario"  # a scenario was written or deleted


@dataclass(frozen=True)
class ScenarioState:
    meta: dict[str, object]  # JSON: meta learner, variant, trace, counts, ...
    params: bytes  # safetensors: the adapted flat parameters (theta) and folded-in vectors
    candidates: list[str]  # the pool as registered (deduplicated, in order)
    interactions: list[tuple[str, str]]  # (user, item) as registered (deduplicated)
    popularity: list[tuple[str, int]]  # pool items with interactions, most popular first


@dataclass(frozen=True)
class StoredScenario:
    revision: int
    state: ScenarioState


class ScenarioStore(Protocol):
    async def ping(self) -> None: ...

    async def put(
        self, scenario_id: str, state: ScenarioState, expected_revision: int | None = None
    ) -> int | None:
        """Write a new revision and return it; with `expected_revision` (0: absent) only if
        the stored revision is that one, else write nothing and return None."""
        ...

    async def revision(self, scenario_id: str) -> int | None: ...

    async def get(self, scenario_id: str) -> StoredScenario | None: ...

    async def get_meta(self, scenario_id: str) -> dict[str, object] | None:
        """The metadata with "scenario" and "revision" added, without the large fields."""
        ...

    async def list_meta(self, after: str | None, limit: int) -> list[dict[str, object]]:
        """Up to `limit` scenarios' metadata in id order, starting after the id `after`."""
        ...

    async def delete(self, scenario_id: str, expected_revision: int | None = None) -> bool | None:
        """Delete the scenario: True if it was stored, False if not; with `expected_revision`
        only if the stored revision is that one, else delete nothing and return None."""
        ...

    async def put_previous(self, scenario_id: str, state: ScenarioState) -> None:
        """Keep a record a re-adaptation replaced, one per scenario (the last), so that going
        back to its meta learner can reuse it; deleted with the scenario."""
        ...

    async def get_previous(self, scenario_id: str) -> ScenarioState | None: ...

    async def acquire_lock(self, name: str, ttl_s: int) -> str | None:
        """A token if the lock was free (it expires after ttl_s), else None."""
        ...

    async def release_lock(self, name: str, token: str) -> None: ...

    async def publish(self, event: dict[str, object]) -> None: ...

    def events(self) -> AsyncIterator[dict[str, object]]:
        """Events published by any replica (this one included) and every scenario write or
        delete, as they come, after a first SUBSCRIBED_EVENT once the subscription is live."""
        ...

    async def close(self) -> None: ...


def with_ids(scenario_id: str, revision: int, meta: dict[str, object]) -> dict[str, object]:
    return {**copy.deepcopy(meta), "scenario": scenario_id, "revision": revision}
