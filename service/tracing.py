"""OpenTelemetry spans, when S2META_OTEL_EXPORTER is set (docs/observability.md).

A server span per HTTP request (`RequestContext` in service.observability starts it, named by
method and route template), inside it a span per ScenarioService call (adapt, recommend, ...),
per ranking of a recommend (queue and batch together) and per store call. They come from
wrappers put around the objects when the app starts, so the code they time carries no
tracing of its own; unset, nothing is wrapped and the SDK is never imported. Attributes:
`s2meta.request_id`, `s2meta.scenario_id`, `s2meta.revision`, `s2meta.variant`,
`s2meta.meta_learner` where known. The SDK's TracerProvider is the app's own, not the global
one, so FastAPI's native telemetry stays off."""

import functools
import importlib
import logging
import sys
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar, cast

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.context import request_id

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

    from service.scenarios import ScenarioService
    from service.store import ScenarioStore

logger = logging.getLogger(__name__)
T = TypeVar("T")
PREFIX = "s2meta."
# The ScenarioService calls spanned (a dotted path from the service: its write half's
# calls), and their spans' names; those the service lacks are skipped.
SERVICE_CALLS = {
    "recommend": "recommend",
    "recommend_many": "recommend many",
    "describe": "describe",
    "list_scenarios": "list scenarios",
    "writes.adapt": "adapt",
    "writes.append": "append interactions",
    "writes.delete": "delete",
}
# Store calls spanned; the event subscription (long-lived) and close are not.
STORE_CALLS = (
    "ping",
    "put",
    "revision",
    "get",
    "get_meta",
    "list_meta",
    "delete",
    "acquire_lock",
    "release_lock",
    "publish",
)
# The calls (of either) whose first argument is not a scenario id.
NOT_BY_SCENARIO = frozenset(
    {"list_scenarios", "ping", "list_meta", "acquire_lock", "release_lock", "publish"}
)
RESULT_FIELDS = ("revision", "variant", "meta_learner", "reused", "source")


def require_sdk(exporter: str | None) -> None:
    """RuntimeError when `exporter` is set and the `otel` extra that it needs is missing."""
    if exporter is None:
        return
    modules = ["opentelemetry.sdk.trace"]
    if exporter == "otlp":
        modules.append("opentelemetry.exporter.otlp.proto.http.trace_exporter")
    try:
        for module in modules:
            importlib.import_module(module)
    except ImportError as error:
        raise RuntimeError(
            f"S2META_OTEL_EXPORTER={exporter} needs the otel extra (pip install 's2meta[otel]'): "
            f"{error}"
        ) from error


def make_provider(exporter: str | None) -> "TracerProvider | None":
    """The app's TracerProvider exporting to `exporter` (console: each span as it ends, to
    stdout; otlp: in batches, to the OTEL_EXPORTER_OTLP_* endpoint); None when unset.
    RuntimeError when the `otel` extra is missing."""
    if exporter is None:
        return None
    require_sdk(exporter)
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SimpleSpanProcessor,
    )

    # service.name s2meta unless OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES names one.
    resource = Resource.create()
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "s2meta"}))
    provider = TracerProvider(resource=resource)
    if exporter == "console":
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(out=sys.stdout)))
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    logger.info("OpenTelemetry spans on, exporter %s", exporter)
    return provider


def flushing_at_shutdown(send: Send, provider: "TracerProvider") -> Send:
    """The lifespan's send, exporting the spans still held before shutdown completes."""

    async def send_after_flush(message: Message) -> None:
        if message["type"] == "lifespan.shutdown.complete":
            provider.shutdown()
        await send(message)

    return send_after_flush


def _request_attributes() -> dict[str, Any]:
    current = request_id.get()
    return {} if current is None else {PREFIX + "request_id": current}


async def traced_request(
    tracer: "Tracer", app: ASGIApp, scope: Scope, receive: Receive, send: Send
) -> None:
    """Run one HTTP request in a server span: the parent of the spans below it, itself a
    child of the caller's span when a W3C `traceparent` header names one."""
    from opentelemetry import propagate
    from opentelemetry.trace import SpanKind, StatusCode

    headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
    method = scope["method"]
    status = 500  # an error that escapes before an answer

    async def send_noting_status(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        await send(message)

    attributes = {"http.request.method": method, "url.path": scope["path"]}
    with tracer.start_as_current_span(
        method,
        context=propagate.extract(headers),
        kind=SpanKind.SERVER,
        attributes={**attributes, **_request_attributes()},
    ) as span:
        try:
            await app(scope, receive, send_noting_status)
        finally:
            route = getattr(scope.get("route"), "path", None)
            if route is not None:  # the route template, as the router matched it
                span.update_name(f"{method} {route}")
                span.set_attribute("http.route", route)
            scenario = scope.get("path_params", {}).get("scenario_id")
            if scenario is not None:
                span.set_attribute(PREFIX + "scenario_id", scenario)
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_status(StatusCode.ERROR)


def _note_result(span: "Span", result: object) -> None:
    """The span's attributes from what the call returned: a revision, or a mapping (the
    service's answers) with some of RESULT_FIELDS."""
    if isinstance(result, int) and not isinstance(result, bool):
        span.set_attribute(PREFIX + "revision", result)
    elif isinstance(result, Mapping):
        for field in RESULT_FIELDS:
            value = result.get(field)
            if isinstance(value, str | int | float | bool):
                span.set_attribute(PREFIX + field, value)
    elif hasattr(result, "revision"):  # a StoredScenario
        span.set_attribute(PREFIX + "revision", result.revision)


def _spanned(
    tracer: "Tracer",
    name: str,
    call: Callable[..., Awaitable[T]],
    attributes: dict[str, Any],
    only_within_trace: bool = False,
) -> Callable[..., Awaitable[T]]:
    """`call` (a coroutine function) in a span of its own; with `only_within_trace`, only
    where a span is current."""
    from opentelemetry.trace import get_current_span

    by_scenario = call.__name__ not in NOT_BY_SCENARIO

    @functools.wraps(call)
    async def spanned(*args: Any, **kwargs: Any) -> T:
        if only_within_trace and not get_current_span().get_span_context().is_valid:
            return await call(*args, **kwargs)
        own = {**attributes, **_request_attributes()}
        scenario = kwargs.get("scenario_id", args[0] if args else None)
        if by_scenario and isinstance(scenario, str):
            own[PREFIX + "scenario_id"] = scenario
        with tracer.start_as_current_span(name, attributes=own) as span:
            result = await call(*args, **kwargs)
            _note_result(span, result)
            return result

    return spanned


class TracedStore:
    """A ScenarioStore whose calls (STORE_CALLS) within a request's trace each run in a span
    `store.<call>`; anything else goes to the store as it is."""

    def __init__(self, store: "ScenarioStore", tracer: "Tracer") -> None:
        self._store = store
        system = {PREFIX + "store": type(store).__name__}
        for call in STORE_CALLS:
            if hasattr(store, call):
                # In requests only: the background loops' polling would be a lone trace each.
                spanned = _spanned(tracer, f"store.{call}", getattr(store, call), system, True)
                setattr(self, call, spanned)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def traced_store(store: "ScenarioStore", tracer: "Tracer | None") -> "ScenarioStore":
    """The store, its calls in spans when tracing is on."""
    return store if tracer is None else cast("ScenarioStore", TracedStore(store, tracer))


def trace_service(service: "ScenarioService", tracer: "Tracer | None") -> None:
    """With tracing on, put the service's calls (SERVICE_CALLS) and its batcher's ranking in
    spans; off, leave them as they are."""
    if tracer is None:
        return
    for path, name in SERVICE_CALLS.items():
        *owners, call = path.split(".")
        owner: object = service
        for attribute in owners:  # a renamed call fails here, loudly, rather than go unspanned
            owner = getattr(owner, attribute)
        setattr(owner, call, _spanned(tracer, name, getattr(owner, call), {}))
    rank = service.batcher.rank

    @functools.wraps(rank)
    async def traced_rank(recommender: Any, request: Any) -> Any:
        attributes = {
            **_request_attributes(),
            PREFIX + "scenario_id": recommender.scenario_id,
            PREFIX + "revision": recommender.revision,
            PREFIX + "meta_learner": recommender.meta_learner,
            PREFIX + "variant": str(recommender.spec.variant),
            PREFIX + "pool_size": len(recommender.pool_ids),
        }
        with tracer.start_as_current_span("rank", attributes=attributes) as span:
            ranked = await rank(recommender, request)
            span.set_attribute(PREFIX + "source", ranked.source)
            return ranked

    service.batcher.rank = traced_rank  # type: ignore[method-assign]
