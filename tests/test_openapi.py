"""The OpenAPI document (service.openapi): valid OpenAPI 3.1 with valid JSON Schemas, every
error response an application/problem+json Problem (ValidationProblem for a 422), the errors
each kind of operation can give declared, Retry-After on 429 and 503, WWW-Authenticate on 401,
and the request limits of the app's settings stated in the request schemas."""

from typing import Any

import jsonschema
import pytest
from schemathesis.specs.openapi.definitions import OPENAPI_31_VALIDATOR

from service.app import create_app
from service.settings import Settings

PROBLEM = "application/problem+json"
REF = "#/components/schemas/"
METHODS = ("get", "post", "put", "delete", "patch")


@pytest.fixture(scope="module")
def document(tmp_path_factory) -> dict[str, Any]:
    settings = Settings(
        registry=tmp_path_factory.mktemp("registry"),
        max_interactions=123,
        max_candidates=4567,
        min_interactions=5,
    )
    return create_app(settings).openapi()


def operations(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        f"{method.upper()} {path}": operation
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if method in METHODS
    }


def test_the_document_is_valid_openapi_with_valid_schemas(document):
    assert document["openapi"].startswith("3.1")
    OPENAPI_31_VALIDATOR.validate(document)
    for schema in document["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)


def test_every_error_response_is_a_problem(document):
    seen = set()
    for label, operation in operations(document).items():
        for status, response in operation["responses"].items():
            if status[0] not in "45":
                assert PROBLEM not in response.get("content", {}), (label, status)
                continue
            seen.add(status)
            model = "ValidationProblem" if status == "422" else "Problem"
            assert list(response["content"]) == [PROBLEM], (label, status)
            assert response["content"][PROBLEM]["schema"] == {"$ref": REF + model}
            assert response["description"], (label, status)
    assert {"401", "403", "404", "412", "422", "429", "500", "503"} <= seen
    # One error shape: FastAPI's own 422 models are gone.
    schemas = document["components"]["schemas"]
    assert "HTTPValidationError" not in schemas and "ValidationError" not in schemas
    assert set(schemas["Problem"]["required"]) == {"type", "title", "status", "detail", "instance"}
    errors = schemas["ValidationProblem"]["properties"]["errors"]
    assert errors == {**errors, "type": "array", "items": {"$ref": REF + "FieldError"}}


def test_each_operation_declares_the_errors_it_can_give(document):
    for label, operation in operations(document).items():
        statuses = set(operation["responses"])
        assert "500" in statuses, label
        if "requestBody" in operation:
            assert {"400", "413", "422"} <= statuses, label
        if operation.get("parameters") or "requestBody" in operation:
            assert "422" in statuses, label
        else:
            assert "422" not in statuses, label
        bearer = any("HTTPBearer" in r for r in operation.get("security", []))
        assert bearer == ({"401", "403"} <= statuses), label
    ops = operations(document)
    assert "413" not in ops["GET /recommend"]["responses"]
    assert set(ops["GET /healthz"]["responses"]) == {"200", "500"}


def test_the_headers_of_401_429_and_503(document):
    headers: dict[str, list[tuple[str, bool]]] = {}
    for operation in operations(document).values():
        for status in ("401", "429", "503"):
            for name, header in operation["responses"].get(status, {}).get("headers", {}).items():
                headers.setdefault(status, []).append((name, header["required"]))
                assert header["schema"]["type"] in ("integer", "string")
    assert set(headers) == {"401", "429", "503"}
    assert set(headers["401"]) == {("WWW-Authenticate", True)}
    assert set(headers["429"]) == {("Retry-After", True)}
    # Only the unreachable store's 503 says when to retry.
    assert set(headers["503"]) == {("Retry-After", False)}
    for operation in operations(document).values():
        for status in ("401", "429", "503"):
            if status in operation["responses"]:
                assert operation["responses"][status]["headers"], status


def test_the_settings_limits_are_in_the_request_schemas(document):
    schemas = document["components"]["schemas"]
    adapt = schemas["AdaptRequest"]["properties"]
    assert (adapt["interactions"]["minItems"], adapt["interactions"]["maxItems"]) == (5, 123)
    assert (adapt["candidates"]["minItems"], adapt["candidates"]["maxItems"]) == (2, 4567)
    append = schemas["AppendRequest"]["properties"]["interactions"]
    assert (append["minItems"], append["maxItems"]) == (1, 123)


def test_the_document_is_generated_once_per_app(tmp_path):
    app = create_app(Settings(registry=tmp_path))
    assert app.openapi() is app.openapi()
    served = app.openapi_schema
    assert served is not None and "Problem" in served["components"]["schemas"]
