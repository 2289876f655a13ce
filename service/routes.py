"""Thin routers: validate at the edge, call the ScenarioService, map its errors."""

import secrets
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.scenarios import ScenarioService
from service.schemas import (
    SCENARIO_ID_PATTERN,
    AdaptRequest,
    AdaptResponse,
    EntityId,
    Problem,
    RecommendResponse,
    ScenarioDetail,
    ScenarioPage,
    ScenarioSummary,
)

ScenarioId = Annotated[str, Path(pattern=SCENARIO_ID_PATTERN, description="scenario id")]
bearer = HTTPBearer(auto_error=False, description="the admin token (S2META_ADMIN_TOKEN)")


def scenario_service(request: Request) -> ScenarioService:
    return request.app.state.service


Service = Annotated[ScenarioService, Depends(scenario_service)]


def require_admin(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    token = request.app.state.settings.admin_token
    if token is None:
        return
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise HTTPException(
            401,
            "admin token required (Authorization: Bearer <token>)",
            {"WWW-Authenticate": "Bearer"},
        )
    if not secrets.compare_digest(
        credentials.credentials.encode(), token.get_secret_value().encode()
    ):
        raise HTTPException(403, "admin token not accepted")


admin = [Depends(require_admin)]
errors = {
    404: {"model": Problem, "description": "unknown scenario"},
    503: {"model": Problem, "description": "store unreachable or no meta learner loaded"},
}
router = APIRouter()


@router.post(
    "/scenarios/{scenario_id}/adapt",
    response_model=AdaptResponse,
    dependencies=admin,
    responses={
        401: {"model": Problem},
        403: {"model": Problem},
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
    "/recommend",
    response_model=RecommendResponse,
    responses=errors,
    summary="Top-n of a scenario's pool for a user",
)
async def recommend(
    service: Service,
    user: Annotated[EntityId, Query()],
    scenario: Annotated[str, Query(pattern=SCENARIO_ID_PATTERN)],
    n: Annotated[int, Query(ge=1, le=1000)] = 10,
    exclude_seen: bool = True,
) -> dict:
    return await service.recommend(scenario, user, n, exclude_seen)


@router.get("/scenarios", response_model=ScenarioPage, responses={503: errors[503]})
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


@router.get("/scenarios/{scenario_id}", response_model=ScenarioDetail, responses=errors)
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


@router.get("/readyz", summary="A meta learner is loaded and the store answers", responses=errors)
async def readyz(service: Service) -> dict:
    problem = await service.readiness()
    current = service.learners.current
    if problem is not None or current is None:
        raise HTTPException(503, problem or "no meta learner loaded")
    return {"status": "ready", "meta_learner": current.version}


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
