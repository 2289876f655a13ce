"""s2meta.client against the real app: every route round trips with the sync and the async
client, awkward ids survive the URL (in process and over a real server), errors raise the
RFC 9457 problem; the retry rules are tests/test_client_retries.py."""

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from conftest import running, serving, settings_for
from synthetic import ScenarioIds

from s2meta.client import AsyncClient, Client, ProblemError

pytestmark = pytest.mark.anyio
UNKNOWN = "urn:s2meta:problem:unknown-scenario"
MISMATCH = "urn:s2meta:problem:revision-mismatch"
# Ids that break a URL built by hand: reserved characters, a space, unicode, dots.
AWKWARD_USERS = ["a/b?c&d=e#f", "100% sure", "üser ☃", "+plus+", "semi;colon,comma"]
AWKWARD_ITEMS = ["sku/1?x", "sku#2&y=z", "ítem 3"]
AWKWARD_SCENARIOS = ["promo:2024.05-x", "..", "."]


class LoopTransport(httpx.BaseTransport):
    """A sync transport into an ASGI app whose event loop runs in another thread."""

    def __init__(self, app: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.asgi, self.loop = httpx.ASGITransport(app=app), loop

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        async def send() -> httpx.Response:
            response = await self.asgi.handle_async_request(request)
            content = await response.aread()
            return httpx.Response(response.status_code, headers=response.headers, content=content)

        return asyncio.run_coroutine_threadsafe(send(), self.loop).result()


async def resolve(value: Any) -> Any:
    """A sync client's answer as it is, an async client's awaited."""
    return await value if inspect.isawaitable(value) else value


async def every(iterator: Any) -> list[Any]:
    if hasattr(iterator, "__aiter__"):
        return [item async for item in iterator]
    return list(iterator)


async def with_client(
    kind: str, app: Any, steps: Callable[[Client | AsyncClient], Awaitable[None]], **options: Any
) -> None:
    """Run `steps` with a client of `kind` on `app`. The sync client blocks: its steps run on
    a loop of their own in a worker thread while the app serves on this one."""
    if kind == "async":
        transport = httpx.ASGITransport(app=app)
        async with AsyncClient("http://s2meta", transport=transport, **options) as client:
            await steps(client)
        return
    sync = Client(
        "http://s2meta", transport=LoopTransport(app, asyncio.get_running_loop()), **options
    )
    with sync:
        await asyncio.to_thread(asyncio.run, steps(sync))


def pairs(scenario: ScenarioIds) -> list[tuple[str, str]]:
    return [(i["user"], i["item"]) for i in scenario.interactions]


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_every_route_round_trips(registry, scenario, kind):
    ids = scenario.scenario_id

    async def steps(client: Client | AsyncClient) -> None:
        ready = await resolve(client.ready())
        assert (ready.status, ready.meta_learner, ready.causes) == ("ready", "v0001", [])
        assert await resolve(client.health()) == {"status": "ok"}

        adapted = await resolve(client.adapt(ids, pairs(scenario), scenario.candidates, seed=3))
        assert (adapted.scenario, adapted.revision, adapted.reused) == (ids, 1, False)
        again = await resolve(client.adapt(ids, pairs(scenario), scenario.candidates, seed=3))
        assert (again.revision, again.reused) == (1, True)
        detail = await resolve(client.get_scenario(ids))
        assert (detail.value.revision, detail.value.seed, detail.etag) == (1, 3, '"1"')

        top = await resolve(client.recommend(ids, scenario.eval_user, n=5))
        assert (top.user, top.revision, len(top.items)) == (scenario.eval_user, 1, 5)
        best = top.items[0].item
        rest = await resolve(client.recommend(ids, scenario.eval_user, n=5, exclude=[best]))
        assert best not in [entry.item for entry in rest.items]
        assert [e.item for e in rest.items[:4]] == [e.item for e in top.items[1:]]
        users = [scenario.eval_user, scenario.interactions[0]["user"]]
        many = await resolve(client.recommend_many(ids, users, n=3, exclude=[best]))
        assert [result.user for result in many.results] == users
        # Ranked in one pass: the same items, scores equal up to float rounding.
        assert [e.item for e in many.results[0].items] == [e.item for e in rest.items[:3]]

        grown = await resolve(
            client.append_interactions(
                ids, [(scenario.eval_user, scenario.candidates[0])], if_match=detail.etag
            )
        )
        assert (grown.revision, grown.reused) == (2, False)
        with pytest.raises(ProblemError) as refused:
            await resolve(client.adapt(ids, pairs(scenario), scenario.candidates, if_match=1))
        assert (refused.value.status, refused.value.type) == (412, MISMATCH)

        await resolve(client.adapt("other.2", pairs(scenario), scenario.candidates))
        page = await resolve(client.list_scenarios(limit=1))
        assert [s.scenario for s in page.scenarios] == ["other.2"] and page.next == "other.2"
        listed = await every(client.iter_scenarios(limit=1))
        assert [s.scenario for s in listed] == ["other.2", ids]

        with pytest.raises(ProblemError) as stale:
            await resolve(client.delete_scenario(ids, if_match=1))
        assert stale.value.status == 412
        assert await resolve(client.delete_scenario(ids, if_match=2)) is None
        with pytest.raises(ProblemError) as gone:
            await resolve(client.get_scenario(ids, request_id="req-gone"))
        problem = gone.value
        assert (problem.status, problem.type, problem.title) == (404, UNKNOWN, problem.title)
        assert problem.instance == f"/scenarios/{ids}" and ids in (problem.detail or "")

    async with running(settings_for(registry)) as (app, _):
        await with_client(kind, app, steps)


def awkward_scenario(scenario: ScenarioIds) -> tuple[list[tuple[str, str]], list[str]]:
    """The scenario with users and items of awkward ids added: the users know one synthetic
    item each and the items one synthetic user each, so both are folded in."""
    interactions = pairs(scenario)
    interactions += [(user, scenario.candidates[k]) for k, user in enumerate(AWKWARD_USERS)]
    interactions += [(scenario.interactions[k]["user"], i) for k, i in enumerate(AWKWARD_ITEMS)]
    return interactions, [*scenario.candidates, *AWKWARD_ITEMS]


async def check_awkward_ids(client: Client | AsyncClient, scenario: ScenarioIds) -> None:
    interactions, candidates = awkward_scenario(scenario)
    for ids in AWKWARD_SCENARIOS:
        adapted = await resolve(client.adapt(ids, interactions, candidates))
        assert adapted.scenario == ids
        assert set(AWKWARD_USERS) <= set(adapted.folded_in.users)
        assert set(AWKWARD_ITEMS) <= set(adapted.folded_in.items)
        assert (await resolve(client.get_scenario(ids))).value.scenario == ids
        for user in AWKWARD_USERS:
            top = await resolve(client.recommend(ids, user, n=600, exclude=AWKWARD_ITEMS[:2]))
            served = {entry.item for entry in top.items}
            assert (top.user, top.scenario, top.source) == (user, ids, "adapted")
            assert AWKWARD_ITEMS[2] in served and not served & set(AWKWARD_ITEMS[:2])
        many = await resolve(client.recommend_many(ids, AWKWARD_USERS, exclude=AWKWARD_ITEMS))
        assert [result.user for result in many.results] == AWKWARD_USERS
    listed = await every(client.iter_scenarios(limit=2))
    assert sorted(s.scenario for s in listed) == sorted(AWKWARD_SCENARIOS)
    for ids in AWKWARD_SCENARIOS:
        await resolve(client.delete_scenario(ids))
    with pytest.raises(ProblemError) as gone:
        await resolve(client.recommend("promo:2024.05-x", AWKWARD_USERS[0]))
    assert (gone.value.status, gone.value.type) == (404, UNKNOWN)


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_awkward_ids_survive_the_url(registry, scenario, kind):
    async with running(settings_for(registry)) as (app, _):
        await with_client(kind, app, lambda client: check_awkward_ids(client, scenario))


def test_awkward_ids_and_a_token_over_a_real_server(registry, scenario, tmp_path):
    """uvicorn decodes the URL itself (not as httpx's ASGI transport does): the same checks
    over HTTP, with the admin token required."""
    env = {"S2META_REGISTRY": str(registry), "S2META_ADMIN_TOKEN": "secret-admin"}
    with serving(env, tmp_path / "serve.log") as base:
        with Client(base) as anonymous, pytest.raises(ProblemError) as refused:
            anonymous.delete_scenario("x")
        assert refused.value.status == 401
        with Client(base, token="secret-admin") as client:
            asyncio.run(check_awkward_ids(client, scenario))


async def test_problems_of_the_real_app(registry, scenario):
    async with (
        running(settings_for(registry)) as (app, _),
        AsyncClient("http://s2meta", transport=httpx.ASGITransport(app=app)) as client,
    ):
        with pytest.raises(ProblemError) as invalid:
            await client.adapt("s.1", pairs(scenario), scenario.candidates[:1])
        problem = invalid.value
        assert (problem.status, problem.instance) == (422, "/scenarios/s.1/adapt")
        assert problem.type == "urn:s2meta:problem:invalid-request"
        assert [error["loc"] for error in problem.errors] == [["body", "candidates"]]
        with pytest.raises(ProblemError) as unknown:
            await client.recommend("s:1", "u 1", request_id="trace-me")
        assert unknown.value.status == 404 and unknown.value.title
        assert unknown.value.instance == "/recommend"
        assert unknown.value.request_id == "trace-me"  # sent, echoed, kept on the error
