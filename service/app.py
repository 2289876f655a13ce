"""The FastAPI application: settings in; lifespan loads the meta learner, opens the store
and starts the lifecycle; routes are thin over ScenarioService; errors answered by the table
in service.errors."""

import gc
import importlib
import importlib.util
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from prometheus_client import Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.direct_routes import DirectRoutes
from service.errors import register_error_handlers
from service.learners import MetaLearners, resolve_device
from service.lifecycle import MetaLearnerLifecycle
from service.limits import BodySizeLimit
from service.metrics import ServiceMetrics
from service.observability import instrument, observe
from service.openapi import install_openapi
from service.problems import ProblemCORSMiddleware
from service.routes import router
from service.scenarios import ScenarioService
from service.settings import Settings
from service.store import open_store
from service.tracing import traced_store

logger = logging.getLogger(__name__)


class RequestLatency:
    """s2meta_request_seconds by method, route template and status. Plain ASGI: the wrapper
    of `@app.middleware("http")` costs every request (docs/performance.md). An error that
    escapes the app counts as 500 and propagates."""

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


# What serving would import on first use: torch.func's gradient (torch._dynamo, with sympy),
# numpy.unique (numpy.ma, numpy.ctypeslib), and the mapping variant's faiss.
LAZY_IMPORTS = ("torch._dynamo", "numpy.ma", "numpy.ctypeslib")


def import_lazy_dependencies() -> None:
    """Import at start-up, before gc.freeze, what serving would otherwise import on first use,
    so those objects stay out of every full collection's walk (docs/performance.md;
    tests/test_startup.py holds serving to importing nothing later)."""
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
        store = traced_store(
            open_store(
                settings.redis_url,
                settings.namespace,
                settings.redis_timeout_s,
                password=settings.redis_password,
                tls_ca_file=settings.redis_tls_ca_file,
            ),
            app.state.tracer,
        )
        learners = MetaLearners(settings.registry, resolve_device(settings.device))
        service = ScenarioService(settings, store, learners, metrics)
        instrument(service, app.state.tracer)  # spans and the info metric
        lifecycle = MetaLearnerLifecycle(service)
        app.state.service = service
        app.state.lifecycle = lifecycle
        # Before the first load: its background compile imports torch's compiler stack too,
        # and two threads importing it at once can find a module half imported.
        import_lazy_dependencies()
        # Load the meta learner before serving (readiness waits for it); re-adaptation of
        # stale scenarios runs in the background, not in the start-up path.
        await lifecycle.refresh()
        lifecycle.start()
        # What start-up loaded lives as long as the process: out of the collector's sight, a
        # full collection under load does not walk it (docs/performance.md).
        gc.freeze()
        try:
            yield
        finally:
            await lifecycle.stop()
            service.close()
            await store.close()
            metrics.process_exiting()

    app = FastAPI(
        title="s2meta",
        summary="Cold-start recommendation for new scenarios with a sequential meta learner",
        version="0.1.0",
        lifespan=lifespan,
        # The routes themselves: an included router adds a matching layer per request
        # (docs/performance.md). They hold no per-app state, so apps may share them.
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
            ProblemCORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=[
                "Authorization",
                "Content-Type",
                "If-Match",
                "X-Request-ID",
                "traceparent",
            ],
            expose_headers=["ETag", "X-Request-ID", "Retry-After"],
        )

    # Outermost (added last): every answer is timed, the refusals of the ones inside too.
    app.add_middleware(RequestLatency, metrics=metrics)
    # Around everything, Starlette's 500s included: the request id, and spans when set.
    observe(app, settings)

    register_error_handlers(app, settings.retry_after_s)
    install_openapi(app, settings)
    return app
