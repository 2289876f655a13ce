"""Bad input at the edge: oversized bodies are refused unread (413), malformed Content-Length is
a 400, odd scenario ids are a 422 or a 404 (never a 5xx) while valid ones with colons and dots
work, user and item ids are opaque strings, and out-of-range numbers are a 422."""

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from conftest import running, settings_for
from problem_checks import assert_problem, urn
from starlette.types import Message, Receive, Scope, Send
from synthetic import ScenarioIds

from service.limits import BodySizeLimit
from service.settings import Settings

pytestmark = pytest.mark.anyio

LIMIT = 64 * 1024  # the body limit of these tests' apps: a real scenario's body fits


def limited(registry: Path, backend: str = "memory", namespace: str = "s") -> Settings:
    """Settings with the small body limit these tests probe, and no registry polling."""
    return settings_for(registry, backend, namespace, max_body_bytes=LIMIT, reload_poll_s=60)


def big_body(size: int) -> bytes:
    """Valid JSON of exactly `size` bytes (padded with whitespace): a 422 if it were read."""
    body = json.dumps({"interactions": [], "candidates": []}).encode()
    return body + b" " * (size - len(body))


class Chunks:
    """A request body streamed in 1 KiB chunks (so no Content-Length), counting what is pulled."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.pulled = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while self.pulled < self.total:
            self.pulled += 1024
            yield b" " * 1024


@pytest.fixture
def adapt_url(scenario) -> str:
    return f"/scenarios/{scenario.scenario_id}/adapt"


async def nothing_stored(client) -> None:
    listed = await client.get("/scenarios")
    assert listed.status_code == 200 and listed.json()["scenarios"] == []


# ---- body size --------------------------------------------------------------------------------


async def test_oversized_content_length_is_413_and_stores_nothing(registry, adapt_url):
    async with running(limited(registry)) as (_, client):
        response = await client.post(
            adapt_url, content=big_body(LIMIT + 1), headers={"Content-Type": "application/json"}
        )
        body = assert_problem(response, 413)
        assert body["detail"] == f"request body larger than {LIMIT} bytes"
        assert body["title"] == "Request Entity Too Large"
        assert response.headers["connection"] == "close"
        assert int(response.headers["content-length"]) == len(response.content)
        await nothing_stored(client)
        # Exactly the limit is read and validated as usual.
        response = await client.post(adapt_url, content=big_body(LIMIT))
        assert response.status_code == 422, response.text


@pytest.mark.parametrize("declared", [str(LIMIT + 1), str(10**12), "9" * 5000])
async def test_declared_length_alone_is_refused_before_the_body_is_read(
    registry, adapt_url, declared
):
    body = Chunks(10 * LIMIT)
    async with running(limited(registry)) as (_, client):
        response = await client.post(adapt_url, content=body, headers={"Content-Length": declared})
        assert_problem(response, 413, detail="larger than")
        assert body.pulled == 0
        # The refusal is counted like any other response.
        metrics = (await client.get("/metrics")).text
        assert 'status="413"' in metrics
        await nothing_stored(client)


async def test_oversized_chunked_body_is_413_as_soon_as_it_passes_the_limit(registry, adapt_url):
    body = Chunks(1000 * LIMIT)  # 4 MB, never pulled whole
    async with running(limited(registry)) as (_, client):
        response = await client.post(
            adapt_url, content=body, headers={"Content-Type": "application/json"}
        )
        assert "content-length" not in response.request.headers
        body_ = assert_problem(response, 413)
        assert body_["detail"] == f"request body larger than {LIMIT} bytes"
        assert LIMIT < body.pulled <= LIMIT + 1024
        await nothing_stored(client)
        # A small chunked body is passed through whole.
        response = await client.post(
            adapt_url, content=Chunks(2048), headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 422, response.text


@pytest.mark.parametrize("http_version", ["1.1", "2"])
async def test_a_body_without_length_headers_is_counted_unless_http1_says_there_is_none(
    http_version,
):
    """HTTP/1.1 without Content-Length or Transfer-Encoding has no body, so the request goes
    through as it is; HTTP/2 streams a body without either, and it is still counted."""
    pulled: list[bytes] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        while (message := await receive())["type"] == "http.request":
            pulled.append(message["body"])
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    chunks = iter([b"x" * 700, b"x" * 700, b""])

    async def receive() -> Message:
        body = next(chunks)
        return {"type": "http.request", "body": body, "more_body": bool(body)}

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "http_version": http_version, "method": "GET", "headers": []}
    await BodySizeLimit(app, max_bytes=1024)(scope, receive, send)
    status = sent[0]["status"]
    if http_version == "1.1":
        assert status == 200 and len(pulled) == 3  # the app got the stream untouched
    else:
        assert status == 413 and len(pulled) == 1  # cut when the count passed 1 KiB


@pytest.mark.parametrize("value", ["abc", "-1", "+5", "1.5", "5, 5", "0x10", ""])
async def test_malformed_content_length_is_400(registry, adapt_url, value):
    async with running(limited(registry)) as (_, client):
        response = await client.post(adapt_url, content=b"{}", headers={"Content-Length": value})
        assert_problem(response, 400, detail="Content-Length")


async def test_conflicting_content_lengths_are_400(registry, adapt_url):
    async with running(limited(registry)) as (_, client):
        headers = [("Content-Length", "2"), ("Content-Length", "3")]
        response = await client.post(adapt_url, content=b"{}", headers=headers)
        assert_problem(response, 400, detail="conflicting")


# ---- scenario ids -----------------------------------------------------------------------------

# (raw path segment, expected status of POST /scenarios/{segment}/adapt)
BAD_PATH_IDS = {
    "129 chars": ("a" * 129, 422),
    "10k chars": ("a" * 10_000, 422),
    "empty": ("", 404),  # /scenarios//adapt matches no route
    "unicode": ("caf%C3%A9", 422),
    "emoji": ("%F0%9F%98%80", 422),
    "slash": ("a/b", 404),
    "encoded slash": ("a%2Fb", 404),  # decoded before routing: /scenarios/a/b/adapt
    "double-encoded slash": ("a%252Fb", 422),  # arrives as a%2Fb: '%' is not allowed
    "space": ("a%20b", 422),
    "newline": ("a%0Ab", 422),
    "nul": ("a%00b", 422),
    "backslash": ("a%5Cb", 422),
    "question mark": ("a%3Fb", 422),
    "hash": ("a%23b", 422),
    "star": ("*", 422),
    "comma and semicolon": ("a,b;c", 422),
}


@pytest.mark.parametrize("segment,status", BAD_PATH_IDS.values(), ids=BAD_PATH_IDS.keys())
async def test_bad_scenario_ids_in_the_path(registry, scenario, segment, status):
    async with running(limited(registry)) as (_, client):
        response = await client.post(f"/scenarios/{segment}/adapt", json=scenario.body())
        if status == 422:  # the id's field error; a 404 is no route, a plain HTTP error
            body = assert_problem(response, 422, urn("invalid-request"))
            assert [e["loc"] for e in body["errors"]] == [["path", "scenario_id"]]
        else:
            assert_problem(response, status)
        for method in ("GET", "DELETE"):
            other = await client.request(method, f"/scenarios/{segment}")
            # /scenarios/ redirects to /scenarios (307), /scenarios/a/b is no route (404).
            expected = {307} if segment == "" else {404} if status == 404 else {422}
            assert other.status_code in expected, (method, other.text)
        await nothing_stored(client)


BAD_QUERY_IDS = {
    "129 chars": "a" * 129,
    "10k chars": "a" * 10_000,
    "empty": "",
    "unicode": "caf\u00e9",
    "emoji": "\U0001f600",
    "slash": "a/b",
    "encoded slash": "a%2Fb",
    "space": "a b",
    "newline": "a\nb",
    "nul": "a\x00b",
    "separators": "a;b,c&d=e",
    "star": "*",
}


@pytest.mark.parametrize("scenario_id", BAD_QUERY_IDS.values(), ids=BAD_QUERY_IDS.keys())
async def test_bad_scenario_ids_in_the_query(registry, scenario_id):
    async with running(limited(registry)) as (_, client):
        response = await client.get("/recommend", params={"user": "u", "scenario": scenario_id})
        body = assert_problem(response, 422, urn("invalid-request"), "query.scenario")
        assert [e["loc"] for e in body["errors"]] == [["query", "scenario"]]
        response = await client.get("/scenarios", params={"after": scenario_id})
        assert response.status_code == 422, response.text


async def test_valid_ids_with_colons_and_dots_work(registry, scenario, namespace, backend):
    # Ids that look like the store's own key layout, or are only separators, are just ids.
    ids = ["tenant:42:lastfm.v2", "scenario:x", "revision:1", ":", "...", "a-b.c:d"]
    async with running(limited(registry, backend, namespace)) as (_, client):
        for scenario_id in ids:
            response = await client.post(f"/scenarios/{scenario_id}/adapt", json=scenario.body())
            assert response.status_code == 200, (scenario_id, response.text)
            assert response.json()["scenario"] == scenario_id
        for scenario_id in ids:
            detail = await client.get(f"/scenarios/{scenario_id}")
            assert detail.status_code == 200 and detail.json()["scenario"] == scenario_id
            assert detail.json()["revision"] == 1  # no id overwrote another
            served = await client.get(
                "/recommend", params={"user": scenario.eval_user, "scenario": scenario_id}
            )
            assert served.status_code == 200 and served.json()["scenario"] == scenario_id
        listed = (await client.get("/scenarios")).json()["scenarios"]
        assert sorted(s["scenario"] for s in listed) == sorted(ids)
        assert (await client.delete("/scenarios/scenario:x")).status_code == 204
        assert (await client.get("/scenarios/scenario:x")).status_code == 404
        assert (await client.get("/scenarios/revision:1")).status_code == 200
        unknown = await client.get("/recommend", params={"user": "u", "scenario": "no:such.id"})
        assert_problem(unknown, 404, urn("unknown-scenario"), "no:such.id")


# ---- user and item ids ------------------------------------------------------------------------

ODD_IDS = [
    "caf\u00e9",
    "\u7528\u6237",
    "\U0001f600",
    "a/b",
    "a%2Fb",
    "a:b:c",
    "a b",
    "../../etc/passwd",
    "a;b,c&d=e?f#g",
    '"quoted"',
    "\u202eright-to-left",
    "x" * 256,
]


async def test_odd_user_and_item_ids_are_data_and_folded_in(registry, scenario):
    body = scenario.body()
    known_item = scenario.candidates[0]
    known_user = scenario.interactions[0]["user"]
    body["interactions"] = [
        *scenario.interactions,
        *({"user": odd, "item": known_item} for odd in ODD_IDS),
        *({"user": known_user, "item": odd} for odd in ODD_IDS),
    ]
    body["candidates"] = [*scenario.candidates, *ODD_IDS]
    async with running(limited(registry)) as (_, client):
        response = await client.post(f"/scenarios/{scenario.scenario_id}/adapt", json=body)
        assert response.status_code == 200, response.text
        # Unknown ids with interactions are folded in, not ignored.
        folded = response.json()["folded_in"]
        assert sorted(folded["users"]) == sorted(ODD_IDS)
        assert sorted(folded["items"]) == sorted(ODD_IDS)
        assert response.json()["used_interactions"] == len(body["interactions"])
        pool = set(body["candidates"])
        for odd in ODD_IDS:
            served = await client.get(
                "/recommend", params={"user": odd, "scenario": scenario.scenario_id, "n": 1000}
            )
            assert served.status_code == 200, (odd, served.text)
            assert served.json()["user"] == odd and served.json()["source"] == "adapted"
            items = {i["item"] for i in served.json()["items"]}
            assert items <= pool and known_item not in items  # its own item is seen
            assert set(ODD_IDS) <= items  # odd item ids come back as they were given


HUGE = "x" * 257
# name: the body, made from the scenario
BAD_ID_BODIES: dict[str, Callable[[ScenarioIds], dict]] = {
    "huge user": lambda s: s.body(
        interactions=[*s.interactions, {"user": HUGE, "item": s.candidates[0]}]
    ),
    "huge item": lambda s: s.body(
        interactions=[*s.interactions, {"user": "u", "item": HUGE}],
        candidates=[*s.candidates, HUGE],
    ),
    "huge candidate": lambda s: s.body(candidates=[*s.candidates, HUGE]),
    "empty user": lambda s: s.body(interactions=[{"user": "", "item": s.candidates[0]}]),
    "empty candidate": lambda s: s.body(candidates=[*s.candidates, ""]),
    "tab in item": lambda s: s.body(candidates=[*s.candidates, "a\tb"]),
    "DEL in user": lambda s: s.body(interactions=[{"user": "a\x7f", "item": s.candidates[0]}]),
    "number as id": lambda s: s.body(candidates=[*s.candidates, 5]),
    "null id": lambda s: s.body(interactions=[{"user": None, "item": s.candidates[0]}]),
}


@pytest.mark.parametrize("make_body", BAD_ID_BODIES.values(), ids=BAD_ID_BODIES.keys())
async def test_huge_and_control_character_ids_in_a_body_are_422(
    registry, scenario, adapt_url, make_body
):
    async with running(limited(registry)) as (_, client):
        response = await client.post(adapt_url, json=make_body(scenario))
        body = assert_problem(response, 422, urn("invalid-request"))
        assert body["errors"] and all(e["loc"][0] == "body" for e in body["errors"])
        await nothing_stored(client)


@pytest.mark.parametrize(
    "user", [HUGE, "", "a\nb", "a\x00b"], ids=["huge", "empty", "newline", "nul"]
)
async def test_huge_and_control_character_users_in_a_query_are_422(registry, scenario, user):
    async with running(limited(registry)) as (_, client):
        response = await client.get(
            "/recommend", params={"user": user, "scenario": scenario.scenario_id}
        )
        assert response.status_code == 422, response.text


# ---- numbers out of range ---------------------------------------------------------------------


@pytest.mark.parametrize("n", ["0", "-1", "1001", "99999999999999999999999", "1.5", "ten", ""])
async def test_n_out_of_range_is_422(registry, n):
    async with running(limited(registry)) as (_, client):
        response = await client.get("/recommend", params={"user": "u", "scenario": "s", "n": n})
        assert response.status_code == 422, response.text


@pytest.mark.parametrize("limit", ["0", "-1", "1001", "99999999999999999999999", "1.5", "all"])
async def test_limit_out_of_range_is_422(registry, limit):
    async with running(limited(registry)) as (_, client):
        response = await client.get("/scenarios", params={"limit": limit})
        assert response.status_code == 422, response.text


@pytest.mark.parametrize("seed", [-1, 2**32, 2**64, 10**30, 1.5, "7", True, [1], {}])
async def test_seed_out_of_range_is_422(registry, scenario, adapt_url, seed):
    async with running(limited(registry)) as (_, client):
        response = await client.post(adapt_url, json=scenario.body(seed=seed))
        assert response.status_code == 422, (seed, response.text)
        await nothing_stored(client)


async def test_seed_bounds_are_accepted(registry, scenario, adapt_url):
    async with running(limited(registry)) as (_, client):
        for seed in (0, 2**32 - 1):
            response = await client.post(adapt_url, json=scenario.body(seed=seed))
            assert response.status_code == 200, (seed, response.text)
