"""Scenario state in Redis, shared by replicas: each write an atomic Lua script that also
announces it on the events channel."""

import json
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import redis.asyncio as aioredis
from pydantic import SecretStr
from redis.exceptions import RedisError

from model.artifact import events_channel
from service.errors import StoreError
from service.store.protocol import (
    SUBSCRIBED_EVENT,
    ScenarioState,
    StoredScenario,
    with_ids,
)

SCHEMA = "1"  # the stored record's layout; bumped when it changes

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
# KEYS: record hash, index, previous record; ARGV: scenario id, events channel, expected
# revision ("" for any). Returns 1 when deleted, 0 when absent, -1 on a mismatch.
_DELETE = """
local current = redis.call('HGET', KEYS[1], 'revision')
if not current then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return 0
end
if ARGV[3] ~= '' and current ~= ARGV[3] then return -1 end
redis.call('DEL', KEYS[1], KEYS[3])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('PUBLISH', ARGV[2], cjson.encode({type = 'scenario', scenario = ARGV[1]}))
return 1
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisStore:
    """Scenario state in Redis, shared by every replica pointed at the same URL and
    namespace. Any Redis failure surfaces as StoreError."""

    def __init__(
        self,
        url: str,
        namespace: str,
        timeout_s: float = 5.0,
        *,
        password: SecretStr | None = None,
        tls_ca_file: Path | None = None,
    ) -> None:
        # Only a rediss:// connection takes ssl_ca_certs; a plain one rejects the keyword.
        tls = {} if tls_ca_file is None else {"ssl_ca_certs": str(tls_ca_file)}
        self._redis = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            password=None if password is None else password.get_secret_value(),
            **tls,
        )
        self._ns = namespace
        self._put = self._redis.register_script(_PUT)
        self._delete = self._redis.register_script(_DELETE)
        self._release = self._redis.register_script(_RELEASE)

    def _record_key(self, scenario_id: str) -> str:
        return f"{self._ns}:scenario:{scenario_id}"

    def _previous_key(self, scenario_id: str) -> str:
        return f"{self._ns}:previous:{scenario_id}"

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
        fields = _fields(state)
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
        return StoredScenario(int(raw[b"revision"]), _state(scenario_id, raw))

    async def put_previous(self, scenario_id: str, state: ScenarioState) -> None:
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(self._previous_key(scenario_id))
                fields = _fields(state)
                mapping = dict(zip(fields[::2], fields[1::2], strict=True))
                pipe.hset(self._previous_key(scenario_id), mapping=mapping)  # type: ignore[arg-type]
                await pipe.execute()
        except RedisError as error:
            raise StoreError(f"redis: {error}") from error

    async def get_previous(self, scenario_id: str) -> ScenarioState | None:
        try:
            raw = await self._redis.hgetall(self._previous_key(scenario_id))
        except RedisError as error:
            raise StoreError(f"redis: {error}") from error
        return _state(scenario_id, raw) if raw else None

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
        return with_ids(scenario_id, int(revision), json.loads(meta))

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
            listed.append(with_ids(scenario_id, int(revision), json.loads(meta)))
        return listed

    async def delete(self, scenario_id: str, expected_revision: int | None = None) -> bool | None:
        expected = "" if expected_revision is None else str(expected_revision)
        try:
            outcome = int(
                await self._delete(
                    keys=[
                        self._record_key(scenario_id),
                        self._index_key,
                        self._previous_key(scenario_id),
                    ],
                    args=[scenario_id, self._channel, expected],
                )
            )
        except RedisError as error:
            raise StoreError(f"redis: {error}") from error
        return None if outcome < 0 else bool(outcome)

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


def _fields(state: ScenarioState) -> list[str | bytes]:
    """A record's hash fields and values, in turn (the revision aside)."""
    return [
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


def _state(scenario_id: str, raw: dict[bytes, bytes]) -> ScenarioState:
    _check_schema(scenario_id, raw.get(b"schema"))
    return ScenarioState(
        meta=json.loads(raw[b"meta"]),
        params=raw[b"params"],
        candidates=json.loads(raw[b"candidates"]),
        interactions=[(u, i) for u, i in json.loads(raw[b"interactions"])],
        popularity=[(i, c) for i, c in json.loads(raw[b"popularity"])],
    )


def _check_schema(scenario_id: str, schema: bytes | None) -> None:
    if schema is None or schema.decode() != SCHEMA:
        raise StoreError(
            f"scenario {scenario_id!r}: stored record schema {schema!r}, this code reads {SCHEMA}"
        )
