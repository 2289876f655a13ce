"""The current request's id: set by service.observability's middleware for the request's
run, read by the log formatters and the spans (service.tracing)."""

import re
import uuid
from contextvars import ContextVar

REQUEST_ID_HEADER = b"x-request-id"
# Visible ASCII, bounded: a client's id is echoed in a header and written to every log line.
VALID_REQUEST_ID = re.compile(rb"[\x21-\x7e]{1,128}")

request_id: ContextVar[str | None] = ContextVar("s2meta_request_id", default=None)


def incoming_request_id(headers: list[tuple[bytes, bytes]]) -> str:
    """The request's X-Request-ID if it is a valid one, else a new id (uuid4, hex)."""
    for name, value in headers:
        if name == REQUEST_ID_HEADER:
            if VALID_REQUEST_ID.fullmatch(value):
                return value.decode("ascii")
            break
    return uuid.uuid4().hex
