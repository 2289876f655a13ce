"""Canary by pinning and rollback without re-adapting, in process on both stores: a scenario
adapted with a named version stays on it through promotions until re-posted without one; a
scenario going back to a meta learner it was adapted with gets that record back instead of
adapting again; the recommend and adapt metrics carry the version that served."""

import os

import pytest
from conftest import running, settings_for

from model.artifact import CURRENT, publish

pytestmark = pytest.mark.anyio


def point_current_at(registry, version: str) -> None:
    """What promoting or rolling back does to the registry (atomically)."""
    pointer = registry / ".current.test"
    pointer.write_text(version + "\n")
    os.replace(pointer, registry / CURRENT)


@pytest.fixture
def settings(registry, backend, namespace):
    # Polling far apart: each test moves the lifecycle on by hand.
    return settings_for(registry, backend, namespace, reload_poll_s=600)


async def switch(app) -> None:
    """One round of the lifecycle: load the registry's current version, re-adapt."""
    lifecycle = app.state.lifecycle
    await lifecycle.refresh()
    await lifecycle.readapt_stale(app.state.service.learners.current)


async def test_a_pinned_scenario_stays_on_its_version_until_reposted(
    settings, registry, artifact, scenario
):
    publish(artifact, registry)  # v0002, current
    async with running(settings) as (app, client):
        canary = await client.post(
            "/scenarios/canary/adapt", json=scenario.body(meta_learner="v0001")
        )
        assert canary.status_code == 200, canary.text
        assert (canary.json()["meta_learner"], canary.json()["pinned"]) == ("v0001", True)
        await client.post("/scenarios/plain/adapt", json=scenario.body())
        unknown = await client.post("/scenarios/x/adapt", json=scenario.body(meta_learner="v0099"))
        assert unknown.status_code == 422 and "v0099 is not in the registry" in unknown.text

        publish(artifact, registry)  # v0003
        await switch(app)
        listed = {s["scenario"]: s for s in (await client.get("/scenarios")).json()["scenarios"]}
        assert listed["canary"]["meta_learner"] == "v0001" and listed["canary"]["revision"] == 1
        assert listed["canary"]["status"] == "ready" and listed["canary"]["pinned"]
        assert listed["plain"]["meta_learner"] == "v0003"
        params = {"user": scenario.eval_user, "scenario": "canary"}
        assert (await client.get("/recommend", params=params)).json()["meta_learner"] == "v0001"
        params = {"user": scenario.eval_user, "scenario": "plain"}
        assert (await client.get("/recommend", params=params)).json()["meta_learner"] == "v0003"

        # Growing a pinned scenario keeps its version.
        extra = {"interactions": [{"user": scenario.eval_user, "item": scenario.candidates[-1]}]}
        grown = (await client.post("/scenarios/canary/interactions", json=extra)).json()
        assert (grown["meta_learner"], grown["pinned"], grown["revision"]) == ("v0001", True, 2)

        # Re-posted without a version: the current one, and it follows promotions again.
        body = scenario.body(interactions=[*scenario.interactions, *extra["interactions"]])
        unpinned = (await client.post("/scenarios/canary/adapt", json=body)).json()
        assert (unpinned["meta_learner"], unpinned["pinned"], unpinned["reused"]) == (
            "v0003",
            False,
            False,
        )
        metrics = app.state.metrics.registry.get_sample_value
        for version in ("v0001", "v0003"):
            assert metrics("s2meta_recommend_seconds_count", {"meta_learner": version}) is not None
            assert metrics(
                "s2meta_adaptation_seconds_count",
                {"trigger": "request", "meta_learner": version},
            )


async def test_going_back_to_a_version_reuses_its_records(settings, registry, artifact, scenario):
    async with running(settings) as (app, client):
        first = {}
        for name in ("a", "b"):
            adapted = await client.post(f"/scenarios/{name}/adapt", json=scenario.body(seed=3))
            first[name] = adapted.json()
        publish(artifact, registry)  # v0002
        await switch(app)
        sample = app.state.metrics.registry.get_sample_value
        assert sample("s2meta_readaptations_total", {"how": "adapted"}) == 2
        on_v2 = (await client.get("/scenarios/a")).json()
        assert (on_v2["meta_learner"], on_v2["revision"]) == ("v0002", 2)

        point_current_at(registry, "v0001")  # a rollback
        await switch(app)
        assert sample("s2meta_readaptations_total", {"how": "reused"}) == 2
        assert sample("s2meta_readaptations_total", {"how": "adapted"}) == 2  # none more
        reload_v1 = {"trigger": "reload", "meta_learner": "v0001"}
        assert sample("s2meta_adaptation_seconds_count", reload_v1) is None  # nothing adapted
        for name in ("a", "b"):
            back = (await client.get(f"/scenarios/{name}")).json()
            assert (back["meta_learner"], back["revision"]) == ("v0001", 3)
            assert back["train_loss"] == first[name]["train_loss"]  # the very record
            params = {"user": scenario.eval_user, "scenario": name}
            served = (await client.get("/recommend", params=params)).json()
            assert (served["meta_learner"], served["revision"]) == ("v0001", 3)

        # And forward again: the v0002 records come back the same way.
        point_current_at(registry, "v0002")
        await switch(app)
        assert sample("s2meta_readaptations_total", {"how": "reused"}) == 4
        assert (await client.get("/scenarios/a")).json()["meta_learner"] == "v0002"


async def test_a_changed_registration_is_adapted_not_reused(settings, registry, artifact, scenario):
    async with running(settings) as (app, client):
        await client.post("/scenarios/a/adapt", json=scenario.body(seed=3))
        publish(artifact, registry)  # v0002
        await switch(app)
        # Grown on v0002: the v0001 record no longer matches its interactions.
        extra = {"interactions": [{"user": scenario.eval_user, "item": scenario.candidates[-1]}]}
        await client.post("/scenarios/a/interactions", json=extra)
        point_current_at(registry, "v0001")
        await switch(app)
        sample = app.state.metrics.registry.get_sample_value
        assert sample("s2meta_readaptations_total", {"how": "reused"}) is None
        assert sample("s2meta_readaptations_total", {"how": "adapted"}) == 2
        back = (await client.get("/scenarios/a")).json()
        assert back["meta_learner"] == "v0001"
        assert back["counts"]["registered_interactions"] == len(scenario.interactions) + 1
