"""The FastAPI application: settings in, lifespan loads the meta learner and opens the store,
routes are thin over ScenarioService."""

import gc
import importlib
import importlib.util
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from prometheus_client import Histogram
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from model.errors import ArtifactError
from service.adaptation import AdaptationInputError
from service.learners import MetaLearners, resolve_device
from service.limits import BodySizeLimit
from service.metrics import ServiceMetrics
from service.routes import DirectRoutes, router
from service.scenarios import (
    NoMetaLearnerError,
    QueueFullError,
    ScenarioNotFoundError,
    ScenarioService,
)
from service.settings import Settings
from service.store import StoreError, open_store

logger = logging.getLogger(__name__)


class RequestLatency:
    """s2meta_request_seconds by method, route template and status. Plain ASGI rather than
    `@app.middleware("http")`, whose wrapper (a task group and a streamed copy of every
    response) stood out in the profile under load (benchmarks/serving_load.py --profile).
    An error that escapes the app counts as 500 and propagates."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics
        self._histograms: dict[tuple[str, str, int], Histogram] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            key = (scope["method"], getattr(scope.get("route"), "path", "unmatched"), status)
            histogram = self._histograms.get(key)
            if histogram is None:  # labels() costs more than the rest of this per request
                histogram = self.metrics.request_seconds.labels(key[0], key[1], str(status))
                self._histograms[key] = histogram
            histogram.observe(time.perf_counter() - start)


# Imported by serving on first use: torch.func's gradient imports torch._dynamo on the first
# adaptation (with sympy, about 117,000 objects), numpy.unique imports numpy.ma and
# numpy.ctypeslib, and the first mapping-variant recommender faiss (about 12,000 objects).
LAZY_IMPORTS = ("torch._dynamo", "numpy.ma", "numpy.ctypeslib")


def import_lazy_dependencies() -> None:
    """Import at start-up, before gc.freeze, what serving would otherwise import on first use
    (tests/test_startup.py holds serving to importing nothing later). Imported later, those
    objects stayed in every full collection's walk: after the first adaptations recommend's
    p99 under load about tripled."""
    for module in LAZY_IMPORTS:
        importlib.import_module(module)
    if importlib.util.find_spec("faiss") is not None:  # absent: the mapping variant says so
        importlib.import_module("faiss")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = ServiceMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.admin_token is None:
            logger.warning("S2META_ADMIN_TOKEN is unset: the admin routes are open to anyone")
        store = open_store(settings.redis_url, settings.namespace, settings.redis_timeout_s)
        learners = MetaLearners(settings.registry, resolve_device(settings.device))
        service = ScenarioService(settings, store, learners, metrics)
        app.state.service = service
        # Load the meta learner before serving (readiness waits for it); re-adaptation of
        # stale scenarios runs in the background, not in the start-up path.
        await service.refresh()
        service.start()
        import_lazy_dependencies()
        # What start-up loaded (torch, the meta learner, the app) lives as long as the process:
        # out of the collector's sight, a full collection under load no longer walks it
        # (under load those pauses made most of the recommend p99's tail).
        gc.freeze()
        try:
            yield
        finally:
            await service.stop()
            await store.close()
            metrics.process_exiting()

    app = FastAPI(
        title="s2meta",
        summary="Cold-start recommendation for new scenarios with a sequential meta learner",
        version="0.1.0",
        lifespan=lifespan,
        # The routes themselves rather than include_router(router): an included router is
        # matched through a layer of its own (FastAPI 0.165), which showed in profiles under
        # load. The routes hold no per-app state, so apps may share them.
        routes=router.routes,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.add_middleware(DirectRoutes, fastapi_app=app)
    # Added first, so it runs inside CORS and the latency middleware: 413s get CORS headers
    # and are counted.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    if settings.cors_origins:  # off unless configured
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
        )

    # Outermost (added last): every answer is timed, the refusals of the ones inside too.
    app.add_middleware(RequestLatency, metrics=metrics)

    def problem(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"detail": detail}, status_code=status, headers=headers)

    @app.exception_handler(405)
    async def method_not_allowed(request: Request, _: Exception) -> JSONResponse:
        # Starlette lists only the methods of the first route matching the path; HTTP wants
        # every method the path supports (GET and DELETE on /scenarios/{id}).
        methods = {
            method
            for route in request.app.router.routes
            if isinstance(route, APIRoute) and route.matches(request.scope)[0] != Match.NONE
            for method in route.methods
        }
        return problem(405, "method not allowed", {"Allow": ", ".join(sorted(methods))})

    @app.exception_handler(ScenarioNotFoundError)
    async def not_found(_: Request, error: ScenarioNotFoundError) -> JSONResponse:
        return problem(404, f"unknown scenario {error.args[0]!r}")

    @app.exception_handler(AdaptationInputError)
    async def bad_input(_: Request, error: AdaptationInputError) -> JSONResponse:
        return problem(422, str(error))

    @app.exception_handler(QueueFullError)
    async def queue_full(_: Request, error: QueueFullError) -> JSONResponse:
        detail = f"adaptation queue full ({error}); retry later"
        return problem(429, detail, {"Retry-After": str(settings.retry_after_s)})

    @app.exception_handler(NoMetaLearnerError)
    async def no_learner(_: Request, error: NoMetaLearnerError) -> JSONResponse:
        return problem(503, str(error))

    @app.exception_handler(ArtifactError)
    async def learner_unavailable(_: Request, error: ArtifactError) -> JSONResponse:
        return problem(503, f"the scenario's meta learner cannot be loaded: {error}")

    @app.exception_handler(StoreError)
    async def store_down(_: Request, error: StoreError) -> JSONResponse:
        return problem(503, f"scenario store unavailable: {error}")

    return app
