"""Assertions on RFC 9457 problem answers (service.problems), shared by the tests of errors."""

from typing import Any

import httpx

PROBLEM = "application/problem+json"
FIELDS = {"type", "title", "status", "detail", "instance"}


def urn(slug: str) -> str:
    return f"urn:s2meta:problem:{slug}"


def assert_problem(
    response: httpx.Response, status: int, type_: str = "about:blank", detail: str = ""
) -> dict[str, Any]:
    """The response is a problem of this status and type, about the request's path, whose
    detail contains `detail`; no member beyond RFC 9457's but a validation error's `errors`."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    extra = {"errors"} if type_ == urn("invalid-request") else set()
    assert FIELDS <= set(body) <= FIELDS | extra, body
    assert body["type"] == type_ and body["status"] == status, body
    assert body["instance"] == response.request.url.raw_path.decode().split("?")[0]
    assert isinstance(body["title"], str) and body["title"]
    assert detail in body["detail"], body
    return body
