"""The current request's id: set by service.observability's middleware for the request's
run, read by the log formatters and the spans (service.tracing)."""

import os
import re
from contextvars import ContextVar

REQUEST_ID_HEADER = b"x-request-id"
# Visible ASCII, bounded: a client's id is echoed in a header and written to every log line.
VALID_REQUEST_ID = re.compile(rb"[\x21-\x7e]{1,128}")

request_id: ContextVar[str | None] = ContextVar("s2meta_request_id", default=None)


def incoming_request_id(headers: list[tuple[bytes, bytes]]) -> str:
    """The request's X-Request-ID if it is a valid one, else a new id (a uuid4, hex)."""
    for name, value in headers:
        if name == REQUEST_ID_HEADER:
            if VALID_REQUEST_ID.fullmatch(value):
                return value.decode("ascii")
            break
    return new_request_id()


def new_request_id() -> str:
    """A random uuid4 in hex, built without uuid.UUID, which costs three times as much."""
    value = bytearray(os.urandom(16))
    value[6] = value[6] & 0x0F | 0x40  # version 4
    value[8] = value[8] & 0x3F | 0x80  # RFC 4122 variant
    return value.hex()
