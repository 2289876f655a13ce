"""The asyncio client; s2meta.client documents both and re-exports this one."""

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, TypeVar

import httpx

from s2meta import _client_routes as routes
from s2meta._client_common import DEFAULT_RETRY, Call, RetryPolicy, default_headers, for_call
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

T = TypeVar("T")


class AsyncClient:
    """The service at `base_url`, for asyncio; the arguments are Client's, with an async
    transport and sleep."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout: float = 30.0,
        retry: RetryPolicy = DEFAULT_RETRY,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._http = httpx.AsyncClient(
            base_url=base_url, headers=default_headers(token), timeout=timeout, transport=transport
        )
        self._policy, self._rng, self._sleep = retry, random.Random(retry.seed), sleep

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, call: Call[T], request_id: str | None) -> T:
        retrying = for_call(call, self._policy, self._rng)
        while True:
            try:
                response = await self._http.send(call.request(self._http, request_id))
            except httpx.TransportError as error:
                wait = retrying.after_error(error)
                if wait is None:
                    raise
            else:
                wait = retrying.after_response(response)
                if wait is None:
                    return call.answer(response)
            await self._sleep(wait)

    async def adapt(
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
        return await self._send(call, request_id)

    async def append_interactions(
        self,
        scenario_id: str,
        interactions: Iterable[tuple[str, str]],
        *,
        if_match: int | str | None = None,
        request_id: str | None = None,
    ) -> AdaptResponse:
        """Add (user, item) interactions to a scenario and re-adapt it."""
        return await self._send(
            routes.append_interactions(scenario_id, interactions, if_match), request_id
        )

    async def recommend(
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
        return await self._send(call, request_id)

    async def recommend_many(
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
        return await self._send(call, request_id)

    async def get_scenario(
        self, scenario_id: str, *, request_id: str | None = None
    ) -> Versioned[ScenarioDetail]:
        """The scenario's detail and its ETag."""
        return await self._send(routes.get_scenario(scenario_id), request_id)

    async def list_scenarios(
        self, *, after: str | None = None, limit: int = 100, request_id: str | None = None
    ) -> ScenarioPage:
        """One page of scenarios, by id, after `after`."""
        return await self._send(routes.list_scenarios(after, limit), request_id)

    async def iter_scenarios(self, *, limit: int = 100) -> AsyncIterator[ScenarioSummary]:
        """Every scenario, a page of `limit` at a time."""
        after = None
        while True:
            page = await self.list_scenarios(after=after, limit=limit)
            for summary in page.scenarios:
                yield summary
            if page.next is None:
                return
            after = page.next

    async def delete_scenario(
        self, scenario_id: str, *, if_match: int | str | None = None, request_id: str | None = None
    ) -> None:
        await self._send(routes.delete_scenario(scenario_id, if_match), request_id)

    async def ready(self, *, request_id: str | None = None) -> Readiness:
        """/readyz, once (no retry): a 503 (no meta learner loaded) raises ProblemError."""
        return await self._send(routes.ready(), request_id)

    async def health(self, *, request_id: str | None = None) -> dict[str, Any]:
        """/healthz, once."""
        return await self._send(routes.health(), request_id)
