"""Every error is an RFC 9457 problem (application/problem+json: type, title, status, detail,
instance), one shape throughout: the service's own errors (service.errors.HTTP_ERRORS),
request validation (each field listed), FastAPI's and Starlette's HTTP errors (401 with
WWW-Authenticate, 404, 405 with Allow, 400 on an unreadable body) and an unexpected error (a
logged 500 that leaks nothing). Each answer also validates against the OpenAPI document's
schema. The document itself is tested in tests/test_openapi.py."""

import logging
from collections.abc import Iterator
from unittest.mock import AsyncMock

import httpx
import jsonschema
import pytest
from conftest import running, settings_for
from problem_checks import assert_problem, urn

from model.errors import ArtifactError
from service.errors import (
    AdaptationInputError,
    ConflictError,
    NoMetaLearnerError,
    QueueFullError,
    RevisionMismatchError,
    ScenarioNotFoundError,
    StoreError,
)

pytestmark = pytest.mark.anyio
RETRY_AFTER_S = 7
TOKEN = "problem-admin-token"


@pytest.fixture
def settings(registry):
    return settings_for(registry, admin_token=TOKEN, retry_after_s=RETRY_AFTER_S, reload_poll_s=60)


def conforms(app, response: httpx.Response, status: int) -> None:
    """The body validates against the schema the OpenAPI document declares for it."""
    document = app.openapi()
    name = "ValidationProblem" if status == 422 else "Problem"
    # The components ride along, so that the schema's $refs resolve within it.
    schema = {**document["components"]["schemas"][name], "components": document["components"]}
    jsonschema.Draft202012Validator(schema).validate(response.json())


# (error raised by the service, status, type slug, Retry-After sent, a piece of the detail)
FIELDS = ("error", "status", "slug", "retry", "detail")
MAPPED = {
    "unknown scenario": (ScenarioNotFoundError("s:1"), 404, "unknown-scenario", False, "'s:1'"),
    "not adaptable": (AdaptationInputError("too few"), 422, "not-adaptable", False, "too few"),
    "queue full": (QueueFullError("9 running"), 429, "queue-full", True, "9 running"),
    "revision mismatch": (RevisionMismatchError("is 3"), 412, "revision-mismatch", False, "3"),
    "conflict": (ConflictError("moved on"), 409, "conflict", False, "moved on"),
    "no meta learner": (NoMetaLearnerError("none"), 503, "no-meta-learner", False, "none"),
    "meta learner unavailable": (
        ArtifactError("bad file"),
        503,
        "meta-learner-unavailable",
        False,
        "bad file",
    ),
    "store unavailable": (StoreError("timeout"), 503, "store-unavailable", True, "timeout"),
}


@pytest.mark.parametrize(
    ("error", "status", "slug", "retry", "detail"), MAPPED.values(), ids=MAPPED
)
async def test_each_service_error_is_its_problem(settings, error, status, slug, retry, detail):
    async with running(settings) as (app, client):
        app.state.service.describe = AsyncMock(side_effect=error)
        response = await client.get("/scenarios/s:1")
        body = assert_problem(response, status, urn(slug), detail)
        assert "errors" not in body
        assert response.headers.get("retry-after") == (str(RETRY_AFTER_S) if retry else None)
        conforms(app, response, status)
        # The hot route (a DirectRoute, answered outside the router) answers the same way.
        app.state.service.recommend = AsyncMock(side_effect=error)
        served = await client.get("/recommend", params={"user": "u", "scenario": "s:1"})
        assert_problem(served, status, urn(slug), detail)
        assert served.headers.get("retry-after") == response.headers.get("retry-after")


async def test_invalid_fields_are_each_listed(settings, scenario):
    body = {"interactions": "none", "candidates": [5, "ok"], "seed": -1, "colour": "red"}
    async with running(settings) as (app, client):
        response = await client.post(
            "/scenarios/a%20b/adapt", json=body, headers={"Authorization": f"Bearer {TOKEN}"}
        )
        problem = assert_problem(response, 422, urn("invalid-request"))
        locs = {tuple(e["loc"]): e for e in problem["errors"]}
        assert set(locs) >= {
            ("path", "scenario_id"),
            ("body", "interactions"),
            ("body", "candidates", 0),
            ("body", "seed"),
            ("body", "colour"),
        }
        # Each error is loc, msg and type only: pydantic's `input` would echo the request.
        assert all(set(e) == {"loc", "msg", "type"} for e in problem["errors"])
        assert locs[("body", "colour")]["type"] == "extra_forbidden"
        assert "(and " in problem["detail"]  # the first few in one line, the rest counted
        conforms(app, response, 422)
        query = await client.get("/recommend", params={"scenario": "s", "n": "0"})
        problem = assert_problem(query, 422, urn("invalid-request"))
        assert {tuple(e["loc"]) for e in problem["errors"]} == {("query", "user"), ("query", "n")}


async def test_a_body_that_is_not_json_lists_the_error(settings):
    async with running(settings) as (_, client):
        response = await client.post(
            "/scenarios/s/adapt",
            content=b'{"interactions": [',
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        )
        problem = assert_problem(response, 422, urn("invalid-request"))
        assert [e["type"] for e in problem["errors"]] == ["json_invalid"]


async def test_auth_errors_are_problems_with_their_header(settings):
    async with running(settings) as (app, client):
        missing = await client.delete("/scenarios/s")
        assert_problem(missing, 401, detail="admin token required")
        assert missing.headers["www-authenticate"] == "Bearer"
        conforms(app, missing, 401)
        wrong = await client.delete("/scenarios/s", headers={"Authorization": "Bearer nope"})
        assert_problem(wrong, 403, detail="not accepted")
        assert "www-authenticate" not in wrong.headers


async def test_unknown_path_and_method_are_plain_problems(settings):
    async with running(settings) as (app, client):
        body = assert_problem(await client.get("/no/such/route"), 404)
        assert body["title"] == "Not Found"
        for path in ("/scenarios/s", "/recommend"):
            refused = await client.put(path)
            assert_problem(refused, 405, detail="PUT is not allowed")
            conforms(app, refused, 405)
        # Every method of the path, not only the first route's (GET and DELETE here).
        assert refused.headers["allow"] == "GET"
        assert (await client.put("/scenarios/s")).headers["allow"] == "DELETE, GET"


async def test_an_unreadable_body_is_a_400_problem(settings):
    async with running(settings) as (_, client):
        response = await client.post(
            "/scenarios/s/adapt",
            content=b'{"interactions": "\xff\xfe"}',
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        )
        assert_problem(response, 400)


@pytest.fixture
def server_errors(caplog) -> Iterator[pytest.LogCaptureFixture]:
    with caplog.at_level(logging.ERROR, logger="service.errors"):
        yield caplog


async def test_an_unexpected_error_is_a_logged_500_that_leaks_nothing(settings, server_errors):
    secret = "internal state: password=hunter2"
    async with running(settings) as (app, _):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://s2meta") as client:
            for path, method in (("/scenarios/s", "describe"), ("/recommend", "recommend")):
                setattr(app.state.service, method, AsyncMock(side_effect=RuntimeError(secret)))
                response = await client.get(path, params={"user": "u", "scenario": "s"})
                body = assert_problem(response, 500, detail="unexpected error")
                assert "hunter2" not in response.text and "Traceback" not in response.text
                assert body["title"] == "Internal Server Error"
                conforms(app, response, 500)
    logged = [r for r in server_errors.records if r.exc_info and r.exc_info[1] is not None]
    assert [str(r.exc_info[1]) for r in logged] == [secret, secret]
    assert "GET /scenarios/s" in logged[0].getMessage()
