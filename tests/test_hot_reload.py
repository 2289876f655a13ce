"""Hot reload of newly published meta learners: polling and Redis notification, each
scenario re-adapted once across replicas and switched atomically, old versions kept while
needed, corrupt versions refused."""

import asyncio
import contextlib
import json
import logging
import threading

import pytest
import redis
from conftest import REDIS_URL, needs_redis, running

from model.artifact import PUBLISHED_EVENT, events_channel, publish
from service import lifecycle as lifecycle_module
from service.settings import Settings

pytestmark = pytest.mark.anyio


async def wait_for(condition, timeout_s: float = 30.0, what: str = "condition") -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def held_first_call(monkeypatch) -> threading.Event:
    """Hold the first batch of re-adaptations until the returned event is set; later ones
    (and adaptations a client asks for) run freely."""
    release = threading.Event()
    real = lifecycle_module.adapt_registrations
    calls = []

    def adaptation(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            release.wait(timeout=60)
        return real(*args, **kwargs)

    monkeypatch.setattr(lifecycle_module, "adapt_registrations", adaptation)
    return release


async def test_polling_reload_serves_old_revision_until_readapted(
    artifact, registry, scenario, monkeypatch
):
    settings = Settings(registry=registry, reload_poll_s=0.1, adapt_workers=2)
    params = {"user": scenario.eval_user, "scenario": scenario.scenario_id}
    async with running(settings) as (app, client):
        service = app.state.service
        await client.post(f"/scenarios/{scenario.scenario_id}/adapt", json=scenario.body())
        release = held_first_call(monkeypatch)
        publish(artifact, registry)  # v0002, found by polling

        async def switched() -> bool:
            current = service.learners.current
            return current is not None and current.version == "v0002"

        await wait_for(switched, what="v0002 loaded")
        # Re-adaptation is held: the scenario still serves revision 1 from v0001.
        await asyncio.sleep(0.3)
        detail = (await client.get(f"/scenarios/{scenario.scenario_id}")).json()
        assert detail["status"] == "readapting" and detail["meta_learner"] == "v0001"
        served = (await client.get("/recommend", params=params)).json()
        assert (served["revision"], served["meta_learner"]) == (1, "v0001")
        assert service.learners.loaded_versions == ["v0001", "v0002"]
        assert "s2meta_readapt_backlog 1.0" in (await client.get("/metrics")).text
        release.set()

        async def readapted() -> bool:
            meta = await service.store.get_meta(scenario.scenario_id)
            return meta["meta_learner"] == "v0002"

        await wait_for(readapted, what="re-adaptation")
        served = (await client.get("/recommend", params=params)).json()
        assert (served["revision"], served["meta_learner"]) == (2, "v0002")
        detail = (await client.get(f"/scenarios/{scenario.scenario_id}")).json()
        assert detail["status"] == "ready"

        async def unloaded() -> bool:
            return service.learners.loaded_versions == ["v0002"]

        await wait_for(unloaded, what="v0001 unloaded")
        metrics = (await client.get("/metrics")).text
        assert "s2meta_readapt_backlog 0.0" in metrics
        assert 's2meta_meta_learner_loaded{version="v0002"} 1.0' in metrics
        assert 'version="v0001"' not in metrics  # the replaced version is dropped


async def test_readaptation_batches_run_side_by_side_beside_requests(
    artifact, registry, scenario, monkeypatch
):
    # Two cores at one thread per batch: two batches at once, in a pool of their own, so a
    # request is neither queued behind them nor refused (one worker, no queue).
    monkeypatch.setattr("service.writes.os.cpu_count", lambda: 2)
    settings = Settings(
        registry=registry,
        reload_poll_s=0.1,
        readapt_batch=1,
        readapt_threads=1,
        adapt_workers=1,
        adapt_queue=0,
    )
    both_running = threading.Barrier(2, timeout=30)
    release = threading.Event()
    threads: list[str] = []
    real = lifecycle_module.adapt_registrations

    def adaptation(*args, **kwargs):
        threads.append(threading.current_thread().name)
        if len(threads) <= 2:
            both_running.wait()  # broken, and the re-adaptation fails, if run one at a time
            release.wait(timeout=60)
        return real(*args, **kwargs)

    async with running(settings) as (_, client):
        for name in ("a", "b", "c"):
            await client.post(f"/scenarios/{name}/adapt", json=scenario.body())
        monkeypatch.setattr(lifecycle_module, "adapt_registrations", adaptation)
        publish(artifact, registry)

        async def two_running() -> bool:
            return len(threads) == 2

        await wait_for(two_running, what="two batches re-adapting")
        answer = await client.post("/scenarios/d/adapt", json=scenario.body())
        assert answer.status_code == 200 and answer.json()["meta_learner"] == "v0002"
        release.set()

        async def all_readapted() -> bool:
            page = (await client.get("/scenarios")).json()["scenarios"]
            return all(s["meta_learner"] == "v0002" for s in page)

        await wait_for(all_readapted, what="every scenario re-adapted")
    assert len(threads) == 3 and len(set(threads[:2])) == 2
    assert all(name.startswith("readapt") for name in threads)


async def test_stale_scenarios_are_readapted_in_batches(artifact, registry, scenario):
    settings = Settings(registry=registry, reload_poll_s=0.1, readapt_batch=2)
    async with running(settings) as (app, client):
        for name in ("a", "b", "c"):
            await client.post(f"/scenarios/{name}/adapt", json=scenario.body())
        publish(artifact, registry)

        async def all_readapted() -> bool:
            page = (await client.get("/scenarios")).json()["scenarios"]
            return all(s["meta_learner"] == "v0002" for s in page)

        await wait_for(all_readapted, what="every scenario re-adapted")
        page = (await client.get("/scenarios")).json()["scenarios"]
        assert [s["revision"] for s in page] == [2, 2, 2]
        sample = app.state.metrics.registry.get_sample_value
        reload = {"trigger": "reload", "meta_learner": "v0002"}
        assert sample("s2meta_adaptation_seconds_count", reload) == 2  # 2 + 1
        assert sample("s2meta_readaptations_total", {"how": "adapted"}) == 3


async def test_a_newer_client_revision_wins_over_a_late_readaptation(
    artifact, registry, scenario, monkeypatch
):
    settings = Settings(registry=registry, reload_poll_s=0.1, adapt_workers=2)
    async with running(settings) as (app, client):
        service = app.state.service
        url = f"/scenarios/{scenario.scenario_id}/adapt"
        await client.post(url, json=scenario.body())
        release = held_first_call(monkeypatch)
        publish(artifact, registry)

        async def readapting() -> bool:
            return service.writes.in_flight == 1

        await wait_for(readapting, what="the re-adaptation to start")
        reposted = await client.post(url, json=scenario.body(variant="mapping"))
        assert reposted.json()["revision"] == 2 and reposted.json()["meta_learner"] == "v0002"
        release.set()

        async def idle() -> bool:
            return service.writes.in_flight == 0

        await wait_for(idle, what="the re-adaptation to finish")
        await asyncio.sleep(0.3)
        detail = (await client.get(f"/scenarios/{scenario.scenario_id}")).json()
        assert (detail["revision"], detail["variant"]) == (2, "mapping")  # not overwritten


@needs_redis
async def test_redis_notification_reloads_every_replica_and_readapts_once(
    artifact, registry, scenario, namespace
):
    # Polling effectively off: only the published notification can trigger the reload.
    settings = Settings(
        registry=registry, redis_url=REDIS_URL, namespace=namespace, reload_poll_s=3600
    )
    client_redis = redis.Redis.from_url(REDIS_URL)
    async with running(settings) as (first_app, first), running(settings) as (second_app, second):
        for name in ("s1", "s2", "s3"):
            await first.post(f"/scenarios/{name}/adapt", json=scenario.body())

        async def subscribed() -> bool:
            counts = dict(client_redis.pubsub_numsub(events_channel(namespace)))
            return counts.get(events_channel(namespace).encode(), 0) >= 2

        await wait_for(subscribed, what="both replicas subscribed")
        # What `s2meta publish --notify` does (tests/test_s2meta_command.py checks it says so).
        version = publish(artifact, registry)
        event = json.dumps({"type": PUBLISHED_EVENT, "version": version})
        client_redis.publish(events_channel(namespace), event)

        async def all_readapted() -> bool:
            versions = [
                app.state.service.learners.current.version for app in (first_app, second_app)
            ]
            page = (await second.get("/scenarios")).json()["scenarios"]
            return versions == ["v0002", "v0002"] and all(
                s["meta_learner"] == "v0002" for s in page
            )

        await wait_for(all_readapted, what="both replicas on v0002, every scenario re-adapted")
        page = (await first.get("/scenarios")).json()["scenarios"]
        assert [s["revision"] for s in page] == [2, 2, 2]  # each re-adapted exactly once
        readapted = [
            app.state.metrics.registry.get_sample_value(
                "s2meta_readaptations_total", {"how": "adapted"}
            )
            or 0.0
            for app in (first_app, second_app)
        ]
        assert sum(readapted) == 3  # across both replicas, once per scenario
    client_redis.close()


async def test_a_corrupt_version_is_refused_and_the_service_stays(
    artifact, registry, scenario, caplog
):
    settings = Settings(registry=registry, reload_poll_s=3600)
    async with running(settings) as (app, client):
        service = app.state.service
        publish(artifact, registry)
        blob = registry / "versions" / "v0002" / "embeddings.safetensors"
        blob.write_bytes(blob.read_bytes()[:-4] + b"\0\0\0\0")
        with caplog.at_level(logging.ERROR, logger="service.learners"):
            assert await app.state.lifecycle.refresh() is None
        assert "refusing meta learner v0002" in caplog.text and "sha256" in caplog.text
        assert service.learners.current.version == "v0001"
        assert (await client.get("/readyz")).json()["meta_learner"] == "v0001"
        response = await client.post("/scenarios/x/adapt", json=scenario.body())
        assert response.json()["meta_learner"] == "v0001"
        publish(artifact, registry)
        assert await app.state.lifecycle.refresh() == "v0003"


async def test_shutdown_outlasts_a_swallowed_cancellation(registry):
    """A background task whose first cancellation is swallowed (as redis-py can, inside a
    command) does not hold the shutdown for a poll interval: it is cancelled again."""

    async def stubborn() -> None:
        with contextlib.suppress(asyncio.CancelledError):  # swallowed, as a library might
            await asyncio.sleep(600)
        await asyncio.sleep(600)

    loop = asyncio.get_running_loop()
    async with running(Settings(registry=registry, reload_poll_s=600)) as (app, _):
        task = asyncio.create_task(stubborn())
        await asyncio.sleep(0)
        app.state.lifecycle._tasks.append(task)
        start = loop.time()
    assert task.cancelled()
    assert loop.time() - start < 5
