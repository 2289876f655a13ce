"""Thin routers: authorise and validate at the edge, call the ScenarioService; its errors are
answered by the table in service.errors."""

from typing import Annotated, Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from pydantic_core import to_json

from service.auth import admin, bearer, optional_auth, reader, require_reader
from service.direct_routes import DirectRoute, query_parameters
from service.preconditions import etag, parse_if_match
from service.scenarios import ScenarioService
from service.schemas import (
    SCENARIO_ID_PATTERN,
    AdaptRequest,
    AdaptResponse,
    AppendRequest,
    Readiness,
    RecommendManyRequest,
    RecommendManyResponse,
    RecommendQuery,
    RecommendResponse,
    ScenarioDetail,
    ScenarioPage,
    ScenarioSummary,
)

ScenarioId = Annotated[str, Path(pattern=SCENARIO_ID_PATTERN, description="scenario id")]
IfMatchHeader = Annotated[
    str | None,
    Header(
        alias="If-Match",
        description="only if the scenario is at one of these revisions, as its ETag gives them "
        '(`"7"`), or `*`: stored at all; else 412',
    ),
]


async def scenario_service(request: Request) -> ScenarioService:
    return request.app.state.service


Service = Annotated[ScenarioService, Depends(scenario_service)]

SCENARIOS, RECOMMENDATIONS, OPERATIONS = "scenarios", "recommendations", "operations"
ETAG_HEADER = {"ETag": {"description": "the scenario's revision", "schema": {"type": "string"}}}
# Statuses each kind of route can answer besides its own; service.openapi gives every error
# its problem+json content and headers.
READ_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "read token required"},
    403: {"description": "read token not accepted"},
    404: {"description": "unknown scenario"},
    503: {"description": "store unreachable or no meta learner loaded"},
}
WRITE_ERRORS: dict[int | str, dict[str, Any]] = {
    **READ_ERRORS,
    401: {"description": "admin token required"},
    403: {"description": "admin token not accepted"},
    412: {"description": "If-Match names another revision"},
}
BODY_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "body not UTF-8, or a malformed Content-Length"},
    413: {"description": "body larger than S2META_MAX_BODY_BYTES"},
    422: {"description": "invalid fields, or a scenario that cannot be adapted"},
}
# What the routes that adapt (adapt, append) answer.
ADAPTING: dict[int | str, dict[str, Any]] = {
    200: {"headers": ETAG_HEADER},
    **WRITE_ERRORS,
    **BODY_ERRORS,
    429: {"description": "adaptation queue full; see Retry-After"},
}
router = APIRouter()


def recommend_query(request: Request) -> RecommendQuery:
    """Parsed as Starlette's QueryParams parses it (the last of repeated keys wins; `exclude`
    repeats), into a plain dict, cheaper than the multi-dict (docs/performance.md)."""
    fields: dict[str, Any] = {}
    excluded = []
    query = request.scope["query_string"].decode("latin-1")
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key == "exclude":
            excluded.append(value)
        else:
            fields[key] = value
    if excluded:
        fields["exclude"] = excluded
    try:
        return RecommendQuery.model_validate(fields)
    except ValidationError as error:
        raise RequestValidationError(
            [{**e, "loc": ("query", *e["loc"])} for e in error.errors(include_url=False)]
        ) from error


# The hot route, a DirectRoute declared first (routes are matched in order): it checks the
# token, validates its query and encodes its answer itself (docs/performance.md). OpenAPI
# still documents it from the same models, and the fuzz tests hold answers to them.
async def recommend(request: Request) -> Response:
    if request.app.state.settings.read_token is not None:  # else open: no header to parse
        await require_reader(request, await bearer(request))
    query = recommend_query(request)
    service: ScenarioService = request.app.state.service
    body = await service.recommend(
        query.scenario, query.user, query.n, query.exclude_seen, query.exclude
    )
    return Response(to_json(body), media_type="application/json")


router.add_api_route(
    "/recommend",
    recommend,
    methods=["GET"],
    route_class_override=DirectRoute,
    response_model=RecommendResponse,
    responses={**READ_ERRORS, 422: {"description": "invalid query parameters"}},
    openapi_extra={
        "parameters": query_parameters(RecommendQuery),
        "security": [{bearer.scheme_name: []}, {}],
    },
    operation_id="recommend",
    tags=[RECOMMENDATIONS],
    summary="Top-n of a scenario's pool for a user",
)


@router.post(
    "/scenarios/{scenario_id}/recommendations",
    response_model=RecommendManyResponse,
    dependencies=reader,
    responses={**READ_ERRORS, **BODY_ERRORS, 422: {"description": "invalid fields"}},
    openapi_extra=optional_auth,
    operation_id="recommendMany",
    tags=[RECOMMENDATIONS],
    summary="Top-n for many users of one scenario, ranked in one pass",
)
async def recommend_many(
    scenario_id: ScenarioId, body: RecommendManyRequest, service: Service
) -> Response:
    answer = await service.recommend_many(
        scenario_id, body.users, body.n, body.exclude_seen, body.exclude
    )
    return Response(to_json(answer), media_type="application/json")


def _with_etag(response: Response, answer: dict[str, Any]) -> dict[str, Any]:
    response.headers["ETag"] = etag(int(answer["revision"]))
    return answer


@router.post(
    "/scenarios/{scenario_id}/adapt",
    response_model=AdaptResponse,
    dependencies=admin,
    responses={**ADAPTING, 404: {"description": "not answered: an adapt creates the scenario"}},
    operation_id="adaptScenario",
    tags=[SCENARIOS],
    summary="Register a scenario's pool and interactions and adapt a recommender for it",
)
async def adapt(
    scenario_id: ScenarioId,
    body: AdaptRequest,
    service: Service,
    response: Response,
    if_match: IfMatchHeader = None,
) -> dict[str, Any]:
    answer = await service.writes.adapt(
        scenario_id,
        [(i.user, i.item) for i in body.interactions],
        body.candidates,
        body.variant,
        body.seed,
        parse_if_match(if_match),
        body.meta_learner,
    )
    return _with_etag(response, answer)


@router.post(
    "/scenarios/{scenario_id}/interactions",
    response_model=AdaptResponse,
    dependencies=admin,
    responses={
        **ADAPTING,
        409: {"description": "other writes kept landing during the append; retry"},
    },
    operation_id="appendInteractions",
    tags=[SCENARIOS],
    summary="Add interactions to a scenario and adapt it again (a new revision)",
)
async def append(
    scenario_id: ScenarioId,
    body: AppendRequest,
    service: Service,
    response: Response,
    if_match: IfMatchHeader = None,
) -> dict[str, Any]:
    interactions = [(i.user, i.item) for i in body.interactions]
    answer = await service.writes.append(scenario_id, interactions, parse_if_match(if_match))
    return _with_etag(response, answer)


@router.get(
    "/scenarios",
    response_model=ScenarioPage,
    dependencies=reader,
    responses={key: READ_ERRORS[key] for key in (401, 403, 503)},
    openapi_extra=optional_auth,
    operation_id="listScenarios",
    tags=[SCENARIOS],
    summary="The scenarios in id order, a page at a time",
)
async def list_scenarios(
    service: Service,
    after: Annotated[str | None, Query(pattern=SCENARIO_ID_PATTERN)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> ScenarioPage:
    page = await service.list_scenarios(after, limit)
    return ScenarioPage(
        scenarios=[ScenarioSummary.model_validate(meta) for meta in page],
        next=str(page[-1]["scenario"]) if len(page) == limit else None,
    )


@router.get(
    "/scenarios/{scenario_id}",
    response_model=ScenarioDetail,
    dependencies=reader,
    responses={200: {"headers": ETAG_HEADER}, **READ_ERRORS},
    openapi_extra=optional_auth,
    operation_id="getScenario",
    tags=[SCENARIOS],
    summary="A scenario's current revision: metadata and learning trace",
)
async def describe(scenario_id: ScenarioId, service: Service, response: Response) -> dict:
    return _with_etag(response, await service.describe(scenario_id))


@router.delete(
    "/scenarios/{scenario_id}",
    status_code=204,
    dependencies=admin,
    responses=WRITE_ERRORS,
    operation_id="deleteScenario",
    tags=[SCENARIOS],
    summary="Delete a scenario",
)
async def delete(
    scenario_id: ScenarioId, service: Service, if_match: IfMatchHeader = None
) -> Response:
    await service.writes.delete(scenario_id, parse_if_match(if_match))
    return Response(status_code=204)


@router.get("/healthz", operation_id="liveness", tags=[OPERATIONS], summary="The process is up")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"description": "no meta learner loaded yet"}},
    operation_id="readiness",
    tags=[OPERATIONS],
    summary="A meta learner is loaded; `degraded` names what shared dependency is unreachable",
)
async def readyz(service: Service) -> dict:
    version, causes = await service.readiness()
    return {"status": "degraded" if causes else "ready", "meta_learner": version, "causes": causes}


@router.get(
    "/metrics",
    response_class=Response,
    operation_id="metrics",
    tags=[OPERATIONS],
    summary="Prometheus metrics",
)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
