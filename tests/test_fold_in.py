"""Fold-in: the one-row ALS solve (model/fold_in.py), adaptation on
scenario-local tables, and the service path: candidates and users the meta learner lacks
are folded in from the scenario's interactions, stored with the record and served.
tests/test_fold_in_implicit.py holds the solve equal to implicit's own."""

import dataclasses

import numpy as np
import pytest
import torch
from conftest import REDIS_URL, running
from safetensors.torch import load
from synthetic import synthetic_artifact
from test_hot_reload import wait_for

from model import fold_in as fold_in_module
from model.artifact import load_artifact, publish, save_artifact
from model.fold_in import FoldInSettings, fold_in, fold_in_settings, gram, local_tables
from model.inner_loss import Tables
from model.scenario import ScenarioInput, adapt_scenarios
from service.settings import Settings

pytestmark = pytest.mark.anyio

SETTINGS = FoldInSettings(regularization=0.5, alpha=20.0, defaulted=False)


def test_fold_in_solves_the_als_row_problem():
    """The solve minimises ALS's loss for one row, written out: confidence alpha * r on the
    interacted rows (preference 1), 1 on every other row (preference 0), plus lambda |x|^2."""
    rng = np.random.default_rng(0)
    table = rng.normal(size=(50, 6))
    rows = np.array([3, 7, 7, 20])[[0, 1, 3]]
    r = np.array([1.0, 2.0, 1.0])
    x = (
        fold_in(
            gram(torch.as_tensor(table, dtype=torch.float32)),
            [torch.as_tensor(table[rows], dtype=torch.float32)],
            SETTINGS,
            [torch.as_tensor(r)],
        )[0]
        .double()
        .numpy()
    )
    confidence, preference = np.ones(len(table)), np.zeros(len(table))
    confidence[rows], preference[rows] = SETTINGS.alpha * r, 1.0
    gradient = 2 * table.T @ (confidence * (table @ x - preference)) + 2 * 0.5 * x
    assert np.abs(gradient).max() < 1e-3 * np.abs(table.T @ (confidence * preference)).max()
    # Each interaction pulls x towards its row's vector.
    assert (table[rows] @ x > 0).all()


def test_fold_in_of_no_interaction_is_the_zero_vector():
    table = torch.randn(30, 4)
    folded = fold_in(gram(table), [table[[1, 2]], table[:0]], SETTINGS)
    assert folded.shape == (2, 4)
    assert folded[0].abs().sum() > 0 and (folded[1] == 0).all()


def test_fold_in_without_regularisation_on_a_rank_deficient_table_is_least_squares():
    table = torch.randn(30, 4, dtype=torch.float64)
    table[:, 3] = 0  # no vector has a fourth component: Y^T Y is singular
    settings = FoldInSettings(regularization=0.0, alpha=5.0, defaulted=False)
    folded = fold_in(gram(table), [table[[1, 2, 7]]], settings)
    y = table[[1, 2, 7]]
    lhs = gram(table) + y.T @ ((settings.alpha - 1.0) * y)
    expected = torch.linalg.pinv(lhs) @ (y.T @ torch.full((3,), settings.alpha).double())
    assert torch.isfinite(folded).all() and folded[0, 3] == 0
    torch.testing.assert_close(folded[0].double(), expected, rtol=1e-4, atol=1e-5)


def test_fold_in_of_many_rows_solves_only_the_touched_a_chunk_at_a_time(monkeypatch):
    """A pool may hold a million new candidates (S2META_MAX_CANDIDATES): one [D, D] system
    each would take 32 GB at 64 dims. Untouched rows are zero without a solve, and the others
    are solved in chunks, to the same vectors, whatever the chunks of their interactions."""
    table = torch.randn(30, 4)
    counterparts = [table[:0]] * 5000 + [table[[k % 30, (k + 1) % 30]] for k in range(300)]
    alone = [fold_in(gram(table), [vectors], SETTINGS)[0] for vectors in counterparts[-3:]]
    sizes: list[int] = []
    solve = torch.linalg.solve_ex

    def counted(lhs, rhs):
        sizes.append(len(lhs))
        return solve(lhs, rhs)

    monkeypatch.setattr(torch.linalg, "solve_ex", counted)
    monkeypatch.setattr(fold_in_module, "SOLVE_CHUNK", 128)
    # Outer products 7 interactions at a time: a row's two straddle some of the boundaries.
    monkeypatch.setattr(fold_in_module, "OUTER_ELEMENTS", 7 * 4 * 4)
    folded = fold_in(gram(table), counterparts, SETTINGS)
    assert sizes == [128, 128, 44]
    assert folded.shape == (5300, 4) and (folded[:5000] == 0).all()
    torch.testing.assert_close(folded[-3:], torch.stack(alone))


def test_fold_in_settings_read_from_the_artifact_metrics_or_defaulted():
    recorded = fold_in_settings({"embedding": {"regularization": 0.1, "alpha": 5, "dim": 64}})
    assert (recorded.regularization, recorded.alpha, recorded.defaulted) == (0.1, 5.0, False)
    defaulted = fold_in_settings({"dataset": "own"})
    assert (defaulted.regularization, defaulted.alpha, defaulted.defaulted) == (0.01, 20.0, True)


def test_local_tables_adapt_as_the_full_tables_with_folded_rows_appended():
    artifact = synthetic_artifact()
    tables = artifact.tables
    users, items = len(tables.user), len(tables.item)
    extra_users, extra_items = torch.randn(2, tables.user.shape[1]), torch.randn(3, 16)
    # A scenario with folded users (rows users, users + 1) and folded items in its pool.
    scenario = ScenarioInput(
        "s",
        users=np.array([5, users, 9, users + 1, 5]),
        items=np.array([40, items + 2, items, 41, items]),
        pool=np.array([3, 40, 41, 100, items, items + 1, items + 2]),
    )
    plain = ScenarioInput("t", np.array([1, 2, 3]), np.array([7, 8, 7]), np.array([7, 8, 9, 60]))
    appended = Tables(torch.cat([tables.user, extra_users]), torch.cat([tables.item, extra_items]))
    learner = artifact.learners["hybrid"]
    whole = adapt_scenarios(learner.meta, learner.config, appended, [scenario], seed=3)
    local, renumbered = local_tables(
        tables, [plain, scenario], [extra_users[:0], extra_users], [extra_items[:0], extra_items]
    )
    assert len(local.item) == 8 + 3  # the rows used, then the folded ones: no copy of all
    both = adapt_scenarios(learner.meta, learner.config, local, renumbered, seed=3)
    torch.testing.assert_close(both.theta[1], whole.theta[0])
    alone = adapt_scenarios(learner.meta, learner.config, tables, [plain], seed=3)
    torch.testing.assert_close(both.theta[0], alone.theta[0])


# ---- the service path ------------------------------------------------------------------


def renamed(scenario, items: dict[str, str], users: dict[str, str]) -> dict[str, object]:
    """The scenario's body with some item and user ids replaced by ids the artifact lacks."""
    return {
        "interactions": [
            {"user": users.get(i["user"], i["user"]), "item": items.get(i["item"], i["item"])}
            for i in scenario.interactions
        ],
        "candidates": [items.get(c, c) for c in scenario.candidates],
        "variant": "hybrid",
    }


def most_touched(scenario, k: int) -> list[str]:
    counts: dict[str, int] = {}
    for interaction in scenario.interactions:
        counts[interaction["item"]] = counts.get(interaction["item"], 0) + 1
    return sorted(counts, key=lambda item: (-counts[item], item))[:k]


def settings_for(registry, backend: str, namespace: str) -> Settings:
    return Settings(
        registry=registry,
        redis_url=REDIS_URL if backend == "redis" else None,
        namespace=namespace,
    )


async def test_new_candidates_are_folded_in_and_recommended(registry, scenario):
    touched = most_touched(scenario, 2)
    untouched = next(
        c
        for c in scenario.candidates
        if c not in set(touched) | {i["item"] for i in scenario.interactions}
    )
    items = {touched[0]: "new:hit", touched[1]: "new:second", untouched: "new:cold"}
    body = renamed(scenario, items, {})
    artifact = load_artifact(registry / "versions" / "v0001")
    # The user who should get the new hit: the one whose fixed vector scores its folded
    # vector highest (the hybrid starts as the dot product), computed here with model/ alone.
    rows = {user: k for k, user in enumerate(artifact.user_ids)}
    hit_users = [rows[i["user"]] for i in body["interactions"] if i["item"] == "new:hit"]
    table = artifact.tables.user
    vector = fold_in(gram(table), [table[hit_users]], fold_in_settings(artifact.metrics))[0]
    support = {rows[i["user"]] for i in body["interactions"]}
    outside = [k for k in range(len(table)) if k not in support]
    fan = artifact.user_ids[outside[int(torch.argmax(table[outside] @ vector))]]
    async with running(settings_for(registry, "memory", "fold")) as (_, client):
        url = f"/scenarios/{scenario.scenario_id}/adapt"
        response = await client.post(url, json=body)
        assert response.status_code == 200, response.text
        adapted = response.json()
        new_items = [c for c in body["candidates"] if c.startswith("new:")]  # in pool order
        assert adapted["folded_in"] == {"users": [], "items": new_items}
        assert adapted["ignored"] == {"unknown_users": [], "unknown_items": []}
        assert adapted["num_candidates"] == len(scenario.candidates)
        assert adapted["used_interactions"] == len(scenario.interactions)
        detail = (await client.get(f"/scenarios/{scenario.scenario_id}")).json()
        assert detail["folded_in"] == adapted["folded_in"]
        served = await client.get(
            "/recommend", params={"user": fan, "scenario": scenario.scenario_id, "n": 5}
        )
        assert served.json()["source"] == "adapted"
        assert "new:hit" in [i["item"] for i in served.json()["items"]]
        # The cold candidate is in the pool, ranked with the rest.
        everything = await client.get(
            "/recommend", params={"user": fan, "scenario": scenario.scenario_id, "n": 1000}
        )
        assert "new:cold" in [i["item"] for i in everything.json()["items"]]


async def test_an_unknown_user_with_interactions_is_folded_in_and_served(registry, scenario):
    support_user = scenario.interactions[0]["user"]
    body = renamed(scenario, {}, {support_user: "new-user"})
    seen = {i["item"] for i in body["interactions"] if i["user"] == "new-user"}
    async with running(settings_for(registry, "memory", "fold")) as (_, client):
        adapted = (await client.post(f"/scenarios/{scenario.scenario_id}/adapt", json=body)).json()
        assert adapted["folded_in"] == {"users": ["new-user"], "items": []}
        assert adapted["used_interactions"] == len(scenario.interactions)
        served = await client.get(
            "/recommend", params={"user": "new-user", "scenario": scenario.scenario_id}
        )
        assert served.status_code == 200, served.text
        assert served.json()["source"] == "adapted"  # not the popular fallback
        items = [i["item"] for i in served.json()["items"]]
        assert len(items) == 10 and not seen & set(items)
        # Another unknown user, without interactions, still gets the popular items.
        stranger = await client.get(
            "/recommend", params={"user": "stranger", "scenario": scenario.scenario_id}
        )
        assert stranger.json()["source"] == "popular"


async def test_folded_vectors_are_stored_with_the_record_and_served_alike(
    registry, scenario, backend, namespace
):
    touched = most_touched(scenario, 1)[0]
    support_user = scenario.interactions[0]["user"]
    body = renamed(scenario, {touched: "new:hit"}, {support_user: "new-user"})
    query = {"user": "new-user", "scenario": scenario.scenario_id, "n": 20}
    settings = settings_for(registry, backend, namespace)
    async with running(settings) as (app, client):
        await client.post(f"/scenarios/{scenario.scenario_id}/adapt", json=body)
        first = (await client.get("/recommend", params=query)).json()
        stored = await app.state.service.store.get(scenario.scenario_id)
        tensors = load(stored.state.params)
        assert tensors["folded_users"].shape == (1, 16)
        assert tensors["folded_items"].shape == (1, 16)
        assert stored.state.meta["folded_in"] == {"users": ["new-user"], "items": ["new:hit"]}
        if backend == "memory":
            app.state.service.cache.drop(scenario.scenario_id)  # rebuilt from the record
            again = (await client.get("/recommend", params=query)).json()
    if backend == "redis":  # another replica, sharing only the store
        async with running(settings) as (_, client):
            again = (await client.get("/recommend", params=query)).json()
    assert again["source"] == first["source"] == "adapted"
    assert again["items"] == first["items"]


async def test_a_new_meta_learner_that_knows_a_folded_item_readapts_without_folding_it(
    registry, scenario, tmp_path
):
    """After a hot reload, each scenario folds in again against the new tables: an item the
    new version knows is no longer folded, a user it still lacks is; a scenario with nothing
    folded shares the re-adaptation batch."""
    touched = most_touched(scenario, 1)[0]
    support_user = scenario.interactions[0]["user"]
    body = renamed(scenario, {touched: "new:hit"}, {support_user: "new-user"})
    base = synthetic_artifact()
    item_ids = ["new:hit" if item == touched else item for item in base.item_ids]
    save_artifact(dataclasses.replace(base, item_ids=item_ids), tmp_path / "next")
    query = {"user": "new-user", "scenario": "folded", "n": 1000}
    settings = Settings(registry=registry, reload_poll_s=0.1, readapt_batch=2)
    async with running(settings) as (_, client):
        assert (await client.post("/scenarios/folded/adapt", json=body)).status_code == 200
        assert (
            await client.post("/scenarios/plain/adapt", json=scenario.body())
        ).status_code == 200
        before = (await client.get("/recommend", params=query)).json()
        publish(tmp_path / "next", registry)

        async def readapted() -> bool:
            page = (await client.get("/scenarios")).json()["scenarios"]
            return all(s["meta_learner"] == "v0002" for s in page)

        await wait_for(readapted, what="both scenarios re-adapted")
        detail = (await client.get("/scenarios/folded")).json()
        assert detail["folded_in"] == {"users": ["new-user"], "items": []}
        after = (await client.get("/recommend", params=query)).json()
    assert before["source"] == after["source"] == "adapted"
    assert after["meta_learner"] == "v0002"
    # The same pool either way, new:hit seen by new-user in both.
    assert {i["item"] for i in after["items"]} == {i["item"] for i in before["items"]}


async def test_a_pool_of_only_new_items_and_a_user_with_nothing_to_fold_from(registry, scenario):
    """Every candidate new: each is folded from the known users who touched it. A new user
    whose only item no known user touched has nothing to fold from: ignored, its interaction
    unused, and it gets the popular items; that item stays in the pool with the zero vector."""
    items = {c: f"new:{c}" for c in scenario.candidates}
    body = renamed(scenario, items, {})
    body["candidates"].append("new:island")
    body["interactions"].append({"user": "new:islander", "item": "new:island"})
    touched = {i["item"] for i in body["interactions"]} - {"new:island"}
    async with running(settings_for(registry, "memory", "fold")) as (app, client):
        adapted = (await client.post(f"/scenarios/{scenario.scenario_id}/adapt", json=body)).json()
        assert adapted["folded_in"] == {"users": [], "items": body["candidates"]}
        # The record keeps the solved vectors only: a pool of a million new items, most
        # untouched, would otherwise store a million zero vectors.
        stored = await app.state.service.store.get(scenario.scenario_id)
        kept = load(stored.state.params)
        assert kept["folded_items"].shape == (len(touched), 16)
        assert kept["folded_items"].abs().sum(dim=1).min() > 0
        assert [body["candidates"][k] for k in kept["folded_item_rows"]] == [
            c for c in body["candidates"] if c in touched
        ]
        assert adapted["ignored"] == {"unknown_users": ["new:islander"], "unknown_items": []}
        assert adapted["used_interactions"] == len(scenario.interactions)
        assert adapted["num_candidates"] == len(body["candidates"])
        known = body["interactions"][0]["user"]
        query = {"scenario": scenario.scenario_id, "n": 1000, "exclude_seen": "false"}
        served = (await client.get("/recommend", params={**query, "user": known})).json()
        assert served["source"] == "adapted"
        assert {i["item"] for i in served["items"]} == set(body["candidates"])
        islander = (await client.get("/recommend", params={**query, "user": "new:islander"})).json()
        assert islander["source"] == "popular"
