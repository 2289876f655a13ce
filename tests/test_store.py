"""Contract tests for the scenario store: the same tests run against the in-process
MemoryStore and a RedisStore on the local Redis (each test in its own namespace, removed
afterwards), plus Redis-only tests for failures and stored records of another schema."""

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from uuid import uuid4

import pytest
import redis
import redis.asyncio as aioredis
from conftest import REDIS_URL, needs_redis

from service.errors import StoreError
from service.store import (
    SCENARIO_EVENT,
    SUBSCRIBED_EVENT,
    MemoryStore,
    RedisStore,
    ScenarioState,
    ScenarioStore,
)

UNREACHABLE_URL = "redis://127.0.0.1:1/0"

pytestmark = pytest.mark.anyio


async def _drop_namespace(namespace: str) -> None:
    raw = aioredis.Redis.from_url(REDIS_URL)
    try:
        keys = [key async for key in raw.scan_iter(match=f"{namespace}:*", count=500)]
        if keys:
            await raw.delete(*keys)
    finally:
        await raw.aclose()


@pytest.fixture
async def redis_namespace(anyio_backend) -> AsyncIterator[str]:
    namespace = f"test-{uuid4().hex}"
    yield namespace
    await _drop_namespace(namespace)


@pytest.fixture(params=["memory", pytest.param("redis", marks=needs_redis)])
async def store(request, anyio_backend) -> AsyncIterator[ScenarioStore]:
    if request.param == "memory":
        memory = MemoryStore()
        yield memory
        await memory.close()
        return
    namespace = f"test-{uuid4().hex}"
    redis_store = RedisStore(REDIS_URL, namespace, timeout_s=2.0)
    try:
        yield redis_store
    finally:
        await redis_store.close()
        await _drop_namespace(namespace)


def _state(k: int) -> ScenarioState:
    """A state whose every field is derived from k, so a mix of two writes shows."""
    return ScenarioState(
        meta={
            "k": k,
            "meta_learner": "s2meta",
            "variant": f"v{k}",
            "trace": [{"step": s, "loss": 0.5 / (s + 1)} for s in range(3)],
            "counts": {"candidates": 3, "interactions": 2},
        },
        params=bytes([k % 256]) * 64 + b"\x00\xff" + f"params-{k}".encode(),
        candidates=[f"item-{k}-{j}" for j in range(3)],
        interactions=[(f"user-{k}", f"item-{k}-0"), (f"user-{k}", f"item-{k}-2")],
        popularity=[(f"item-{k}-0", k + 2), (f"item-{k}-2", 1)],
    )


async def test_put_assigns_revisions_1_then_2(store):
    assert await store.put("s1", _state(1)) == 1
    assert await store.put("s1", _state(2)) == 2
    assert await store.revision("s1") == 2
    # Another scenario has its own revisions.
    assert await store.put("s2", _state(3)) == 1


async def test_get_returns_exact_state_and_revision(store):
    state = _state(7)
    revision = await store.put("s1", state)
    stored = await store.get("s1")
    assert stored is not None
    assert stored.revision == revision == 1
    assert stored.state == state
    assert stored.state.meta == state.meta
    assert isinstance(stored.state.params, bytes)
    assert stored.state.params == state.params
    assert stored.state.candidates == state.candidates
    assert stored.state.interactions == state.interactions
    assert all(isinstance(pair, tuple) for pair in stored.state.interactions)
    assert stored.state.popularity == state.popularity
    assert all(isinstance(pair, tuple) for pair in stored.state.popularity)
    assert all(isinstance(count, int) for _, count in stored.state.popularity)


async def test_get_returns_latest_write(store):
    await store.put("s1", _state(1))
    await store.put("s1", _state(2))
    stored = await store.get("s1")
    assert stored is not None
    assert (stored.revision, stored.state) == (2, _state(2))


async def test_empty_state_round_trips(store):
    state = ScenarioState(meta={}, params=b"", candidates=[], interactions=[], popularity=[])
    assert await store.put("empty", state) == 1
    stored = await store.get("empty")
    assert stored is not None
    assert stored.state == state


async def test_unknown_scenario(store):
    assert await store.revision("missing") is None
    assert await store.get("missing") is None
    assert await store.get_meta("missing") is None
    assert await store.delete("missing") is False


async def test_conditional_put(store):
    # 0 means "absent": succeeds on a new scenario.
    assert await store.put("s1", _state(1), expected_revision=0) == 1
    # 0 when present, or a wrong revision: nothing written.
    assert await store.put("s1", _state(2), expected_revision=0) is None
    assert await store.put("s1", _state(3), expected_revision=2) is None
    assert await store.put("s1", _state(3), expected_revision=5) is None
    stored = await store.get("s1")
    assert stored is not None
    assert (stored.revision, stored.state) == (1, _state(1))
    assert await store.revision("s1") == 1
    # The stored revision: written.
    assert await store.put("s1", _state(4), expected_revision=1) == 2
    stored = await store.get("s1")
    assert stored is not None
    assert (stored.revision, stored.state) == (2, _state(4))
    # A non-zero expected revision on an absent scenario: nothing written.
    assert await store.put("s2", _state(5), expected_revision=1) is None
    assert await store.get("s2") is None
    assert await store.revision("s2") is None


async def test_revisions_grow_across_delete(store):
    assert await store.put("s1", _state(1)) == 1
    assert await store.put("s1", _state(2)) == 2
    assert await store.delete("s1") is True
    assert await store.revision("s1") is None
    assert await store.get("s1") is None
    assert await store.get_meta("s1") is None
    revision = await store.put("s1", _state(3))
    assert revision is not None
    assert revision > 2
    stored = await store.get("s1")
    assert stored is not None
    assert (stored.revision, stored.state) == (revision, _state(3))


async def test_conditional_put_after_delete_expects_absent(store):
    assert await store.put("s1", _state(1)) == 1
    assert await store.delete("s1") is True
    assert await store.put("s1", _state(2), expected_revision=1) is None
    revision = await store.put("s1", _state(2), expected_revision=0)
    assert revision is not None
    assert revision > 1


async def test_conditional_delete(store):
    await store.put("s1", _state(1))
    await store.put("s1", _state(2))
    # A revision that is not the stored one: nothing deleted, nothing announced.
    assert await store.delete("s1", expected_revision=1) is None
    stored = await store.get("s1")
    assert stored is not None
    assert (stored.revision, stored.state) == (2, _state(2))
    assert [m["scenario"] for m in await store.list_meta(None, 10)] == ["s1"]
    # The stored revision: deleted.
    assert await store.delete("s1", expected_revision=2) is True
    assert await store.get("s1") is None
    # Absent: False whatever is expected.
    assert await store.delete("s1", expected_revision=2) is False


async def test_delete_true_then_false(store):
    await store.put("s1", _state(1))
    await store.put("s2", _state(2))
    assert await store.delete("s1") is True
    assert await store.delete("s1") is False
    # The other scenario is untouched.
    stored = await store.get("s2")
    assert stored is not None
    assert stored.state == _state(2)
    assert [m["scenario"] for m in await store.list_meta(None, 10)] == ["s2"]


async def test_get_meta(store):
    await store.put("s1", _state(1))
    await store.put("s1", _state(4))
    meta = await store.get_meta("s1")
    assert meta == {**_state(4).meta, "scenario": "s1", "revision": 2}
    for large in ("params", "candidates", "interactions", "popularity"):
        assert large not in meta


async def test_list_meta_id_order(store):
    ids = ["b", "a", "d", "c", "a1", "B"]
    for k, scenario_id in enumerate(ids):
        await store.put(scenario_id, _state(k))
    await store.put("c", _state(10))  # revision 2 for "c"
    listed = await store.list_meta(None, 100)
    assert [m["scenario"] for m in listed] == sorted(ids)
    by_id = {m["scenario"]: m for m in listed}
    assert by_id["c"] == {**_state(10).meta, "scenario": "c", "revision": 2}
    assert by_id["a"] == {**_state(1).meta, "scenario": "a", "revision": 1}
    for meta in listed:
        for large in ("params", "candidates", "interactions", "popularity"):
            assert large not in meta


async def test_list_meta_pages_cover_all_once(store):
    ids = [f"scn-{i:03d}" for i in range(23)]
    for k, scenario_id in enumerate(reversed(ids)):
        await store.put(scenario_id, _state(k))
    await store.put("gone", _state(99))
    await store.delete("gone")

    seen: list[str] = []
    after: str | None = None
    pages = 0
    while True:
        page = await store.list_meta(after, 5)
        pages += 1
        assert len(page) <= 5
        if not page:
            break
        seen.extend(m["scenario"] for m in page)
        after = page[-1]["scenario"]
        assert pages < 20
    assert seen == sorted(ids)
    assert len(set(seen)) == len(ids)
    assert pages == 6  # 5 + 5 + 5 + 5 + 3, then an empty page

    assert [m["scenario"] for m in await store.list_meta("scn-010", 3)] == [
        "scn-011",
        "scn-012",
        "scn-013",
    ]
    # `after` need not be a stored id.
    assert [m["scenario"] for m in await store.list_meta("scn-0105", 2)] == [
        "scn-011",
        "scn-012",
    ]
    assert await store.list_meta("scn-022", 5) == []
    assert await store.list_meta("zzz", 5) == []


async def test_list_meta_empty(store):
    assert await store.list_meta(None, 10) == []


async def test_lock_acquire_and_release(store):
    token = await store.acquire_lock("adapt:s1", 30)
    assert isinstance(token, str)
    assert token
    assert await store.acquire_lock("adapt:s1", 30) is None
    # Another lock name is independent.
    other = await store.acquire_lock("adapt:s2", 30)
    assert other is not None
    # A wrong token does not release it.
    await store.release_lock("adapt:s1", "not-the-token")
    assert await store.acquire_lock("adapt:s1", 30) is None
    # The right token does.
    await store.release_lock("adapt:s1", token)
    second = await store.acquire_lock("adapt:s1", 30)
    assert second is not None
    assert second != token
    # The old token no longer releases the new holder's lock.
    await store.release_lock("adapt:s1", token)
    assert await store.acquire_lock("adapt:s1", 30) is None
    await store.release_lock("adapt:s1", second)
    await store.release_lock("adapt:s2", other)


async def test_lock_expires_after_ttl(store):
    token = await store.acquire_lock("short", 1)
    assert token is not None
    assert await store.acquire_lock("short", 1) is None
    await asyncio.sleep(1.2)
    again = await store.acquire_lock("short", 30)
    assert again is not None
    assert again != token
    await store.release_lock("short", again)


async def _collect(store: ScenarioStore, count: int, into: list[dict[str, object]]) -> None:
    async for event in store.events():
        into.append(event)
        if len(into) >= count:
            return


async def test_a_subscription_says_when_it_is_live_and_hears_every_write_and_delete(store):
    """What lets a replica trust a revision it read without asking again: the first event
    says the subscription is live, then every put (conditional ones that wrote included) and
    every delete of an existing scenario is announced, by any writer."""
    events = store.events()
    try:
        assert await asyncio.wait_for(anext(events), timeout=5.0) == {"type": SUBSCRIBED_EVENT}
        await store.put("s1", _state(1))
        assert await store.put("s1", _state(2), expected_revision=7) is None  # wrote nothing
        await store.put("s1", _state(3), expected_revision=1)
        assert await store.delete("s1")
        assert not await store.delete("s1")  # nothing to delete: no announcement
        await store.put("s2", _state(4))
        heard = [await asyncio.wait_for(anext(events), timeout=5.0) for _ in range(4)]
    finally:
        await events.aclose()
    assert heard == [{"type": SCENARIO_EVENT, "scenario": name} for name in ("s1",) * 3 + ("s2",)]


async def test_events_reach_subscribers(store):
    events = [
        {"type": "updated", "scenario": "s1", "revision": 1},
        {"type": "deleted", "scenario": "s2", "revision": 4, "extra": [1, "two", None]},
        {"type": "updated", "scenario": "s3", "revision": 2, "nested": {"a": 1.5}},
    ]
    first: list[dict[str, object]] = []
    second: list[dict[str, object]] = []
    # Each subscription's first event says it is live.
    tasks = [
        asyncio.create_task(_collect(store, len(events) + 1, first)),
        asyncio.create_task(_collect(store, len(events) + 1, second)),
    ]
    try:
        await asyncio.sleep(0.3)  # let the subscriptions be established
        for event in events:
            await store.publish(event)
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=5.0)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert first == [{"type": SUBSCRIBED_EVENT}, *events]
    assert second == [{"type": SUBSCRIBED_EVENT}, *events]


async def test_concurrent_puts_are_atomic(store):
    n = 20
    states = {k: _state(k) for k in range(n)}
    revisions = await asyncio.gather(*(store.put("hot", states[k]) for k in range(n)))
    assert sorted(revisions) == list(range(1, n + 1))
    writer_of = {revision: k for k, revision in enumerate(revisions)}

    stored = await store.get("hot")
    assert stored is not None
    assert stored.revision == n
    final = stored.state
    # Whole, not a mix: every field derives from the same index k ...
    k = final.meta["k"]
    assert isinstance(k, int)
    assert final == states[k]
    assert final.params == states[k].params
    assert final.candidates == states[k].candidates
    assert final.interactions == states[k].interactions
    assert final.popularity == states[k].popularity
    # ... and it is the write that got the last revision.
    assert k == writer_of[n]
    meta = await store.get_meta("hot")
    assert meta == {**states[k].meta, "scenario": "hot", "revision": n}


async def test_concurrent_conditional_puts_one_wins(store):
    n = 10
    results = await asyncio.gather(
        *(store.put("race", _state(k), expected_revision=0) for k in range(n))
    )
    winners = [k for k, revision in enumerate(results) if revision is not None]
    assert len(winners) == 1
    assert results[winners[0]] == 1
    stored = await store.get("race")
    assert stored is not None
    assert (stored.revision, stored.state) == (1, _state(winners[0]))


# --- Redis only ---------------------------------------------------------------------------


async def _raw_hash_keys(namespace: str) -> list[bytes]:
    raw = aioredis.Redis.from_url(REDIS_URL)
    try:
        keys = [key async for key in raw.scan_iter(match=f"{namespace}:*", count=500)]
        return [key for key in keys if await raw.type(key) == b"hash"]
    finally:
        await raw.aclose()


_UNREACHABLE_CALLS: dict[str, Callable[[RedisStore], Awaitable[object]]] = {
    "ping": lambda s: s.ping(),
    "put": lambda s: s.put("s1", _state(1)),
    "put_conditional": lambda s: s.put("s1", _state(1), expected_revision=0),
    "get": lambda s: s.get("s1"),
    "get_meta": lambda s: s.get_meta("s1"),
    "revision": lambda s: s.revision("s1"),
    "list_meta": lambda s: s.list_meta(None, 10),
    "delete": lambda s: s.delete("s1"),
    "acquire_lock": lambda s: s.acquire_lock("l", 5),
    "release_lock": lambda s: s.release_lock("l", "token"),
    "publish": lambda s: s.publish({"type": "updated"}),
}


@pytest.mark.parametrize("operation", list(_UNREACHABLE_CALLS))
async def test_redis_unreachable_raises_store_error(operation):
    unreachable = RedisStore(UNREACHABLE_URL, f"test-{uuid4().hex}", timeout_s=0.5)
    try:
        with pytest.raises(StoreError):
            await asyncio.wait_for(_UNREACHABLE_CALLS[operation](unreachable), timeout=5.0)
    finally:
        await unreachable.close()


async def test_redis_unreachable_events_raise_store_error():
    unreachable = RedisStore(UNREACHABLE_URL, f"test-{uuid4().hex}", timeout_s=0.5)
    events = unreachable.events()
    try:
        with pytest.raises(StoreError):
            await asyncio.wait_for(anext(events), timeout=5.0)
    finally:
        await events.aclose()
        await unreachable.close()


@needs_redis
@pytest.mark.parametrize("tamper", ["other", "missing"])
async def test_redis_unreadable_schema_raises_store_error(redis_namespace, tamper):
    store = RedisStore(REDIS_URL, redis_namespace, timeout_s=2.0)
    try:
        await store.put("s1", _state(1))
        await store.put("s2", _state(2))
        hashes = await _raw_hash_keys(redis_namespace)
        assert len(hashes) == 2
        (record_key,) = [key for key in hashes if key.decode().endswith("s1")]
        raw = aioredis.Redis.from_url(REDIS_URL)
        try:
            assert await raw.hget(record_key, "schema") is not None
            if tamper == "other":
                await raw.hset(record_key, "schema", "999")
            else:
                await raw.hdel(record_key, "schema")
        finally:
            await raw.aclose()

        with pytest.raises(StoreError, match="schema"):
            await store.get("s1")
        with pytest.raises(StoreError, match="schema"):
            await store.get_meta("s1")
        with pytest.raises(StoreError, match="schema"):
            await store.list_meta(None, 10)
        # The other record still reads.
        stored = await store.get("s2")
        assert stored is not None
        assert stored.state == _state(2)
    finally:
        await store.close()


@needs_redis
async def test_redis_stores_share_state_and_events(redis_namespace):
    """Two replicas on the same namespace see each other's writes, locks and events."""
    one = RedisStore(REDIS_URL, redis_namespace, timeout_s=2.0)
    two = RedisStore(REDIS_URL, redis_namespace, timeout_s=2.0)
    received: list[dict[str, object]] = []
    task = asyncio.create_task(_collect(two, 4, received))
    try:
        await asyncio.sleep(0.3)  # let the subscription be established
        assert await one.put("s1", _state(1)) == 1
        assert await two.put("s1", _state(2), expected_revision=1) == 2
        stored = await one.get("s1")
        assert stored is not None
        assert (stored.revision, stored.state) == (2, _state(2))
        token = await one.acquire_lock("adapt", 30)
        assert token is not None
        assert await two.acquire_lock("adapt", 30) is None
        await two.release_lock("adapt", token)
        assert await one.acquire_lock("adapt", 30) is not None

        await asyncio.sleep(0.3)
        await one.publish({"type": "updated", "scenario": "s1", "revision": 2})
        await asyncio.wait_for(task, timeout=5.0)
        assert received == [
            {"type": SUBSCRIBED_EVENT},
            {"type": SCENARIO_EVENT, "scenario": "s1"},  # one's write
            {"type": SCENARIO_EVENT, "scenario": "s1"},  # two's own write
            {"type": "updated", "scenario": "s1", "revision": 2},
        ]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await one.close()
        await two.close()


@needs_redis
async def test_a_dropped_redis_subscription_ends_with_a_store_error(redis_namespace):
    """A subscription whose connection drops does not quietly resume (announcements made
    meanwhile would be lost): it ends with a StoreError, and a new one starts over."""
    store = RedisStore(REDIS_URL, redis_namespace, timeout_s=2.0)
    admin = redis.Redis.from_url(REDIS_URL)
    events = store.events()
    try:
        assert await asyncio.wait_for(anext(events), timeout=5.0) == {"type": SUBSCRIBED_EVENT}
        admin.client_kill_filter(_type="pubsub")
        with pytest.raises(StoreError):
            await asyncio.wait_for(anext(events), timeout=15.0)
        again = store.events()
        try:
            assert await asyncio.wait_for(anext(again), timeout=5.0) == {"type": SUBSCRIBED_EVENT}
        finally:
            await again.aclose()
    finally:
        await events.aclose()
        await store.close()
        admin.close()


@needs_redis
async def test_redis_namespaces_are_isolated(redis_namespace):
    other_namespace = f"test-{uuid4().hex}"
    one = RedisStore(REDIS_URL, redis_namespace, timeout_s=2.0)
    two = RedisStore(REDIS_URL, other_namespace, timeout_s=2.0)
    try:
        await one.put("s1", _state(1))
        assert await two.get("s1") is None
        assert await two.list_meta(None, 10) == []
        assert await two.put("s1", _state(2)) == 1
        meta = await one.get_meta("s1")
        assert meta is not None
        assert (meta["k"], meta["revision"]) == (1, 1)
    finally:
        await one.close()
        await two.close()
        await _drop_namespace(other_namespace)


async def test_the_previous_record_is_kept_one_per_scenario_and_goes_with_it(store):
    assert await store.get_previous("s1") is None
    await store.put("s1", _state(1))
    await store.put_previous("s1", _state(2))
    await store.put_previous("s1", _state(3))  # the last one kept
    assert await store.get_previous("s1") == _state(3)
    assert await store.get_previous("s2") is None
    assert await store.revision("s1") == 1  # the record itself untouched
    assert await store.delete("s1") is True
    assert await store.get_previous("s1") is None
