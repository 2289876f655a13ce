"""Routes called without FastAPI's per-request handler, for the hot path: `DirectRoute` declares
one (its OpenAPI operation as any route's), `DirectRoutes` answers it ahead of the router."""

import inspect
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send


def query_parameters(model: type[BaseModel]) -> list[dict[str, Any]]:
    """OpenAPI query parameters of a route that validates its query with `model` itself:
    what FastAPI writes for a query-parameter model, from the model's JSON schema."""
    schema = model.model_json_schema()
    required = set(schema.get("required", ()))
    parameters = []
    for name, field in schema["properties"].items():
        parameter = {"name": name, "in": "query", "required": name in required, "schema": field}
        if "description" in field:
            parameter["description"] = field["description"]
        parameters.append(parameter)
    return parameters


class DirectRoute(APIRoute):
    """A route whose endpoint takes the request alone and returns a Response, and is called
    as it is: without FastAPI's per-request handler (dependency solving, parameter
    validation, response-model serialisation, its telemetry hooks). `DirectRoutes` answers it
    ahead of the router; where the router reaches it all the same, it is called the same way.
    Its OpenAPI operation is declared as any route's; its errors go to the app's exception
    handlers."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        if list(inspect.signature(self.endpoint).parameters) != ["request"]:
            raise TypeError(f"{self.path}: a DirectRoute endpoint takes the request alone")
        return self.endpoint


class DirectRoutes:
    """Middleware that answers the app's DirectRoutes itself, ahead of the app's inner layers
    (FastAPI's exception and exit-stack middleware, the router, the route's wrapper), whose
    cost per request shows under load (docs/performance.md). Add it innermost:
    the user middleware added after it runs around it as around any route. A request
    matches on its exact method and path; the scope gets the route, as the router would give
    it. Errors go to the app's exception handlers, looked up as Starlette's exception
    middleware looks them up (by status for an HTTPException, else by class); any other
    error propagates to the app's server-error middleware, as it does from a route."""

    def __init__(self, app: ASGIApp, fastapi_app: FastAPI) -> None:
        self.app = app
        self.exception_handlers = fastapi_app.exception_handlers
        self.routes = {
            (method, route.path): route
            for route in fastapi_app.router.routes
            if isinstance(route, DirectRoute)
            for method in route.methods
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = None
        if scope["type"] == "http":
            route = self.routes.get((scope["method"], scope["path"]))
        if route is None:
            await self.app(scope, receive, send)
            return
        scope.update(endpoint=route.endpoint, path_params={}, route=route)
        request = Request(scope, receive)
        try:
            response = await route.endpoint(request)
        except Exception as error:  # to its handler, or raised again
            handler = self._handler(error)
            if handler is None:
                raise
            response = await handler(request, error)
        await response(scope, receive, send)

    def _handler(self, error: Exception) -> Callable[..., Any] | None:
        handlers = self.exception_handlers
        if isinstance(error, StarletteHTTPException) and error.status_code in handlers:
            return handlers[error.status_code]
        # Not the app's Exception handler: an unexpected error propagates to the server-error
        # middleware (which answers with that handler, then re-raises for the server to log).
        return next(
            (handlers[c] for c in type(error).__mro__ if c in handlers and c is not Exception),
            None,
        )
