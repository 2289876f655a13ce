"""Scenario state shared by replicas: a Redis store, and an in-process store with the same
behaviour for running without Redis. The same contract tests run against both.

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

import asyncio
import copy
import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from model.artifact import events_channel

SCHEMA = "1"  # the stored record's layout; bumped when it changes
SUBSCRIBED_EVENT = "subscribed"  # first event of a subscription, once it is live
SCENARIO_EVENT = "scenario"  # a scenario was written or deleted


class StoreError(Exception):
    """The store cannot answer (unreachable, or holds a record this code cannot read)."""


@dataclass(frozen=True)
class ScenarioState:
    meta: dict[str, object]  # JSON: meta learner, variant, trace, counts, ...
    params: bytes  # safetensors: the adapted flat parameters
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

    async def delete(self, scenario_id: str) -> bool: ...

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


def _with_ids(scenario_id: str, revision: int, meta: dict[str, object]) -> dict[str, object]:
    return {**copy.deepcopy(meta), "scenario": scenario_id, "revision": revision}


class MemoryStore:
    """The in-process store: one replica, state lost at exit. Every method runs without an
    await inside, so on the event loop each is atomic like its Redis counterpart. It keeps
    copies, so a caller changing what it wrote or read cannot change a stored revision."""

    def __init__(self) -> None:
        self._records: dict[str, StoredScenario] = {}
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
        return _with_ids(scenario_id, record.revision, record.state.meta) if record else None

    async def list_meta(self, after: str | None, limit: int) -> list[dict[str, object]]:
        ids = sorted(i for i in self._records if after is None or i > after)[:limit]
        return [_with_ids(i, self._records[i].revision, self._records[i].state.meta) for i in ids]

    async def delete(self, scenario_id: str) -> bool:
        existed = self._records.pop(scenario_id, None) is not None
        if existed:
            self._announce(scenario_id)
        return existed

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


# KEYS: record hash, revision counter, index; ARGV: expected revision ("" for any), scenario
# id, events channel, then the record's field/value pairs. Returns the new revision, or -1 on
# a mismatch. The announcement is part of the atomic step.
_PUT = """
local current = redis.call('HGET', KEYS[1], 'revision') or '0'
if ARGV[1] ~= '' and current ~= ARGV[1] then return -1 end
local revision = redis.call('INCR', KEYS[2])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'revision', revision, unpack(ARGV, 4))
redis.call('ZADD', KEYS[3], 0, ARGV[2])
redis.call('PUBLISH', ARGV[3], cjson.encode({type = 'scenario', scenario = ARGV[2]}))
return revision
"""
# KEYS: record hash, index; ARGV: scenario id, events channel.
_DELETE = """
local existed = redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if existed == 1 then
  redis.call('PUBLISH', ARGV[2], cjson.encode({type = 'scenario', scenario = ARGV[1]}))
end
return existed
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisStore:
    """Scenario state in Redis, shared by every replica pointed at the same URL and
    namespace. Any Redis failure surfaces as StoreError."""

    def __init__(self, url: str, namespace: str, timeout_s: float = 5.0) -> None:
        self._redis = aioredis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self._ns = namespace
        self._put = self._redis.register_script(_PUT)
        self._delete = self._redis.register_script(_DELETE)
        self._release = self._redis.register_script(_RELEASE)

    def _record_key(self, scenario_id: str) -> str:
        return f"{self._ns}:scenario:{scenario_id}"

    def _revision_key(self, scenario_id: str) -> str:
        return f"{self._ns}:revision:{scenario_id}"

    @property
    def _index_key(self) -> str:
        return f"{self._ns}:scenarios"

    @property
    def _channel(self) -> str:
        return events_channel(self._ns)

    async def ping(self) -> None:
        try:
            await self._redis.ping()
        except RedisError as error:
            raise StoreError(f"redis: {error}") from error

    async def put(
        self, scenario_id: str, state: ScenarioState, expected_revision: int | None = None
    ) -> int | None:
        fields: list[str | bytes] = [
            "schema",
            SCHEMA,
            "meta",
            json.dumps(state.meta),
            "params",
            state.params,
            "candidates",
            json.dumps(state.candidates),
            "interactions",
            json.dumps(state.interactions),
            "popularity",
            json.dumps(state.popularity),
        ]
        expected = "" if expected_revision is None else str(expected_revision)
        keys = [self._record_key(scenario_id), self._revision_key(scenario_id), self._index_key]
        try:
            revision = await self._put(
                keys=keys, args=[expected, scenario_id, self._channel, *fields]
            )
        except RedisError as error:
            raise StoreError(f"redis: {error}") from error
        return None if int(revision) < 0 else int(revision)

    async def revision(self, scenario_id: str) -> int | None:
        try:
            value = await self._redis.hget(self._record_key(scenario_id), "revision")
        except RedisError as error:
            raise StoreError(f"redis: {error}") from error
        return None if value is None else int(value)

    async def get(self, scenario_id: str) -> StoredScenario | None:
        try:
            raw = await self._redis.hgetall(self._record_key(scenario_id))
        except RedisError as error:
            raise StoreError(f"redis: {error}") from error
        if not raw:
            return None
        _check_schema(scenario_id, raw.get(b"schema"))
        state = ScenarioState(
            meta=json.loads(raw[b"meta"]),
            params=raw[b"params"],
            candidates=json.loads(raw[b"candidates"]),
            interactions=[(u, i) for u, i in json.loads(raw[b"interactions"])],
            popularity=[(i, c) for i, c in json.loads(raw[b"popularity"])],
        )
        return StoredScenario(int(raw[b"revision"]), state)

    async def get_meta(self, scenario_id: str) -> dict[str, object] | None:
        try:
            revision, schema, meta = await self._redis.hmget(
                self._record_key(scenario_id), ["revision", "schema", "meta"]
            )
        except RedisError as error:
            raise StoreError(f"redis: {error}") from error
        if revision is None:
            return None
        _check_schema(scenario_id, schema)
        return _with_ids(scenario_id, int(revision), json.loads(meta))

    async def list_meta(self, after: str | None, limit: int) -> list[dict[str, object]]:
        start = "-" if after is None else f"({after}"
        try:
            ids = await self._redis.zrangebylex(self._index_key, start, "+", start=0, num=limit)
            async with self._redis.pipeline(transaction=False) as pipe:
                for raw_id in ids:
                    pipe.hmget(self._record_key(raw_id.decode()), ["revision", "schema", "meta"])
                rows = await pipe.execute()
        except RedisError as error:
            raise StoreError(f"redis: {error}") from error
        listed = []
        for raw_id, (revision, schema, meta) in zip(ids, rows, strict=True):
            if revision is None:  # deleted between the two reads
                continue
            scenario_id = raw_id.decode()
            _check_schema(scenario_id, schema)
            listed.append(_with_ids(scenario_id, int(revision), json.loads(meta)))
        return listed

    async def delete(self, scenario_id: str) -> bool:
        try:
            existed = await self._delete(
                keys=[self._record_key(scenario_id), self._index_key],
                args=[scenario_id, self._channel],
            )
        except RedisError as error:
            raise StoreError(f"redis: {error}") from error
        return bool(existed)

    async def acquire_lock(self, name: str, ttl_s: int) -> str | None:
        token = secrets.token_hex(16)
        try:
            taken = await self._redis.set(f"{self._ns}:lock:{name}", token, nx=True, ex=ttl_s)
        except RedisError as error:
            raise StoreError(f"redis: {error}") from error
        return token if taken else None

    async def release_lock(self, name: str, token: str) -> None:
        try:
            await self._release(keys=[f"{self._ns}:lock:{name}"], args=[token])
        except RedisError as error:
            raise StoreError(f"redis: {error}") from error

    async def publish(self, event: dict[str, object]) -> None:
        try:
            await self._redis.publish(self._channel, json.dumps(event))
        except RedisError as error:
            raise StoreError(f"redis: {error}") from error

    async def events(self) -> AsyncIterator[dict[str, object]]:
        pubsub = self._redis.pubsub()
        try:
            await pubsub.subscribe(self._channel)
            # Live once Redis confirms: every write it runs after that is announced here.
            confirmed = None
            while confirmed is None or confirmed["type"] != "subscribe":
                confirmed = await pubsub.get_message(timeout=1.0)
            yield {"type": SUBSCRIBED_EVENT}
            while True:
                # Short reads, so the connection's socket timeout never fires while idle.
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is not None and message["type"] == "message":
                    yield json.loads(message["data"])
        except RedisError as error:
            raise StoreError(f"redis: {error}") from error
        finally:
            await pubsub.aclose()

    async def close(self) -> None:
        await self._redis.aclose()


def _check_schema(scenario_id: str, schema: bytes | None) -> None:
    if schema is None or schema.decode() != SCHEMA:
        raise StoreError(
            f"scenario {scenario_id!r}: stored record schema {schema!r}, this code reads {SCHEMA}"
        )


def open_store(redis_url: str | None, namespace: str, timeout_s: float = 5.0) -> ScenarioStore:
    return RedisStore(redis_url, namespace, timeout_s) if redis_url else MemoryStore()
