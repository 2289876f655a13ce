"""Logs that can be followed: a request id per request, on every log line and response, and
JSON log lines (S2META_LOG_FORMAT=json). Spans (S2META_OTEL_EXPORTER) are in service.tracing,
started by the same middleware (docs/observability.md)."""

import json
import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import tracing
from service.context import REQUEST_ID_HEADER, incoming_request_id, request_id
from service.metrics import LearnerLabels
from service.settings import Settings

if TYPE_CHECKING:  # the OpenTelemetry SDK is imported only when tracing is on
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Tracer

    from service.learners import MetaLearners
    from service.scenarios import ScenarioService

# What every LogRecord has; anything else on a record came as `extra=` and is logged with it.
STANDARD_RECORD_FIELDS = frozenset(
    {
        *logging.LogRecord("", 0, "", 0, "", None, None).__dict__,
        "message",
        "asctime",
        "taskName",
        "color_message",  # uvicorn's colored copy of the message
    }
)
ACCESS_FIELDS = ("client", "method", "path", "http_version", "status")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, request_id
    within a request, the record's extra fields, and exception (a traceback) when there is
    one. uvicorn's access lines also carry their parts as fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        current = request_id.get()
        if current is not None:
            entry["request_id"] = current
        if record.name == "uvicorn.access" and isinstance(record.args, tuple):
            entry.update(zip(ACCESS_FIELDS, record.args, strict=False))
        for key, value in record.__dict__.items():
            if key not in STANDARD_RECORD_FIELDS:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`time level logger: message`, with ` [request_id=...]` within a request."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        current = request_id.get()
        return line if current is None else f"{line} [request_id={current}]"


def logging_config(log_format: str, level: str) -> dict[str, Any]:
    """A dictConfig for the process and uvicorn's (`log_config`): uvicorn applies it in each
    worker process too. uvicorn's loggers write through the root handler, in the same format."""
    formatter = JsonFormatter if log_format == "json" else TextFormatter
    uvicorn_logger = {"handlers": [], "propagate": True}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"s2meta": {"()": f"{__name__}.{formatter.__name__}"}},
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "formatter": "s2meta",
                "stream": "ext://sys.stderr",
            }
        },
        "loggers": {
            name: dict(uvicorn_logger) for name in ("uvicorn", "uvicorn.error", "uvicorn.access")
        },
        "root": {"handlers": ["default"], "level": level.upper()},
    }


class RequestContext:
    """The outermost layer: gives each HTTP request its id (`request_id` while it runs, the
    X-Request-ID header on its response, errors and refusals included) and, with tracing
    on, its server span. Plain ASGI: per request one header scan, one context variable and
    a send wrapper (docs/performance.md)."""

    def __init__(
        self, app: ASGIApp, tracer: "Tracer | None", provider: "TracerProvider | None"
    ) -> None:
        self.app = app
        self.tracer = tracer
        self.provider = provider

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan" and self.provider is not None:
                send = tracing.flushing_at_shutdown(send, self.provider)
            await self.app(scope, receive, send)
            return
        current = incoming_request_id(scope["headers"])
        header = (REQUEST_ID_HEADER, current.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":  # a new list: the response's stays
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        token = request_id.set(current)
        if self.tracer is None:
            await self.app(scope, receive, send_with_id)
        else:
            await tracing.traced_request(self.tracer, self.app, scope, receive, send_with_id)
        # Left set when an error escapes, so that the server's traceback line carries the id
        # (uvicorn runs each request in a task of its own).
        request_id.reset(token)


def observe(app: FastAPI, settings: Settings) -> None:
    """Put RequestContext around the whole app, Starlette's server-error middleware
    included, so that its 500s carry the request id too; start tracing if it is set. The
    tracer (None: off) is `app.state.tracer` for service.tracing's wrappers."""
    provider = tracing.make_provider(settings.otel_exporter)
    tracer = provider.get_tracer("s2meta") if provider is not None else None
    app.state.tracer_provider = provider
    app.state.tracer = tracer
    build_stack = app.build_middleware_stack

    def build_with_context() -> ASGIApp:
        return RequestContext(build_stack(), tracer, provider)

    # add_middleware can only add inside the server-error middleware: the stack's builder
    # is wrapped instead (Starlette builds the stack on the first call).
    app.build_middleware_stack = build_with_context  # type: ignore[method-assign]


def loaded_learners(learners: "MetaLearners") -> set[LearnerLabels]:
    """The labels of s2meta_meta_learner_info: each loaded version's."""
    return {
        (v.version, v.artifact.default_variant, ",".join(sorted(v.artifact.learners)))
        for v in learners.loaded
    }


def instrument(service: "ScenarioService", tracer: "Tracer | None") -> None:
    """The service's own observability: the loaded meta learners as a metric, and with
    tracing on, its calls in spans."""
    service.metrics.track_loaded(lambda: loaded_learners(service.learners))
    tracing.trace_service(service, tracer)
