"""The OpenAPI document names, groups and illustrates every operation: readable operation ids,
tags, request and response examples that are themselves valid, and the conditional-request
headers (If-Match in, ETag out) where the routes use them."""

from pathlib import Path

import pytest

from service.app import create_app
from service.schemas import AdaptRequest, AdaptResponse, AppendRequest, RecommendManyRequest
from service.settings import Settings

OPERATIONS = {
    ("post", "/scenarios/{scenario_id}/adapt"): ("adaptScenario", "scenarios"),
    ("post", "/scenarios/{scenario_id}/interactions"): ("appendInteractions", "scenarios"),
    ("get", "/scenarios"): ("listScenarios", "scenarios"),
    ("get", "/scenarios/{scenario_id}"): ("getScenario", "scenarios"),
    ("delete", "/scenarios/{scenario_id}"): ("deleteScenario", "scenarios"),
    ("get", "/recommend"): ("recommend", "recommendations"),
    ("post", "/scenarios/{scenario_id}/recommendations"): ("recommendMany", "recommendations"),
    ("get", "/healthz"): ("liveness", "operations"),
    ("get", "/readyz"): ("readiness", "operations"),
    ("get", "/metrics"): ("metrics", "operations"),
}


@pytest.fixture(scope="module")
def document() -> dict:
    return create_app(Settings(registry=Path("unused"))).openapi()


def test_every_operation_has_its_id_and_tag(document):
    found = {
        (method, path): (operation["operationId"], *operation["tags"])
        for path, methods in document["paths"].items()
        for method, operation in methods.items()
    }
    assert found == OPERATIONS


@pytest.mark.parametrize(
    "model", [AdaptRequest, AppendRequest, RecommendManyRequest, AdaptResponse]
)
def test_examples_are_valid_instances(document, model):
    [example] = document["components"]["schemas"][model.__name__]["examples"]
    model.model_validate(example)


def test_writes_take_if_match_and_answer_an_etag(document):
    paths = document["paths"]
    for method, path in [
        ("post", "/scenarios/{scenario_id}/adapt"),
        ("post", "/scenarios/{scenario_id}/interactions"),
        ("delete", "/scenarios/{scenario_id}"),
    ]:
        operation = paths[path][method]
        assert any(p["name"] == "If-Match" and p["in"] == "header" for p in operation["parameters"])
        assert "412" in operation["responses"]
    for method, path in [
        ("post", "/scenarios/{scenario_id}/adapt"),
        ("post", "/scenarios/{scenario_id}/interactions"),
        ("get", "/scenarios/{scenario_id}"),
    ]:
        assert "ETag" in paths[path][method]["responses"]["200"]["headers"]
