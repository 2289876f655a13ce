"""Recommend's options: `exclude` (item ids left out, for the adapted ranking and the popular
fallback alike) and many users of one scenario in one call, ranked in one pass, answering
what each user's own recommend answers."""

import re

import pytest
from conftest import running, settings_for

pytestmark = pytest.mark.anyio


@pytest.fixture
async def served(registry, scenario):
    async with running(settings_for(registry, "memory", "s", reload_poll_s=60)) as (_, client):
        response = await client.post(
            f"/scenarios/{scenario.scenario_id}/adapt", json=scenario.body()
        )
        assert response.status_code == 200, response.text
        yield client


def items(answer: dict) -> list[str]:
    return [entry["item"] for entry in answer["items"]]


async def test_excluded_items_are_left_out_and_the_list_stays_full(served, scenario):
    params = {"user": scenario.eval_user, "scenario": scenario.scenario_id, "n": 10}
    top = items((await served.get("/recommend", params=params)).json())
    gone = [top[0], top[3], "not-in-the-pool"]
    answer = (await served.get("/recommend", params={**params, "exclude": gone})).json()
    assert answer["source"] == "adapted"
    kept = items(answer)
    assert len(kept) == 10 and not set(gone) & set(kept)
    # The rest keep their order; the next items move up.
    assert kept[:8] == [item for item in top if item not in gone]


async def test_exclude_applies_to_the_popular_fallback(served, scenario):
    params = {"user": "ghost", "scenario": scenario.scenario_id, "n": 5}
    popular = (await served.get("/recommend", params=params)).json()
    assert popular["source"] == "popular"
    first = items(popular)[0]
    answer = (await served.get("/recommend", params={**params, "exclude": first})).json()
    assert first not in items(answer) and len(items(answer)) == 5


async def test_too_many_excluded_ids_are_422(served, scenario):
    params = {
        "user": "u",
        "scenario": scenario.scenario_id,
        "exclude": [f"i{k}" for k in range(1001)],
    }
    assert (await served.get("/recommend", params=params)).status_code == 422


async def test_many_users_answer_what_each_alone_answers_in_one_batch(served, scenario):
    users = [scenario.eval_user, "ghost", scenario.interactions[0]["user"], "user-0007"]
    body = {"users": users, "n": 7, "exclude": [scenario.candidates[0]]}
    metrics_before = (await served.get("/metrics")).text
    response = await served.post(f"/scenarios/{scenario.scenario_id}/recommendations", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert (answer["scenario"], answer["revision"], answer["meta_learner"]) == (
        scenario.scenario_id,
        1,
        "v0001",
    )
    assert [result["user"] for result in answer["results"]] == users
    # One batch held every user (its size observed once, at len(users)).
    sizes = batch_sizes((await served.get("/metrics")).text)
    assert sizes[0] - batch_sizes(metrics_before)[0] == 1
    assert sizes[1] - batch_sizes(metrics_before)[1] == len(users)
    for user, result in zip(users, answer["results"], strict=True):
        params = {
            "user": user,
            "scenario": scenario.scenario_id,
            "n": 7,
            "exclude": body["exclude"],
        }
        alone = (await served.get("/recommend", params=params)).json()
        assert result["source"] == alone["source"]
        assert items(result) == items(alone)
        assert [e["score"] for e in result["items"]] == pytest.approx(
            [e["score"] for e in alone["items"]], abs=1e-5
        )
    assert answer["results"][1]["source"] == "popular"


def batch_sizes(text: str) -> tuple[float, float]:
    count = re.search(r"^s2meta_recommend_batch_size_count (\S+)$", text, re.M)
    total = re.search(r"^s2meta_recommend_batch_size_sum (\S+)$", text, re.M)
    return (float(count.group(1)) if count else 0.0, float(total.group(1)) if total else 0.0)


async def test_many_users_refusals(served, scenario):
    route = f"/scenarios/{scenario.scenario_id}/recommendations"
    assert (
        await served.post("/scenarios/nope/recommendations", json={"users": ["u"]})
    ).status_code == 404
    assert (await served.post(route, json={"users": []})).status_code == 422
    assert (
        await served.post(route, json={"users": [f"u{k}" for k in range(1001)]})
    ).status_code == 422
    assert (await served.post(route, json={"users": ["u"], "n": 0})).status_code == 422
