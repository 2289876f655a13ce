"""The service over HTTP (httpx, lifespan run): adapt and recommend agree with the model
code, the scenario routes, and every error the API promises; against the in-process store
and a real Redis."""

import asyncio
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import numpy as np
import pytest
import redis
import torch
from conftest import REDIS_URL, needs_cuda, needs_redis, running, settings_for
from fastapi import FastAPI, Query, Request, Response
from problem_checks import assert_problem, urn
from synthetic import ScenarioIds

from model.artifact import load_artifact
from model.scenario import ScenarioInput, adapt_scenarios, score_scenario
from service import scenarios as scenarios_module
from service import writes as writes_module
from service.app import create_app
from service.direct_routes import DirectRoute
from service.errors import StoreError
from service.schemas import RecommendQuery, RecommendResponse
from service.settings import Settings

pytestmark = pytest.mark.anyio


def expected_ranking(registry, scenario, variant: str, user: str, seed: int = 0):
    """The same adaptation and scores computed directly with the model package."""
    artifact = load_artifact(registry / "versions" / "v0001")
    learner = artifact.learners[variant]
    rows = {u: k for k, u in enumerate(artifact.user_ids)}
    item_rows = {i: k for k, i in enumerate(artifact.item_ids)}
    scenario_input = ScenarioInput(
        scenario.scenario_id,
        np.array([rows[i["user"]] for i in scenario.interactions]),
        np.array([item_rows[i["item"]] for i in scenario.interactions]),
        np.array(sorted(item_rows[c] for c in scenario.candidates)),
    )
    result = adapt_scenarios(learner.meta, learner.config, artifact.tables, [scenario_input], seed)
    scores = score_scenario(
        learner.config, result.theta[0], artifact.tables, scenario_input, np.array([rows[user]])
    )[0]
    order = torch.argsort(scores, descending=True, stable=True)
    pool_ids = [artifact.item_ids[k] for k in scenario_input.pool]
    return result, [(pool_ids[k], float(scores[k])) for k in order]


@pytest.mark.parametrize("variant", ["hybrid", "mapping", "interaction"])
async def test_adapt_then_recommend_equals_the_model_code(
    registry, scenario, namespace, backend, variant
):
    result, ranking = expected_ranking(registry, scenario, variant, scenario.eval_user)
    async with running(settings_for(registry, backend, namespace)) as (_, client):
        response = await client.post(
            f"/scenarios/{scenario.scenario_id}/adapt", json=scenario.body(variant=variant)
        )
        assert response.status_code == 200, response.text
        adapted = response.json()
        assert adapted["scenario"] == scenario.scenario_id and adapted["revision"] == 1
        assert adapted["meta_learner"] == "v0001" and adapted["variant"] == variant
        assert adapted["steps"] == int(result.steps[0])
        expected_stop = "stop_controller" if bool(result.stopped_by_controller[0]) else "max_steps"
        assert adapted["stopped_by"] == expected_stop
        np.testing.assert_allclose(adapted["train_loss"], result.train_loss[0].numpy(), rtol=1e-5)
        assert len(adapted["stop_probability"]) == len(adapted["train_loss"])
        assert adapted["used_interactions"] == len(scenario.interactions)
        assert adapted["num_candidates"] == len(scenario.candidates)
        assert adapted["ignored"] == {"unknown_users": [], "unknown_items": []}

        response = await client.get(
            "/recommend", params={"user": scenario.eval_user, "scenario": scenario.scenario_id}
        )
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/json"
        served = response.json()
        # The route encodes its answer itself: it must still be the documented one, exactly.
        assert RecommendResponse.model_validate_json(response.content).model_dump() == served
        assert served["source"] == "adapted" and served["revision"] == 1
        assert served["meta_learner"] == "v0001" and served["user"] == scenario.eval_user
        assert [i["item"] for i in served["items"]] == [item for item, _ in ranking[:10]]
        np.testing.assert_allclose(
            [i["score"] for i in served["items"]],
            [s for _, s in ranking[:10]],
            rtol=1e-4,
            atol=1e-5,
        )


@needs_cuda
@pytest.mark.parametrize("variant", ["hybrid", "mapping", "interaction"])
async def test_adapt_and_recommend_on_the_gpu(registry, scenario, variant):
    """The same routes with adaptation and scoring on the GPU: each variant adapts, and a
    user with an embedding gets the scenario's candidates ranked by its recommender."""
    async with running(settings_for(registry, "memory", "gpu", device="cuda")) as (_, client):
        url = f"/scenarios/{scenario.scenario_id}/adapt"
        adapted = await client.post(url, json=scenario.body(variant=variant))
        assert adapted.status_code == 200, adapted.text
        params = {"user": scenario.eval_user, "scenario": scenario.scenario_id}
        served = (await client.get("/recommend", params=params)).json()
    assert served["source"] == "adapted" and len(served["items"]) == 10
    assert {i["item"] for i in served["items"]} <= set(scenario.candidates)


async def test_same_seed_same_adaptation_and_another_seed_differs(registry, scenario):
    async with running(settings_for(registry, "memory", "s")) as (_, client):
        url = f"/scenarios/{scenario.scenario_id}/adapt"
        first = (await client.post(url, json=scenario.body(seed=7))).json()
        other = (await client.post(url, json=scenario.body(seed=8))).json()
        # Seed 7 again differs from the stored registration (seed 8): adapted again.
        again = (await client.post(url, json=scenario.body(seed=7))).json()
    assert (first["revision"], other["revision"], again["revision"]) == (1, 2, 3)
    assert not again["reused"]
    assert again["train_loss"] == first["train_loss"]
    assert other["train_loss"] != first["train_loss"]


async def test_unknown_ids_are_reported_and_folded_in(registry, scenario):
    # An unknown user with an interaction and an unknown candidate
    # are folded in rather than ignored: tests/test_fold_in.py tests what they get.
    body = scenario.body()
    body["interactions"] = [
        *body["interactions"],
        {"user": "ghost-user", "item": body["candidates"][0]},
    ]
    body["candidates"] = [*body["candidates"], "ghost-item", body["candidates"][0]]
    async with running(settings_for(registry, "memory", "s")) as (_, client):
        response = await client.post(f"/scenarios/{scenario.scenario_id}/adapt", json=body)
        assert response.status_code == 200, response.text
        adapted = response.json()
        assert adapted["ignored"] == {"unknown_users": [], "unknown_items": []}
        assert adapted["folded_in"] == {"users": ["ghost-user"], "items": ["ghost-item"]}
        assert adapted["used_interactions"] == len(scenario.interactions) + 1
        # The duplicate counted once, the unknown candidate kept.
        assert adapted["num_candidates"] == len(scenario.candidates) + 1
        detail = (await client.get(f"/scenarios/{scenario.scenario_id}")).json()
        assert detail["counts"]["registered_interactions"] == len(scenario.interactions) + 1


async def test_popular_fallback_and_exclude_seen(registry, scenario, namespace, backend):
    pool = len(scenario.candidates)
    support_user = scenario.interactions[0]["user"]
    seen = {i["item"] for i in scenario.interactions if i["user"] == support_user}
    counts: dict[str, int] = {}
    for interaction in scenario.interactions:
        counts[interaction["item"]] = counts.get(interaction["item"], 0) + 1
    async with running(settings_for(registry, backend, namespace)) as (_, client):
        await client.post(f"/scenarios/{scenario.scenario_id}/adapt", json=scenario.body())
        params = {"scenario": scenario.scenario_id, "n": 1000}
        everything = await client.get("/recommend", params={**params, "user": support_user})
        excluded = [i["item"] for i in everything.json()["items"]]
        assert len(excluded) == pool - len(seen) and not seen & set(excluded)
        kept = await client.get(
            "/recommend", params={**params, "user": support_user, "exclude_seen": "false"}
        )
        assert len(kept.json()["items"]) == pool and seen <= {
            i["item"] for i in kept.json()["items"]
        }

        popular = await client.get("/recommend", params={**params, "n": 5, "user": "newcomer"})
        served = popular.json()
        assert served["source"] == "popular"
        top = sorted(counts.values(), reverse=True)[:5]
        assert [i["score"] for i in served["items"]] == top
        assert all(counts[i["item"]] == i["score"] for i in served["items"])
        metrics = (await client.get("/metrics")).text
        assert "s2meta_popular_fallbacks_total 1.0" in metrics


async def test_scenario_routes_list_describe_delete(registry, scenario, namespace, backend):
    token = "s3cret"
    settings = settings_for(registry, backend, namespace, admin_token=token)
    auth = {"Authorization": f"Bearer {token}"}
    async with running(settings) as (_, client):
        for name in ("a.1", "b:2", "c-3"):
            response = await client.post(
                f"/scenarios/{name}/adapt", json=scenario.body(), headers=auth
            )
            assert response.status_code == 200, response.text
        page = (await client.get("/scenarios", params={"limit": 2})).json()
        assert [s["scenario"] for s in page["scenarios"]] == ["a.1", "b:2"] and page[
            "next"
        ] == "b:2"
        rest = (await client.get("/scenarios", params={"after": "b:2", "limit": 2})).json()
        assert [s["scenario"] for s in rest["scenarios"]] == ["c-3"] and rest["next"] is None
        detail = (await client.get("/scenarios/b:2")).json()
        assert detail["status"] == "ready" and detail["meta_learner"] == "v0001"
        assert detail["steps"] == len(detail["train_loss"]) - (
            detail["stopped_by"] == "stop_controller"
        )
        assert detail["counts"]["users"] > 1

        assert (await client.delete("/scenarios/b:2")).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert (await client.delete("/scenarios/b:2", headers=wrong)).status_code == 403
        assert (await client.delete("/scenarios/b:2", headers=auth)).status_code == 204
        assert (await client.delete("/scenarios/b:2", headers=auth)).status_code == 404
        assert (await client.get("/scenarios/b:2")).status_code == 404
        gone = await client.get("/recommend", params={"user": "x", "scenario": "b:2"})
        assert_problem(gone, 404, urn("unknown-scenario"), "'b:2'")
        assert (
            await client.get("/recommend", params={"user": "x", "scenario": "a.1"})
        ).status_code == 200


INVALID, NOT_ADAPTABLE = urn("invalid-request"), urn("not-adaptable")
# name: (the body, made from the scenario; the 422's type; what its detail says, where checked)
BAD_ADAPT_BODIES: dict[str, tuple[Callable[[ScenarioIds], dict], str, str]] = {
    "empty body": (lambda s: {}, INVALID, "body.interactions: Field required"),
    "no interactions": (lambda s: s.body(interactions=[]), INVALID, "body.interactions"),
    "too many interactions": (
        lambda s: s.body(interactions=s.interactions * 2),
        NOT_ADAPTABLE,
        "at most 100",
    ),
    "too many candidates": (
        lambda s: s.body(candidates=[*s.candidates, "x"]),
        NOT_ADAPTABLE,
        "at most {pool}",
    ),
    "bad user id": (
        lambda s: s.body(interactions=[{"user": "a\x01", "item": "b"}]),
        INVALID,
        "body.interactions.0.user",
    ),
    "too long id": (lambda s: s.body(candidates=["x" * 300]), INVALID, "body.candidates.0"),
    "unknown field": (lambda s: s.body(extra=1), INVALID, "body.extra"),
    "bad variant": (lambda s: s.body(variant="deep"), INVALID, "body.variant"),
    "negative seed": (lambda s: s.body(seed=-1), INVALID, "body.seed"),
    # One item: an unknown second candidate would be folded in, not dropped.
    "tiny pool": (
        lambda s: {"interactions": [s.interactions[0]], "candidates": [s.interactions[0]["item"]]},
        INVALID,
        "at least 2",
    ),
    "too few usable": (
        lambda s: s.body(interactions=s.interactions[:5]),
        NOT_ADAPTABLE,
        "at least 8",
    ),
    "item outside the pool": (
        lambda s: s.body(candidates=[c for c in s.candidates if c != s.interactions[0]["item"]]),
        NOT_ADAPTABLE,
        "not among the candidates",
    ),
}


@pytest.mark.parametrize(
    "make_body,kind,reason", BAD_ADAPT_BODIES.values(), ids=BAD_ADAPT_BODIES.keys()
)
async def test_a_bad_adapt_body_is_a_clear_422_and_stores_nothing(
    registry, scenario, make_body, kind, reason
):
    pool = len(scenario.candidates)
    settings = settings_for(registry, "memory", "s", max_interactions=100, max_candidates=pool)
    async with running(settings) as (_, client):
        url = f"/scenarios/{scenario.scenario_id}/adapt"
        response = await client.post(url, json=make_body(scenario))
        problem = assert_problem(response, 422, kind, reason.format(pool=pool))
        # Field errors are listed; a scenario that cannot be adapted has none to list.
        assert bool(problem.get("errors")) == (kind == INVALID)
        assert (await client.get("/scenarios")).json()["scenarios"] == []  # nothing stored


async def test_a_bad_scenario_id_or_a_body_not_json_is_422(registry, scenario):
    async with running(settings_for(registry, "memory", "s")) as (_, client):
        response = await client.post("/scenarios/bad id!/adapt", json=scenario.body())
        assert_problem(response, 422, INVALID, "path.scenario_id")
        url = f"/scenarios/{scenario.scenario_id}/adapt"
        not_json = await client.post(url, content=b"not json")
        assert assert_problem(not_json, 422, INVALID)["errors"][0]["loc"] == ["body"]
        assert (await client.get("/scenarios")).json()["scenarios"] == []


@pytest.mark.parametrize("params", [{"n": 0}, {"n": 1001}, {"user": ""}, {"scenario": "a/b"}])
async def test_a_bad_recommend_query_is_a_422_located_in_the_query(registry, scenario, params):
    async with running(settings_for(registry, "memory", "s")) as (_, client):
        query = {"user": "u", "scenario": scenario.scenario_id, **params}
        response = await client.get("/recommend", params=query)
        # The field errors, located in the query, each with loc, msg and type.
        [error] = assert_problem(response, 422, INVALID, f"query.{next(iter(params))}")["errors"]
        assert error["loc"] == ["query", *params]
        assert error["msg"] and error["type"]


async def test_recommend_names_every_bad_field_and_an_unknown_scenario_is_404(registry):
    async with running(settings_for(registry, "memory", "s")) as (_, client):
        response = await client.get("/recommend", params={"n": "many"})
        problem = assert_problem(response, 422, INVALID)
        assert {tuple(e["loc"]) for e in problem["errors"]} == {
            ("query", "user"),
            ("query", "scenario"),
            ("query", "n"),
        }
        unknown = await client.get("/recommend", params={"user": "u", "scenario": "nope"})
        assert_problem(unknown, 404, urn("unknown-scenario"), "'nope'")


async def test_queue_full_is_429_and_recommend_is_not_blocked(registry, scenario, monkeypatch):
    settings = settings_for(registry, "memory", "s", adapt_workers=1, adapt_queue=0)
    release = threading.Event()
    real = writes_module.adapt_registration

    def held_adaptation(*args, **kwargs):
        release.wait(timeout=60)
        return real(*args, **kwargs)

    async with running(settings) as (app, client):
        await client.post("/scenarios/ready/adapt", json=scenario.body())
        monkeypatch.setattr(writes_module, "adapt_registration", held_adaptation)
        pending = asyncio.create_task(client.post("/scenarios/next/adapt", json=scenario.body()))
        while app.state.service.writes.in_flight == 0:
            await asyncio.sleep(0.01)
        refused = await client.post("/scenarios/other/adapt", json=scenario.body())
        assert_problem(refused, 429, urn("queue-full"), "retry later")
        assert refused.headers["Retry-After"] == "5"
        served = await asyncio.wait_for(
            client.get("/recommend", params={"user": scenario.eval_user, "scenario": "ready"}), 10
        )
        assert served.status_code == 200 and not pending.done()
        release.set()
        assert (await pending).status_code == 200
        assert "s2meta_adaptations_rejected_total 1.0" in (await client.get("/metrics")).text


async def test_unreachable_store_is_503_and_ready_degraded(registry, scenario):
    """A store every replica shares being down does not take the replica out of service: it
    is ready, degraded, and names why; what needs the store answers 503."""
    settings = Settings(registry=registry, redis_url="redis://127.0.0.1:1/0", reload_poll_s=60)
    async with running(settings) as (_, client):
        assert (await client.get("/healthz")).status_code == 200
        ready = await client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["status"] == "degraded" and ready.json()["meta_learner"] == "v0001"
        [cause] = ready.json()["causes"]
        assert "scenario store unavailable" in cause
        assert metric((await client.get("/metrics")).text, "s2meta_store_reachable") == 0
        response = await client.post(
            f"/scenarios/{scenario.scenario_id}/adapt", json=scenario.body()
        )
        assert_problem(response, 503, urn("store-unavailable"), "store unavailable")
        assert response.headers["Retry-After"] == "5"
        response = await client.get("/recommend", params={"user": "u", "scenario": "s"})
        assert_problem(response, 503, urn("store-unavailable"))


async def test_without_a_published_meta_learner_not_ready_and_adapt_is_503(tmp_path, scenario):
    async with running(Settings(registry=tmp_path, reload_poll_s=60)) as (_, client):
        assert (await client.get("/readyz")).status_code == 503
        response = await client.post("/scenarios/x/adapt", json=scenario.body())
        assert_problem(response, 503, urn("no-meta-learner"), "meta learner")
        assert "retry-after" not in response.headers


@needs_redis
async def test_two_replicas_share_scenarios_through_redis(registry, scenario, namespace):
    settings = settings_for(registry, "redis", namespace, reload_poll_s=60)
    params = {"user": scenario.eval_user, "scenario": scenario.scenario_id}
    async with running(settings) as (_, first), running(settings) as (_, second):
        await first.post(f"/scenarios/{scenario.scenario_id}/adapt", json=scenario.body())
        served = (await second.get("/recommend", params=params)).json()
        assert served["revision"] == 1 and served["source"] == "adapted"
        again = await first.post(
            f"/scenarios/{scenario.scenario_id}/adapt", json=scenario.body(variant="mapping")
        )
        assert again.json()["revision"] == 2
        # Picked up without a restart, as soon as the store's announcement arrives.
        deadline = time.monotonic() + 2
        while (served := (await second.get("/recommend", params=params)).json())["revision"] < 2:
            assert time.monotonic() < deadline, served
            await asyncio.sleep(0.01)
        assert served["revision"] == 2
        metrics = (await second.get("/metrics")).text
        assert "s2meta_recommender_cache_misses_total 2.0" in metrics


async def test_openapi_documents_every_route(registry):
    async with running(settings_for(registry, "memory", "s")) as (_, client):
        paths = (await client.get("/openapi.json")).json()["paths"]
    assert {
        "/scenarios/{scenario_id}/adapt",
        "/recommend",
        "/scenarios",
        "/scenarios/{scenario_id}",
        "/healthz",
        "/readyz",
        "/metrics",
    } <= set(paths)
    assert "429" in paths["/scenarios/{scenario_id}/adapt"]["post"]["responses"]
    assert "422" in paths["/recommend"]["get"]["responses"]


def test_recommend_documents_its_query_as_fastapi_would():
    """recommend validates its query itself (RecommendQuery); its OpenAPI parameters are the
    ones FastAPI writes for that model declared as the route's query parameters."""
    reference = FastAPI()

    @reference.get("/recommend")
    async def declared(query: Annotated[RecommendQuery, Query()]) -> None:
        return None

    expected = reference.openapi()["paths"]["/recommend"]["get"]["parameters"]
    ours = create_app(Settings(registry=Path("unused"))).openapi()["paths"]["/recommend"]
    assert ours["get"]["parameters"] == expected
    assert [p["name"] for p in expected] == ["user", "scenario", "n", "exclude_seen", "exclude"]


def test_a_direct_route_takes_the_request_alone():
    async def with_parameters(request: Request, user: str) -> Response:
        return Response()

    with pytest.raises(TypeError, match="takes the request alone"):
        DirectRoute("/x", with_parameters, methods=["GET"])


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{name} (\S+)$", text, re.M)
    assert found is not None, name
    return float(found.group(1))


@needs_redis
async def test_recommend_asks_the_store_only_after_an_announcement(registry, scenario, namespace):
    """While a replica hears the store's announcements it serves a revision it has read
    without asking the store again; another replica's write reaches it through them."""
    settings = settings_for(registry, "redis", namespace, reload_poll_s=60)
    params = {"user": scenario.eval_user, "scenario": scenario.scenario_id}
    redis_client = redis.Redis.from_url(REDIS_URL)

    def revision_reads_in_redis() -> int:  # the store's revision read is its only HGET
        return int(redis_client.info("commandstats").get("cmdstat_hget", {}).get("calls", 0))

    async with running(settings) as (_, first), running(settings) as (_, second):
        deadline = time.monotonic() + 10
        while metric((await second.get("/metrics")).text, "s2meta_store_events_live") != 1:
            assert time.monotonic() < deadline, "the subscription did not go live"
            await asyncio.sleep(0.05)
        await first.post(f"/scenarios/{scenario.scenario_id}/adapt", json=scenario.body())
        for _ in range(2):  # the first read, and one more if the announcement overtook it
            assert (await second.get("/recommend", params=params)).json()["revision"] == 1
        before = revision_reads_in_redis()
        for _ in range(20):
            assert (await second.get("/recommend", params=params)).json()["revision"] == 1
        assert revision_reads_in_redis() == before
        reads = metric((await second.get("/metrics")).text, "s2meta_store_revision_reads_total")
        assert 1 <= reads <= 2

        # Another seed: not an identical re-post, so a new revision.
        await first.post(f"/scenarios/{scenario.scenario_id}/adapt", json=scenario.body(seed=1))
        deadline = time.monotonic() + 2
        while (await second.get("/recommend", params=params)).json()["revision"] != 2:
            assert time.monotonic() < deadline, "the announcement did not arrive"
            await asyncio.sleep(0.01)
    redis_client.close()


async def test_concurrent_misses_load_a_scenario_once(registry, scenario, monkeypatch):
    """Concurrent recommends that miss the cache on one revision fetch the stored scenario
    and build its recommender once between them; a failed load fails each of them, and the
    next miss loads again."""
    params = {"user": scenario.eval_user, "scenario": "s"}
    async with running(settings_for(registry, "memory", "once")) as (app, client):
        await client.post("/scenarios/s/adapt", json=scenario.body())
        service = app.state.service
        stored_get = service.store.get
        fetched: list[str] = []
        store_down = True

        async def slow_get(scenario_id: str):
            fetched.append(scenario_id)
            await asyncio.sleep(0.05)  # the other requests miss meanwhile
            if store_down:
                raise StoreError("down for this test")
            return await stored_get(scenario_id)

        monkeypatch.setattr(service.store, "get", slow_get)
        service.cache.drop("s")
        failed = await asyncio.gather(*(client.get("/recommend", params=params) for _ in range(8)))
        assert [response.status_code for response in failed] == [503] * 8
        assert_problem(failed[0], 503, urn("store-unavailable"), "down for this test")
        assert fetched == ["s"]
        store_down = False
        served = await asyncio.gather(*(client.get("/recommend", params=params) for _ in range(8)))
        assert [response.status_code for response in served] == [200] * 8
        assert fetched == ["s", "s"]
        for response in served[1:]:
            assert_same_ranking(response.json()["items"], served[0].json()["items"])
        assert service.cache.get("s", 1) is not None
        metrics = (await client.get("/metrics")).text
    assert metric(metrics, "s2meta_recommender_cache_misses_total") == 16


def assert_same_ranking(got: list[dict], want: list[dict]) -> None:
    """The same scores in the same order (to float rounding: products in a batch take other
    paths than alone), and the same item at each score that no other item in the list ties
    with. Tied items come in any order (a user whose MLP scores are all zero after the ReLU
    ties every item), so a run of ties is compared as a set of items, and a run of ties that
    ends the list is not compared item by item: which of the tied items make the top n is
    arbitrary."""
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g["score"] == pytest.approx(w["score"], rel=1e-4, abs=1e-5)
    start = 0
    while start < len(want):
        end = start + 1
        while end < len(want) and want[end]["score"] == pytest.approx(
            want[start]["score"], rel=1e-4, abs=1e-5
        ):
            end += 1
        items = {g["item"] for g in got[start:end]}, {w["item"] for w in want[start:end]}
        if end - start == 1 or end < len(want):
            assert items[0] == items[1], (start, got, want)
        start = end


@pytest.mark.parametrize("variant", ["interaction", "mapping"])
async def test_concurrent_recommends_ranked_together_equal_one_by_one(registry, scenario, variant):
    """Dynamic batching: concurrent recommends (several users, one without an embedding,
    different n and exclude_seen) ranked in batches give what one-by-one ranking gives."""
    support_users = sorted({i["user"] for i in scenario.interactions})[:12]
    users = [*support_users, scenario.eval_user, "nobody"]
    requests = [
        {"user": user, "scenario": "s", "n": 5 + k % 7, "exclude_seen": k % 2 == 0}
        for k, user in enumerate(users * 3)
    ]
    answers = {}
    for label, batch_max in (("one_by_one", 1), ("batched", 64)):
        settings = settings_for(
            registry, "memory", "b", recommend_batch_max=batch_max, recommend_batches=1
        )
        async with running(settings) as (_, client):
            await client.post("/scenarios/s/adapt", json=scenario.body(variant=variant))
            responses = await asyncio.gather(
                *(client.get("/recommend", params=params) for params in requests)
            )
            answers[label] = [response.json() for response in responses]
            metrics = (await client.get("/metrics")).text
        batches = metric(metrics, "s2meta_recommend_batch_size_count")
        assert metric(metrics, "s2meta_recommend_batch_size_sum") == len(requests)
        if batch_max == 1:
            assert batches == len(requests)
        else:
            assert batches < len(requests) / 2  # most were ranked together
    assert {a["source"] for a in answers["batched"]} == {"adapted", "popular"}
    for batched, alone in zip(answers["batched"], answers["one_by_one"], strict=True):
        assert_same_ranking(batched["items"], alone["items"])


async def test_a_batch_over_scenarios_of_every_variant_equals_one_by_one(registry, scenario):
    """One batch holding requests for interaction, hybrid and mapping scenarios: their pools
    scored in one kernel call, the mapping one searched alone, each answer what ranking it
    alone gives."""
    users = [*sorted({i["user"] for i in scenario.interactions})[:6], scenario.eval_user, "x"]
    variants = ("interaction", "hybrid", "mapping")
    requests = [
        {"user": user, "scenario": variant, "n": 4 + k % 5}
        for k, user in enumerate(users)
        for variant in variants
    ]
    answers = {}
    for label, batch_max in (("one_by_one", 1), ("batched", 64)):
        settings = settings_for(registry, "memory", "v", recommend_batch_max=batch_max)
        async with running(settings) as (app, client):
            # With the compiled kernel on the CPU every batch is scored on the thread.
            assert app.state.service.batcher.inline_pairs == 0
            for variant in variants:
                body = scenario.body(variant=variant)
                (await client.post(f"/scenarios/{variant}/adapt", json=body)).raise_for_status()
            responses = await asyncio.gather(
                *(client.get("/recommend", params=params) for params in requests)
            )
            answers[label] = [response.json() for response in responses]
            metrics = (await client.get("/metrics")).text
        if batch_max > 1:  # most were ranked in batches, so batches over several scenarios
            assert metric(metrics, "s2meta_recommend_batch_size_count") < len(requests) / 2
    for batched, alone in zip(answers["batched"], answers["one_by_one"], strict=True):
        assert_same_ranking(batched["items"], alone["items"])


async def test_without_the_ranking_kernel_small_batches_stay_on_the_loop(registry, monkeypatch):
    monkeypatch.setattr(scenarios_module, "kernel_available", lambda: False)
    settings = settings_for(registry, "memory", "k", recommend_inline_pairs=1234)
    async with running(settings) as (app, _):
        assert app.state.service.batcher.inline_pairs == 1234
