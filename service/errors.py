"""Every error the service raises on purpose, and the one table that maps each to its HTTP
answer: an RFC 9457 problem (service.problems) of the type and status below.
`register_error_handlers` installs the table and the answers to FastAPI's own errors
(HTTPException, request validation, anything unhandled) on an app; routes and the service
raise, never answer."""

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from model.errors import ArtifactError
from service.problems import TYPE_PREFIX, problem_response

logger = logging.getLogger(__name__)


class StoreError(Exception):
    """The store cannot answer (unreachable, or holds a record this code cannot read)."""


class AdaptationInputError(ValueError):
    """The registered interactions or candidates cannot be adapted on (a 422's reason)."""


class ScenarioNotFoundError(LookupError):
    """No scenario of this id is stored; args[0] is the id."""


class NoMetaLearnerError(RuntimeError):
    """No meta learner is loaded yet, so nothing can be adapted."""


class QueueFullError(RuntimeError):
    """Every adaptation worker and queue slot is taken."""


class RevisionMismatchError(RuntimeError):
    """An If-Match precondition failed: the stored revision is not the one the client named."""


class ConflictError(RuntimeError):
    """The request conflicts with the scenario's current state (a concurrent change)."""


@dataclass(frozen=True)
class HttpError:
    status: int
    slug: str  # the problem type is urn:s2meta:problem:<slug>
    title: str
    detail: Callable[[Exception], str]
    retry_after: bool = False  # send Retry-After: S2META_RETRY_AFTER_S

    @property
    def type(self) -> str:
        return TYPE_PREFIX + self.slug


HTTP_ERRORS: dict[type[Exception], HttpError] = {
    ScenarioNotFoundError: HttpError(
        404, "unknown-scenario", "Unknown scenario", lambda e: f"unknown scenario {e.args[0]!r}"
    ),
    AdaptationInputError: HttpError(422, "not-adaptable", "Scenario cannot be adapted", str),
    QueueFullError: HttpError(
        429,
        "queue-full",
        "Adaptation queue full",
        lambda e: f"adaptation queue full ({e}); retry later",
        retry_after=True,
    ),
    RevisionMismatchError: HttpError(412, "revision-mismatch", "Revision mismatch", str),
    ConflictError: HttpError(409, "conflict", "Conflict", str),
    NoMetaLearnerError: HttpError(503, "no-meta-learner", "No meta learner loaded", str),
    ArtifactError: HttpError(
        503,
        "meta-learner-unavailable",
        "Meta learner unavailable",
        lambda e: f"the scenario's meta learner cannot be loaded: {e}",
    ),
    StoreError: HttpError(
        503,
        "store-unavailable",
        "Scenario store unavailable",
        lambda e: f"scenario store unavailable: {e}",
        retry_after=True,
    ),
}
INVALID_REQUEST = HttpError(422, "invalid-request", "Invalid request", str)

Handler = Callable[[Request, Exception], Awaitable[JSONResponse]]


def register_error_handlers(app: FastAPI, retry_after_s: int) -> None:
    """Answer every exception of HTTP_ERRORS by its entry, FastAPI's and Starlette's own
    errors as problems too (405 with every allowed method), anything else as a logged 500."""

    def answer(mapped: HttpError) -> Handler:
        headers = {"Retry-After": str(retry_after_s)} if mapped.retry_after else None

        async def handler(request: Request, error: Exception) -> JSONResponse:
            detail = mapped.detail(error)
            return problem_response(
                request.scope, mapped.status, detail, mapped.type, mapped.title, headers
            )

        return handler

    for error_type, mapped in HTTP_ERRORS.items():
        app.add_exception_handler(error_type, answer(mapped))
    app.add_exception_handler(RequestValidationError, invalid_request)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]
    app.add_exception_handler(405, method_not_allowed)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, server_error)


def field_errors(error: RequestValidationError) -> list[dict[str, Any]]:
    """loc, msg and type of each error: not pydantic's `input` (it may echo a secret or a
    megabyte of body) nor `ctx` (not always JSON)."""
    return [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in error.errors()]


def summary(errors: list[dict[str, Any]], shown: int = 3) -> str:
    """The detail of an invalid request: its first few field errors in one line."""
    parts = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors[:shown]]
    more = f" (and {len(errors) - shown} more)" if len(errors) > shown else ""
    return "; ".join(parts) + more


async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
    errors = field_errors(error)
    mapped = INVALID_REQUEST
    return problem_response(
        request.scope, 422, summary(errors), mapped.type, mapped.title, errors=errors
    )


async def http_error(request: Request, error: StarletteHTTPException) -> Response:
    if error.status_code in (204, 304):  # no body allowed (Starlette's own handler does so)
        return Response(status_code=error.status_code, headers=error.headers)
    detail = error.detail if isinstance(error.detail, str) else str(error.detail)
    return problem_response(request.scope, error.status_code, detail, headers=error.headers)


async def method_not_allowed(request: Request, _: Exception) -> JSONResponse:
    # Starlette lists only the methods of the first route matching the path; HTTP wants every
    # method the path supports (GET and DELETE on /scenarios/{id}).
    methods = {
        method
        for route in request.app.router.routes
        if isinstance(route, APIRoute) and route.matches(request.scope)[0] != Match.NONE
        for method in route.methods
    }
    allow = ", ".join(sorted(methods))
    detail = f"{request.method} is not allowed here; allowed: {allow}"
    return problem_response(request.scope, 405, detail, headers={"Allow": allow})


async def server_error(request: Request, error: Exception) -> JSONResponse:
    # Logged here, with the request, as the server may not log it (a test client, say); the
    # answer names no exception: internals stay in the log.
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=error)
    return problem_response(request.scope, 500, "unexpected error; see the service's log")
