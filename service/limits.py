"""A request-body size limit, enforced before a body is read whole into memory.

FastAPI reads a JSON body whole before validating it, so without a limit one request can make
the process buffer gigabytes. `BodySizeLimit` is a pure ASGI middleware (no buffering, no
Starlette request objects) that refuses oversized bodies as early as it can tell:

- a declared Content-Length over the limit is answered 413 before anything is received, and a
  malformed one 400;
- a body without a Content-Length (chunked) is counted as it is received, and answered 413 as
  soon as the count passes the limit: the rest is never pulled. The application is then told
  the client went away (`http.disconnect`), and whatever it answers to that is dropped.

Refusals are RFC 9457 problems like the API's other errors (service.problems), and ask the
server to close the connection, since the unread rest of the body is still on it.
"""

import json

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.problems import MEDIA_TYPE, instance_of, problem_body


async def refuse(scope: Scope, send: Send, status: int, detail: str) -> None:
    """Answer a problem and have the connection closed after it."""
    problem = problem_body(status, detail, instance_of(scope))
    body = json.dumps(problem, separators=(",", ":")).encode()
    headers = [
        (b"content-type", MEDIA_TYPE.encode()),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def declared_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The request's Content-Length, None if absent; ValueError (the reason) if malformed."""
    values = {value.strip() for name, value in headers if name.lower() == b"content-length"}
    if not values:
        return None
    if len(values) > 1:
        raise ValueError("conflicting Content-Length headers")
    (value,) = values
    if not value.isdigit():  # ASCII digits only: no sign, no spaces, no lists
        raise ValueError("malformed Content-Length header")
    # Capped, so that int() never parses thousands of digits (Python refuses over 4300).
    return int(value) if len(value) <= 18 else 10**18


def _bodiless_http1(scope: Scope) -> bool:
    """An HTTP/1.x request with neither Content-Length nor Transfer-Encoding has no body
    (RFC 9112, 6.3). HTTP/2 streams a body without either, so it is always counted."""
    return scope.get("http_version") in ("1.0", "1.1") and not any(
        name.lower() == b"transfer-encoding" for name, _ in scope["headers"]
    )


class BodySizeLimit:
    """Refuse request bodies over `max_bytes` with 413, without reading them whole."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = f"request body larger than {self.max_bytes} bytes"
        try:
            length = declared_length(scope["headers"])
        except ValueError as error:
            await refuse(scope, send, 400, str(error))
            return
        if length is not None and length > self.max_bytes:
            await refuse(scope, send, 413, too_large)
            return
        if length is None and _bodiless_http1(scope):
            # Nothing to count (a GET, say), and the hot path (recommend) skips the wrappers.
            await self.app(scope, receive, send)
            return

        received = 0
        refused = False
        started = False

        async def counted_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    refused = True
                    if not started:  # a response under way cannot be replaced; it is cut
                        await refuse(scope, send, 413, too_large)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:  # the 413 has gone out; the app's answer to the cut body is dropped
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except ClientDisconnect:
            if not refused:  # a real disconnect, not the one this middleware made up
                raise
