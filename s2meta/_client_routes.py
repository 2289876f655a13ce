"""Each route of the service as a `Call`: its method, its path with the ids percent-encoded,
its query, body and headers, and the model its answer parses into (service/schemas.py)."""

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx

from s2meta._client_common import Call, if_match, model, pairs
from service.schemas import (
    AdaptResponse,
    Readiness,
    RecommendManyResponse,
    RecommendResponse,
    ScenarioDetail,
    ScenarioPage,
)

T = TypeVar("T")


@dataclass(frozen=True)
class Versioned(Generic[T]):
    """A resource and its ETag (the quoted revision), to pass on as `if_match`."""

    value: T
    etag: str | None


def segment(scenario_id: str) -> str:
    """A scenario id as one path segment: every reserved character percent-encoded, and the
    dots of "." and ".." too, which URL normalisation would otherwise remove as dot segments."""
    quoted = quote(scenario_id, safe="")
    return quoted.replace(".", "%2E") if scenario_id in {".", ".."} else quoted


def scenario_path(scenario_id: str, *rest: str) -> str:
    return "/".join(["/scenarios", segment(scenario_id), *rest])


def adapt(
    scenario_id: str,
    interactions: Iterable[tuple[str, str]],
    candidates: Iterable[str],
    variant: str | None,
    seed: int | None,
    tag: int | str | None,
) -> Call[AdaptResponse]:
    body: dict[str, Any] = {"interactions": pairs(interactions), "candidates": list(candidates)}
    if variant is not None:
        body["variant"] = variant
    if seed is not None:
        body["seed"] = seed
    # Not idempotent for network errors: an adaptation that may have run is not sent again.
    return Call(
        "POST",
        scenario_path(scenario_id, "adapt"),
        model(AdaptResponse),
        json=body,
        headers=if_match(tag),
        idempotent=False,
    )


def append_interactions(
    scenario_id: str, interactions: Iterable[tuple[str, str]], tag: int | str | None
) -> Call[AdaptResponse]:
    return Call(
        "POST",
        scenario_path(scenario_id, "interactions"),
        model(AdaptResponse),
        json={"interactions": pairs(interactions)},
        headers=if_match(tag),
        idempotent=False,
    )


def recommend(
    scenario_id: str, user: str, n: int, exclude_seen: bool, exclude: Iterable[str]
) -> Call[RecommendResponse]:
    params = [("user", user), ("scenario", scenario_id), ("n", str(n))]
    params += [("exclude_seen", "true" if exclude_seen else "false")]
    params += [("exclude", item) for item in exclude]
    return Call("GET", "/recommend", model(RecommendResponse), params=params)


def recommend_many(
    scenario_id: str, users: Iterable[str], n: int, exclude_seen: bool, exclude: Iterable[str]
) -> Call[RecommendManyResponse]:
    body = {"users": list(users), "n": n, "exclude_seen": exclude_seen, "exclude": list(exclude)}
    # A POST that only reads: safe to send again.
    return Call(
        "POST",
        scenario_path(scenario_id, "recommendations"),
        model(RecommendManyResponse),
        json=body,
    )


def _detail(response: httpx.Response) -> Versioned[ScenarioDetail]:
    return Versioned(
        ScenarioDetail.model_validate_json(response.content), response.headers.get("ETag")
    )


def get_scenario(scenario_id: str) -> Call[Versioned[ScenarioDetail]]:
    return Call("GET", scenario_path(scenario_id), _detail)


def list_scenarios(after: str | None, limit: int) -> Call[ScenarioPage]:
    params = [("limit", str(limit)), *([("after", after)] if after is not None else [])]
    return Call("GET", "/scenarios", model(ScenarioPage), params=params)


def delete_scenario(scenario_id: str, tag: int | str | None) -> Call[None]:
    # Idempotent (RFC 9110): a retry after a lost answer finds the scenario gone (a 404).
    return Call("DELETE", scenario_path(scenario_id), lambda _: None, headers=if_match(tag))


def ready() -> Call[Readiness]:
    # A probe reports the state now: its 503 is the answer, not a reason to wait.
    return Call("GET", "/readyz", model(Readiness), retry=False)


def health() -> Call[dict[str, Any]]:
    return Call("GET", "/healthz", lambda response: response.json(), retry=False)
