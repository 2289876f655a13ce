"""The OpenAPI document as FastAPI generates it, post-processed so that it says what the service
really answers: every error as `application/problem+json` (service.problems), the error
statuses each operation can give, their headers, and the limits that come from the settings.

Routes declare their own errors (status and description); this module adds what is the same
everywhere, so that no route can forget it."""

import copy
import json
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from pydantic.json_schema import models_json_schema

from service.problems import MEDIA_TYPE, Problem, ValidationProblem
from service.settings import Settings

Document = dict[str, Any]
REF = "#/components/schemas/{model}"
BEARER = "HTTPBearer"  # the scheme FastAPI names after routes.bearer's class
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")

# What an operation of each kind can answer whether or not its route declares it.
BODY_ERRORS = {
    "400": "a malformed Content-Length, or a body that is not UTF-8",
    "413": "request body larger than S2META_MAX_BODY_BYTES",
}
AUTH_ERRORS = {
    "401": "no bearer token (Authorization: Bearer <token>) where one is required",
    "403": "a bearer token that is not accepted here",
}
INVALID = "invalid fields (type invalid-request, each listed under errors)"
UNEXPECTED = "an unexpected error (logged; the answer names no internals)"

RETRY_AFTER = {
    "description": "seconds to wait before retrying (S2META_RETRY_AFTER_S)",
    "schema": {"type": "integer", "minimum": 1},
}
# The headers of an error status: (name, definition, sent with every answer of that status).
ERROR_HEADERS: dict[str, list[tuple[str, dict[str, Any], bool]]] = {
    "401": [
        (
            "WWW-Authenticate",
            {"description": "the scheme to authenticate with", "schema": {"type": "string"}},
            True,
        )
    ],
    "429": [("Retry-After", RETRY_AFTER, True)],
    # Only the unreachable store's 503 (store-unavailable) is temporary enough to say when.
    "503": [("Retry-After", RETRY_AFTER, False)],
}

# Request limits the service enforces from its settings: (schema, property, keyword) -> value.
SettingsLimits = dict[tuple[str, str, str], Callable[[Settings], int]]
SETTINGS_LIMITS: SettingsLimits = {
    # Fewer than min_interactions can never leave enough usable ones (docs/http-api.md).
    ("AdaptRequest", "interactions", "minItems"): lambda s: s.min_interactions,
    ("AdaptRequest", "interactions", "maxItems"): lambda s: s.max_interactions,
    ("AdaptRequest", "candidates", "maxItems"): lambda s: s.max_candidates,
    ("AppendRequest", "interactions", "maxItems"): lambda s: s.max_interactions,
}


def install_openapi(app: FastAPI, settings: Settings) -> None:
    """Make `app.openapi()` (and /openapi.json) answer the post-processed document."""
    generate = app.openapi

    def openapi() -> Document:
        if app.openapi_schema is None:
            # A copy: FastAPI caches the document it generates in the same attribute.
            document = with_problems(copy.deepcopy(generate()), settings)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def with_problems(document: Document, settings: Settings) -> Document:
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    _, definitions = models_json_schema(
        [(Problem, "serialization"), (ValidationProblem, "serialization")], ref_template=REF
    )
    schemas.update(definitions["$defs"])
    for operation in operations(document):
        responses = operation.setdefault("responses", {})
        for status, description in implied_errors(operation).items():
            responses.setdefault(status, {"description": description})
        for status, response in responses.items():
            if is_error(status):
                declare_problem(status, response)
    for (name, prop, keyword), limit in SETTINGS_LIMITS.items():
        if name in schemas:  # a model the routes do not use is not in the document
            schemas[name]["properties"][prop][keyword] = limit(settings)
    drop_unused(document, ("HTTPValidationError", "ValidationError"))
    return document


def operations(document: Document) -> list[Document]:
    return [
        operation
        for path in document.get("paths", {}).values()
        for method, operation in path.items()
        if method in METHODS
    ]


def is_error(status: str) -> bool:
    return status[:1] in ("4", "5")


def implied_errors(operation: Document) -> dict[str, str]:
    """The errors every operation of its kind can give: BodySizeLimit's on a body, the
    bearer scheme's where it is required, FastAPI's 422 where anything is validated, and an
    unexpected 500 anywhere."""
    implied: dict[str, str] = {}
    if "requestBody" in operation:
        implied |= BODY_ERRORS
    if any(BEARER in requirement for requirement in operation.get("security", [])):
        implied |= AUTH_ERRORS
    if "requestBody" in operation or operation.get("parameters"):
        implied["422"] = INVALID
    implied["500"] = UNEXPECTED
    return implied


def declare_problem(status: str, response: Document) -> None:
    """The response's content as a problem (its examples kept), and its headers."""
    model = ValidationProblem if status == "422" else Problem
    media: Document = {"schema": {"$ref": REF.format(model=model.__name__)}}
    for declared in response.get("content", {}).values():
        media |= {k: v for k, v in declared.items() if k in ("example", "examples")}
    response["content"] = {MEDIA_TYPE: media}
    if status == "422" and response.get("description") == "Validation Error":  # FastAPI's
        response["description"] = INVALID
    for name, definition, required in ERROR_HEADERS.get(status, []):
        response.setdefault("headers", {})[name] = definition | {"required": required}


def drop_unused(document: Document, names: tuple[str, ...]) -> None:
    """Remove the named component schemas (FastAPI's own 422 models) once nothing refers to
    them, so that the document shows one error shape."""
    schemas = document["components"]["schemas"]
    for name in names:  # in order: a model before the ones it refers to
        if name not in schemas:
            continue
        rest = {**document, "components": {**document["components"], "schemas": schemas.copy()}}
        del rest["components"]["schemas"][name]
        if f'"{REF.format(model=name)}"' not in json.dumps(rest):
            del schemas[name]
