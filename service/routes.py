"""Thin routers: authorise and validate at the edge, call the ScenarioService; its errors are
answered by the table in service.errors."""

import secrets
from typing import Annotated
from urllib.parse import parse_qsl

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import SecretStr, ValidationError
from pydantic_core import to_json

from service.direct_routes import DirectRoute, query_parameters
from service.scenarios import ScenarioService
from service.schemas import (
    SCENARIO_ID_PATTERN,
    AdaptRequest,
    AdaptResponse,
    InvalidInput,
    Problem,
    RecommendQuery,
    RecommendResponse,
    ScenarioDetail,
    ScenarioPage,
    ScenarioSummary,
)

ScenarioId = Annotated[str, Path(pattern=SCENARIO_ID_PATTERN, description="scenario id")]
bearer = HTTPBearer(
    auto_error=False,
    description="the admin token (S2META_ADMIN_TOKEN), or for the read routes the read token "
    "(S2META_READ_TOKEN) when one is set",
)


# The dependencies are coroutines although they do no I/O: FastAPI runs a plain function
# dependency on a worker thread, a thread hop per request for nothing.
async def scenario_service(request: Request) -> ScenarioService:
    return request.app.state.service


Service = Annotated[ScenarioService, Depends(scenario_service)]


def _authorise(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None,
    accepted: list[SecretStr],
    role: str,
) -> None:
    """Let the request through if it carries one of the accepted bearer tokens (compared in
    constant time); count and refuse it otherwise. Tokens are never logged."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        request.app.state.metrics.auth_failures.labels(role=role, reason="missing").inc()
        raise HTTPException(
            401,
            f"{role} token required (Authorization: Bearer <token>)",
            {"WWW-Authenticate": "Bearer"},
        )
    given = credentials.credentials.encode()
    # Every token is compared (no early exit), so timing says nothing about which matched.
    matches = [
        secrets.compare_digest(given, token.get_secret_value().encode()) for token in accepted
    ]
    if not any(matches):
        request.app.state.metrics.auth_failures.labels(role=role, reason="wrong").inc()
        raise HTTPException(403, f"{role} token not accepted")


async def require_admin(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    token = request.app.state.settings.admin_token
    if token is not None:
        _authorise(request, credentials, [token], "admin")


async def require_reader(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    """The read routes are open unless a read token is set; the admin token reads too."""
    settings = request.app.state.settings
    if settings.read_token is not None:
        accepted = [settings.read_token, *([settings.admin_token] if settings.admin_token else [])]
        _authorise(request, credentials, accepted, "read")


admin = [Depends(require_admin)]
reader = [Depends(require_reader)]
# The read routes need a token only when S2META_READ_TOKEN is set: in OpenAPI terms the bearer
# scheme or nothing (an empty requirement), appended to the one FastAPI derives from `bearer`.
optional_auth = {"security": [{}]}
errors = {
    404: {"model": Problem, "description": "unknown scenario"},
    503: {"model": Problem, "description": "store unreachable or no meta learner loaded"},
}
router = APIRouter()


# The hot route, a DirectRoute declared first (routes are matched in order): it checks the
# token, validates its query and encodes its answer itself (docs/performance.md). OpenAPI
# still documents it from the same models, and the fuzz tests hold answers to them.
async def recommend(request: Request) -> Response:
    if request.app.state.settings.read_token is not None:  # else open: no header to parse
        await require_reader(request, await bearer(request))
    # Parsed as Starlette's QueryParams parses it (the last of repeated keys wins), into a
    # plain dict, cheaper than the multi-dict (docs/performance.md).
    parameters = parse_qsl(request.scope["query_string"].decode("latin-1"), keep_blank_values=True)
    try:
        query = RecommendQuery.model_validate(dict(parameters))
    except ValidationError as error:
        raise RequestValidationError(
            [{**e, "loc": ("query", *e["loc"])} for e in error.errors(include_url=False)]
        ) from error
    service: ScenarioService = request.app.state.service
    body = await service.recommend(query.scenario, query.user, query.n, query.exclude_seen)
    return Response(to_json(body), media_type="application/json")


router.add_api_route(
    "/recommend",
    recommend,
    methods=["GET"],
    route_class_override=DirectRoute,
    response_model=RecommendResponse,
    responses={
        **errors,
        401: {"model": Problem},
        403: {"model": Problem},
        422: {"model": InvalidInput, "description": "invalid query parameters (a list)"},
    },
    openapi_extra={
        "parameters": query_parameters(RecommendQuery),
        "security": [{bearer.scheme_name: []}, {}],
    },
    summary="Top-n of a scenario's pool for a user",
)


@router.post(
    "/scenarios/{scenario_id}/adapt",
    response_model=AdaptResponse,
    dependencies=admin,
    responses={
        400: {"model": Problem, "description": "body not UTF-8, or a malformed Content-Length"},
        401: {"model": Problem},
        403: {"model": Problem},
        413: {"model": Problem, "description": "body larger than S2META_MAX_BODY_BYTES"},
        422: {
            "model": InvalidInput,
            "description": "invalid fields (a list), or a scenario that cannot be adapted",
        },
        429: {"model": Problem, "description": "adaptation queue full; see Retry-After"},
        503: errors[503],
    },
    summary="Register a scenario's pool and interactions and adapt a recommender for it",
)
async def adapt(scenario_id: ScenarioId, body: AdaptRequest, service: Service) -> dict:
    return await service.adapt(
        scenario_id,
        [(i.user, i.item) for i in body.interactions],
        body.candidates,
        body.variant,
        body.seed,
    )


@router.get(
    "/scenarios",
    response_model=ScenarioPage,
    dependencies=reader,
    responses={503: errors[503], 401: {"model": Problem}, 403: {"model": Problem}},
    openapi_extra=optional_auth,
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
    responses={**errors, 401: {"model": Problem}, 403: {"model": Problem}},
    openapi_extra=optional_auth,
)
async def describe(scenario_id: ScenarioId, service: Service) -> dict:
    return await service.describe(scenario_id)


@router.delete(
    "/scenarios/{scenario_id}",
    status_code=204,
    dependencies=admin,
    responses={**errors, 401: {"model": Problem}, 403: {"model": Problem}},
)
async def delete(scenario_id: ScenarioId, service: Service) -> Response:
    await service.delete(scenario_id)
    return Response(status_code=204)


@router.get("/healthz", summary="The process is up")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="A meta learner is loaded and the store answers",
    responses={503: errors[503]},
)
async def readyz(service: Service) -> dict:
    problem = await service.readiness()
    current = service.learners.current
    if problem is not None or current is None:
        raise HTTPException(503, problem or "no meta learner loaded")
    return {"status": "ready", "meta_learner": current.version}


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
