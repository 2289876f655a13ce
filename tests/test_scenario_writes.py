"""Conditional and idempotent writes, and growing scenarios, on both stores: a scenario's ETag
is its revision; If-Match holds adapt, append and delete to it (412 otherwise, nothing
changed); an identical re-post is answered from the store (`reused`); appending interactions
deduplicates, adapts again and makes a new revision."""

import asyncio

import pytest
from conftest import running, settings_for

from model.artifact import publish
from service import writes as writes_module

pytestmark = pytest.mark.anyio


@pytest.fixture
def settings(registry, backend, namespace):
    return settings_for(registry, backend, namespace, reload_poll_s=60)


def url(scenario, route: str = "adapt") -> str:
    return f"/scenarios/{scenario.scenario_id}/{route}"


def split(scenario, head: int):
    """The scenario's body with its first `head` interactions, and the rest."""
    return scenario.body(interactions=scenario.interactions[:head]), scenario.interactions[head:]


async def test_the_etag_is_the_revision_and_if_match_holds_adapt_to_it(settings, scenario):
    async with running(settings) as (_, client):
        # If-Match on an absent scenario: nothing matches, not even `*`.
        for tag in ('"1"', "*"):
            refused = await client.post(
                url(scenario), json=scenario.body(), headers={"If-Match": tag}
            )
            assert refused.status_code == 412, refused.text
        assert (await client.get("/scenarios")).json()["scenarios"] == []

        first = await client.post(url(scenario), json=scenario.body(seed=1))
        assert first.status_code == 200 and first.headers["ETag"] == '"1"'
        described = await client.get(f"/scenarios/{scenario.scenario_id}")
        assert described.headers["ETag"] == '"1"' and described.json()["revision"] == 1

        stale = await client.post(
            url(scenario), json=scenario.body(seed=2), headers={"If-Match": '"7"'}
        )
        assert stale.status_code == 412
        assert "revision 1" in stale.text
        weak = await client.post(
            url(scenario), json=scenario.body(seed=2), headers={"If-Match": 'W/"1"'}
        )
        assert weak.status_code == 412  # If-Match compares strongly
        assert (await client.get(f"/scenarios/{scenario.scenario_id}")).json()["seed"] == 1

        listed = await client.post(
            url(scenario), json=scenario.body(seed=2), headers={"If-Match": '"5", "1"'}
        )
        assert listed.status_code == 200 and listed.headers["ETag"] == '"2"'
        star = await client.post(
            url(scenario), json=scenario.body(seed=3), headers={"If-Match": "*"}
        )
        assert star.status_code == 200 and star.json()["revision"] == 3


async def test_an_identical_repost_is_reused_and_any_change_adapts_again(settings, scenario):
    async with running(settings) as (_, client):
        first = (await client.post(url(scenario), json=scenario.body())).json()
        assert first["reused"] is False
        # Repeated interactions and candidates count once: still identical.
        doubled = scenario.body(
            interactions=scenario.interactions + scenario.interactions[:3],
            candidates=scenario.candidates + scenario.candidates[:2],
        )
        # 0.0 is the integer 0 as JSON Schema counts it.
        for body in (scenario.body(), doubled, scenario.body(seed=0.0, variant="hybrid")):
            again = await client.post(url(scenario), json=body)
            assert again.status_code == 200 and again.headers["ETag"] == '"1"'
            assert again.json()["reused"] is True
            assert again.json()["train_loss"] == first["train_loss"]
        changes = [
            scenario.body(seed=5),
            scenario.body(variant="interaction"),
            scenario.body(candidates=scenario.candidates[:-1]),
            scenario.body(interactions=scenario.interactions[:-1]),
        ]
        for revision, body in enumerate(changes, start=2):
            changed = (await client.post(url(scenario), json=body)).json()
            assert (changed["revision"], changed["reused"]) == (revision, False)


async def test_a_new_meta_learner_is_not_identical(settings, scenario, artifact):
    async with running(settings) as (app, client):
        await client.post(url(scenario), json=scenario.body())
        publish(artifact, settings.registry)  # v0002
        await app.state.lifecycle.refresh()
        again = (await client.post(url(scenario), json=scenario.body())).json()
        assert again["meta_learner"] == "v0002"
        assert again["reused"] is False and again["revision"] >= 2


async def test_if_match_holds_delete(settings, scenario):
    async with running(settings) as (_, client):
        await client.post(url(scenario), json=scenario.body())
        path = f"/scenarios/{scenario.scenario_id}"
        assert (await client.delete(path, headers={"If-Match": '"2"'})).status_code == 412
        assert (await client.get(path)).status_code == 200
        assert (await client.delete(path, headers={"If-Match": '"1"'})).status_code == 204
        assert (await client.get(path)).status_code == 404
        assert (await client.delete(path, headers={"If-Match": "*"})).status_code == 404


async def test_a_write_landing_during_a_conditional_adapt_is_not_overwritten(
    settings, scenario, monkeypatch
):
    """If-Match is checked again atomically when the result is stored: another write that
    lands while this one adapts wins, and this one is 412."""
    real = writes_module.adapt_registration
    async with running(settings) as (app, client):
        await client.post(url(scenario), json=scenario.body())

        def racing(*args, **kwargs):
            state = real(*args, **kwargs)
            asyncio.run_coroutine_threadsafe(
                app.state.service.store.put(scenario.scenario_id, state), loop
            ).result()
            return state

        loop = asyncio.get_running_loop()
        monkeypatch.setattr(writes_module, "adapt_registration", racing)
        raced = await client.post(
            url(scenario), json=scenario.body(seed=4), headers={"If-Match": '"1"'}
        )
        assert raced.status_code == 412, raced.text
        assert (await client.get(f"/scenarios/{scenario.scenario_id}")).json()["revision"] == 2


async def test_appended_interactions_make_a_new_revision_adapted_on_them_all(settings, scenario):
    head, rest = split(scenario, 40)
    async with running(settings) as (_, client):
        first = (await client.post(url(scenario), json={**head, "seed": 3})).json()
        # Half already registered: counted once.
        appended = await client.post(
            url(scenario, "interactions"), json={"interactions": head["interactions"][:20] + rest}
        )
        assert appended.status_code == 200, appended.text
        grown = appended.json()
        assert (grown["revision"], grown["reused"]) == (first["revision"] + 1, False)
        assert appended.headers["ETag"] == f'"{grown["revision"]}"'
        detail = (await client.get(f"/scenarios/{scenario.scenario_id}")).json()
        assert detail["counts"]["registered_interactions"] == len(scenario.interactions)
        assert detail["seed"] == 3 and detail["variant"] == first["variant"]
        # The same as registering everything at once with the same seed and variant.
        whole = (await client.post(url(scenario), json=scenario.body(seed=3))).json()
        assert whole["reused"] is True and whole["revision"] == grown["revision"]

        nothing_new = await client.post(url(scenario, "interactions"), json={"interactions": rest})
        assert nothing_new.json()["reused"] is True
        assert nothing_new.json()["revision"] == grown["revision"]


async def test_append_refusals_change_nothing(settings, scenario):
    head, rest = split(scenario, 40)
    async with running(settings) as (_, client):
        unknown = await client.post("/scenarios/nope/interactions", json={"interactions": rest})
        assert unknown.status_code == 404
        await client.post(url(scenario), json=head)
        outside = await client.post(
            url(scenario, "interactions"),
            json={"interactions": [*rest, {"user": rest[0]["user"], "item": "not-in-the-pool"}]},
        )
        assert outside.status_code == 422 and "not among the candidates" in outside.text
        stale = await client.post(
            url(scenario, "interactions"), json={"interactions": rest}, headers={"If-Match": '"9"'}
        )
        assert stale.status_code == 412
        empty = await client.post(url(scenario, "interactions"), json={"interactions": []})
        assert empty.status_code == 422
        detail = (await client.get(f"/scenarios/{scenario.scenario_id}")).json()
        assert detail["revision"] == 1 and detail["counts"]["registered_interactions"] == 40
        matched = await client.post(
            url(scenario, "interactions"), json={"interactions": rest}, headers={"If-Match": '"1"'}
        )
        assert matched.status_code == 200 and matched.json()["revision"] == 2


async def test_append_over_the_interaction_limit_is_422(registry, scenario):
    settings = settings_for(registry, "memory", "s", max_interactions=50, reload_poll_s=60)
    head, rest = split(scenario, 40)
    async with running(settings) as (_, client):
        await client.post(url(scenario), json=head)
        over = await client.post(url(scenario, "interactions"), json={"interactions": rest})
        assert over.status_code == 422 and "at most 50" in over.text
        assert (await client.get(f"/scenarios/{scenario.scenario_id}")).json()["revision"] == 1
