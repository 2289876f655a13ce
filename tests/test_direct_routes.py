"""DirectRoutes answers an app's DirectRoutes ahead of the app's inner layers: without
reaching them, inside the user middleware added after it, with the app's exception handlers
(looked up by status, then by class along the error's MRO) and the route in the scope."""

from collections.abc import Awaitable, Callable

import httpx
import pytest
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.types import Message, Receive, Scope, Send

from service.direct_routes import DirectRoute, DirectRoutes

pytestmark = pytest.mark.anyio
ORIGIN = "https://shop.example"
Outcome = Callable[[Request], Awaitable[Response]]


class RefusalError(Exception):
    pass


class HarderRefusalError(RefusalError):
    pass


def app_with(outcome: Outcome) -> FastAPI:
    """An app with GET /direct (a DirectRoute answering `outcome`), GET /routed (a plain
    route), handlers for RefusalError and status 418, DirectRoutes, and CORS around it."""

    async def direct(request: Request) -> Response:
        return await outcome(request)

    app = FastAPI()
    app.router.add_api_route("/direct", direct, methods=["GET"], route_class_override=DirectRoute)

    @app.get("/routed")
    async def routed() -> dict:
        return {"via": "router"}

    @app.exception_handler(RefusalError)
    async def refused(_: Request, error: RefusalError) -> JSONResponse:
        return JSONResponse({"detail": f"refused: {error}"}, status_code=409)

    @app.exception_handler(418)
    async def teapot(_: Request, error: HTTPException) -> JSONResponse:
        return JSONResponse({"detail": f"teapot: {error.detail}"}, status_code=418)

    app.add_middleware(DirectRoutes, fastapi_app=app)
    app.add_middleware(CORSMiddleware, allow_origins=[ORIGIN])
    return app


async def get(app: FastAPI, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.get(path, headers=headers)


async def answer(request: Request) -> Response:
    return JSONResponse({"route": request.scope["route"].path, "q": request.query_params["q"]})


async def test_a_direct_route_is_answered_without_the_inner_app():
    app = app_with(answer)
    reached: list[tuple[str, str]] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        reached.append((scope["method"], scope["path"]))
        await Response("inner")(scope, receive, send)

    dispatcher = DirectRoutes(inner, fastapi_app=app)
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    for method, path in (("GET", "/direct"), ("POST", "/direct"), ("GET", "/routed")):
        scope = {"type": "http", "method": method, "path": path, "query_string": b"q=7"}
        await dispatcher({**scope, "headers": [], "app": app}, receive, send)
    assert reached == [("POST", "/direct"), ("GET", "/routed")]
    bodies = [m["body"] for m in sent if m["type"] == "http.response.body"]
    assert bodies == [b'{"route":"/direct","q":"7"}', b"inner", b"inner"]


async def test_a_direct_answer_runs_inside_the_user_middleware():
    app = app_with(answer)
    response = await get(app, "/direct?q=1", {"Origin": ORIGIN})
    assert response.status_code == 200 and response.json() == {"route": "/direct", "q": "1"}
    assert response.headers["access-control-allow-origin"] == ORIGIN
    routed = await get(app, "/routed", {"Origin": ORIGIN})
    assert routed.json() == {"via": "router"}
    assert routed.headers["access-control-allow-origin"] == ORIGIN


@pytest.mark.parametrize(
    ("error", "status", "body"),
    [
        (RefusalError("plain"), 409, {"detail": "refused: plain"}),
        (HarderRefusalError("by class"), 409, {"detail": "refused: by class"}),  # along the MRO
        (HTTPException(418, "short"), 418, {"detail": "teapot: short"}),  # by status
        (HTTPException(404, "nothing"), 404, {"detail": "nothing"}),  # FastAPI's own handler
    ],
)
async def test_errors_go_to_the_apps_handlers(error, status, body):
    async def fail(_: Request) -> Response:
        raise error

    response = await get(app_with(fail), "/direct", {"Origin": ORIGIN})
    assert response.status_code == status and response.json() == body
    assert response.headers["access-control-allow-origin"] == ORIGIN


async def test_an_error_without_a_handler_is_a_server_error():
    async def fail(_: Request) -> Response:
        raise RuntimeError("a bug")

    response = await get(app_with(fail), "/direct")
    assert response.status_code == 500


async def test_an_unexpected_error_reaches_the_server_error_middleware_not_its_handler():
    """The app's Exception handler answers it there, and the error is raised on for the
    server to log, as from a routed request."""

    async def fail(_: Request) -> Response:
        raise RuntimeError("a bug")

    app = app_with(fail)
    answered: list[str] = []

    @app.exception_handler(Exception)
    async def crashed(_: Request, error: Exception) -> JSONResponse:
        answered.append(str(error))
        return JSONResponse({"crashed": str(error)}, status_code=500)

    transport = httpx.ASGITransport(app=app)  # raises what the app raises
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        with pytest.raises(RuntimeError, match="a bug"):
            await client.get("/direct")
    assert answered == ["a bug"]
    response = await get(app, "/direct")
    assert response.status_code == 500 and response.json() == {"crashed": "a bug"}
