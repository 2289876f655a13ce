"""RFC 9457 problem details: the one shape of every 4xx and 5xx the service sends.

`Problem` and `ValidationProblem` are the OpenAPI models; `problem_body` builds the JSON object
(also for the pure ASGI middleware, which has no Request), `problem_response` the response."""

from http import HTTPStatus
from typing import Any
from urllib.parse import quote

from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from pydantic.json_schema import SkipJsonSchema
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.types import Receive, Scope, Send

MEDIA_TYPE = "application/problem+json"
ABOUT_BLANK = "about:blank"
TYPE_PREFIX = "urn:s2meta:problem:"


class Problem(BaseModel):
    """An error answer (RFC 9457): `type` names its kind, `detail` this occurrence."""

    type: str = Field(
        description="about:blank for a plain HTTP error, else urn:s2meta:problem:<slug> "
        "(docs/http-api.md#errors)",
        examples=["urn:s2meta:problem:unknown-scenario"],
    )
    title: str = Field(description="the kind's short summary, the same for every occurrence")
    status: int = Field(ge=400, le=599, description="the HTTP status code")
    detail: str = Field(description="what went wrong with this request")
    instance: str = Field(description="the request's path", examples=["/scenarios/shop.42"])


class FieldError(BaseModel):
    """One invalid field of a request."""

    loc: list[str | int] = Field(description='where: ["body", "interactions", 0, "user"]')
    msg: str
    type: str = Field(description="pydantic's error type, e.g. missing, too_short")


class ValidationProblem(Problem):
    """A 422: invalid fields (type invalid-request, with `errors`), or a scenario that cannot
    be adapted (type not-adaptable, without them)."""

    # Absent rather than null when there are none: SkipJsonSchema keeps null out of the schema.
    errors: list[FieldError] | SkipJsonSchema[None] = Field(
        None, description="each invalid field; present when type is invalid-request"
    )


def instance_of(scope: Scope) -> str:
    """The request's path as sent (percent-encoded), a URI reference as RFC 9457 wants."""
    raw = scope.get("raw_path")
    if raw:
        return raw.decode("latin-1").split("?", 1)[0]
    return quote(scope.get("path", "/"))


def status_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:  # a code Python does not name (an HTTPException may carry any)
        return "Client Error" if status < 500 else "Server Error"


def problem_body(
    status: int,
    detail: str,
    instance: str,
    type_: str = ABOUT_BLANK,
    title: str | None = None,
    **extensions: Any,
) -> dict[str, Any]:
    """The problem object; an about:blank title is the status phrase (RFC 9457, 4.2.1)."""
    if title is None:
        title = status_phrase(status)
    body = {"type": type_, "title": title, "status": status, "detail": detail, "instance": instance}
    return body | extensions


def problem_response(
    scope: Scope,
    status: int,
    detail: str,
    type_: str = ABOUT_BLANK,
    title: str | None = None,
    headers: dict[str, str] | None = None,
    **extensions: Any,
) -> JSONResponse:
    body = problem_body(status, detail, instance_of(scope), type_, title, **extensions)
    return JSONResponse(body, status_code=status, headers=headers, media_type=MEDIA_TYPE)


class ProblemCORSMiddleware(CORSMiddleware):
    """Starlette's CORS, with a refused preflight (its plain-text 400) answered as a problem
    like every other 4xx; the rest is Starlette's."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = Headers(scope=scope) if scope["type"] == "http" else None
        if (
            headers is not None
            and scope["method"] == "OPTIONS"
            and "origin" in headers
            and "access-control-request-method" in headers
        ):
            response = self.preflight_response(request_headers=headers)
            if response.status_code == 400:
                cors = {
                    name: value
                    for name, value in response.headers.items()
                    if name.startswith("access-control-")
                }
                detail = bytes(response.body).decode()
                response = problem_response(scope, 400, detail, headers=cors)
            await response(scope, receive, send)
            return
        await super().__call__(scope, receive, send)
