"""A Python client of the s2meta service, sync (`Client`) and async (`AsyncClient`), on httpx.

    from s2meta.client import Client

    with Client("http://127.0.0.1:8000", token="admin-token") as client:
        adapted = client.adapt("promo:2024.05", [("u17", "sku-1")], ["sku-1", "sku-2"])
        top = client.recommend("promo:2024.05", "u17", n=5, exclude=["sku-2"])

Answers are the service's own response models (service/schemas.py): the client imports them
rather than keeping copies that could drift from the server. That costs the import of torch
(model.recommender's Variant; about 2 s), which the s2meta package depends on anyway; a
client-only distribution would need the schemas moved out of service/ first.

Ids are percent-encoded in paths and queries. 429 and 503 are retried per `RetryPolicy`
(Retry-After honoured, capped; else backoff with seeded jitter); a connection that could not
be made is retried for every call, one lost after sending only for the calls that read
(recommend, recommend_many, get and list) and for delete. Every other error answer raises
`ProblemError`, carrying the RFC 9457 problem; network errors raise httpx's own
(`httpx.TransportError`) once retries are spent. docs/client.md has more."""

import random
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import httpx

from s2meta import _client_routes as routes
from s2meta._client_async import AsyncClient
from s2meta._client_common import (
    DEFAULT_RETRY,
    Call,
    Problem,
    ProblemError,
    RetryPolicy,
    default_headers,
    for_call,
)
from s2meta._client_routes import Versioned
from service.schemas import (
    AdaptResponse,
    Readiness,
    RecommendManyResponse,
    RecommendResponse,
    ScenarioDetail,
    ScenarioPage,
    ScenarioSummary,
)

__all__ = ["AsyncClient", "Client", "Problem", "ProblemError", "RetryPolicy", "Versioned"]
T = TypeVar("T")


class Client:
    """The service at `base_url`. `token` is sent as a bearer token (the admin token for the
    writes, the read token for reads where one is set); `transport` replaces httpx's (tests);
    `sleep` is what waits between retries."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout: float = 30.0,
        retry: RetryPolicy = DEFAULT_RETRY,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._http = httpx.Client(
            base_url=base_url, headers=default_headers(token), timeout=timeout, transport=transport
        )
        self._policy, self._rng, self._sleep = retry, random.Random(retry.seed), sleep

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: Call[T], request_id: str | None) -> T:
        retrying = for_call(call, self._policy, self._rng)
        while True:
            try:
                response = self._http.send(call.request(self._http, request_id))
            except httpx.TransportError as error:
                wait = retrying.after_error(error)
                if wait is None:
                    raise
            else:
                wait = retrying.after_response(response)
                if wait is None:
                    return call.answer(response)
            self._sleep(wait)

    def adapt(
        self,
        scenario_id: str,
        interactions: Iterable[tuple[str, str]],
        candidates: Iterable[str],
        *,
        variant: str | None = None,
        seed: int | None = None,
        if_match: int | str | None = None,
        request_id: str | None = None,
    ) -> AdaptResponse:
        """Register the scenario's (user, item) interactions and pool, and adapt it.
        `if_match`: a revision, an ETag or "*"; a moved revision raises a 412 ProblemError."""
        call = routes.adapt(scenario_id, interactions, candidates, variant, seed, if_match)
        return self._send(call, request_id)

    def append_interactions(
        self,
        scenario_id: str,
        interactions: Iterable[tuple[str, str]],
        *,
        if_match: int | str | None = None,
        request_id: str | None = None,
    ) -> AdaptResponse:
        """Add (user, item) interactions to a scenario and re-adapt it."""
        return self._send(
            routes.append_interactions(scenario_id, interactions, if_match), request_id
        )

    def recommend(
        self,
        scenario_id: str,
        user: str,
        *,
        n: int = 10,
        exclude_seen: bool = True,
        exclude: Iterable[str] = (),
        request_id: str | None = None,
    ) -> RecommendResponse:
        """The user's top-n of the scenario's pool, leaving out the `exclude` items."""
        call = routes.recommend(scenario_id, user, n, exclude_seen, exclude)
        return self._send(call, request_id)

    def recommend_many(
        self,
        scenario_id: str,
        users: Iterable[str],
        *,
        n: int = 10,
        exclude_seen: bool = True,
        exclude: Iterable[str] = (),
        request_id: str | None = None,
    ) -> RecommendManyResponse:
        """Each user's top-n, in the users' order, ranked in one pass."""
        call = routes.recommend_many(scenario_id, users, n, exclude_seen, exclude)
        return self._send(call, request_id)

    def get_scenario(
        self, scenario_id: str, *, request_id: str | None = None
    ) -> Versioned[ScenarioDetail]:
        """The scenario's detail and its ETag."""
        return self._send(routes.get_scenario(scenario_id), request_id)

    def list_scenarios(
        self, *, after: str | None = None, limit: int = 100, request_id: str | None = None
    ) -> ScenarioPage:
        """One page of scenarios, by id, after `after`."""
        return self._send(routes.list_scenarios(after, limit), request_id)

    def iter_scenarios(self, *, limit: int = 100) -> Iterator[ScenarioSummary]:
        """Every scenario, a page of `limit` at a time."""
        after = None
        while True:
            page = self.list_scenarios(after=after, limit=limit)
            yield from page.scenarios
            if page.next is None:
                return
            after = page.next

    def delete_scenario(
        self, scenario_id: str, *, if_match: int | str | None = None, request_id: str | None = None
    ) -> None:
        self._send(routes.delete_scenario(scenario_id, if_match), request_id)

    def ready(self, *, request_id: str | None = None) -> Readiness:
        """/readyz, once (no retry): a 503 (no meta learner loaded) raises ProblemError."""
        return self._send(routes.ready(), request_id)

    def health(self, *, request_id: str | None = None) -> dict[str, Any]:
        """/healthz, once."""
        return self._send(routes.health(), request_id)
