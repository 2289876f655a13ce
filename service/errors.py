"""Every error the service raises on purpose, and the one table that maps each to its HTTP
answer: a JSON `{"detail": ...}` body with the status below. `register_error_handlers`
installs the table (and the 405 answer) on an app; routes and the service raise, never
answer."""

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.routing import Match

from model.errors import ArtifactError


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
    detail: Callable[[Exception], str]
    retry_after: bool = False  # send Retry-After: S2META_RETRY_AFTER_S


HTTP_ERRORS: dict[type[Exception], HttpError] = {
    ScenarioNotFoundError: HttpError(404, lambda e: f"unknown scenario {e.args[0]!r}"),
    AdaptationInputError: HttpError(422, str),
    QueueFullError: HttpError(
        429, lambda e: f"adaptation queue full ({e}); retry later", retry_after=True
    ),
    RevisionMismatchError: HttpError(412, str),
    ConflictError: HttpError(409, str),
    NoMetaLearnerError: HttpError(503, str),
    ArtifactError: HttpError(503, lambda e: f"the scenario's meta learner cannot be loaded: {e}"),
    StoreError: HttpError(503, lambda e: f"scenario store unavailable: {e}"),
}


def problem(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def register_error_handlers(app: FastAPI, retry_after_s: int) -> None:
    """Answer every exception of HTTP_ERRORS by its entry, and 405 with every allowed method."""

    def answer(mapped: HttpError) -> Callable[[Request, Exception], Awaitable[JSONResponse]]:
        headers = {"Retry-After": str(retry_after_s)} if mapped.retry_after else None

        async def handler(_: Request, error: Exception) -> JSONResponse:
            return problem(mapped.status, mapped.detail(error), headers)

        return handler

    for error_type, mapped in HTTP_ERRORS.items():
        app.add_exception_handler(error_type, answer(mapped))
    app.add_exception_handler(405, method_not_allowed)  # type: ignore[arg-type]


async def method_not_allowed(request: Request, _: Exception) -> JSONResponse:
    # Starlette lists only the methods of the first route matching the path; HTTP wants every
    # method the path supports (GET and DELETE on /scenarios/{id}).
    methods = {
        method
        for route in request.app.router.routes
        if isinstance(route, APIRoute) and route.matches(request.scope)[0] != Match.NONE
        for method in route.methods
    }
    return problem(405, "method not allowed", {"Allow": ", ".join(sorted(methods))})
