"""Every route of the OpenAPI schema fuzzed with schemathesis, in process over ASGI, against an
app with its lifespan run, a published meta learner and an admin token: once without a token
and once with it. No response may be a 5xx, and every response must match the schema
(status code, content type, headers, body), plus schemathesis's other default checks.

Bounded for CI: a fixed seed and at most 30 generated cases per operation and phase.

The module builds one app at import (schemathesis parametrizes at collection time), pointed at
a registry that a fixture publishes into before the first request; schemathesis starts the
lifespan on an operation's first request and stops it after each test
(`schemathesis.pytest.from_fixture` would avoid this, but fails under pytest 9.2, whose nodes
have no `_nodeid`). Each test first adapts one scenario, so that the fuzzer, which draws
scenario and user ids from a small dictionary half the time, also reaches the 200 paths of
recommend, describe, list and delete and checks their real bodies against the schema.
"""

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from synthetic import default_scenario

from model.artifact import publish
from service.app import create_app
from service.settings import Settings

TOKEN = "fuzz-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SCENARIO = "fuzz:world.1"

_registry_dir = tempfile.TemporaryDirectory(prefix="s2meta-fuzz-")
REGISTRY = Path(_registry_dir.name) / "registry"
app = create_app(
    Settings(registry=REGISTRY, admin_token=TOKEN, reload_poll_s=60, max_body_bytes=1 << 20)
)


def fuzz_config(users: list[str]) -> schemathesis.config.SchemathesisConfig:
    half = 0.5  # the other half of the draws are the fuzzer's own
    return schemathesis.config.SchemathesisConfig.from_dict(
        {
            "seed": 20240601,
            "generation": {"max-examples": 30},
            "checks": {
                "not_a_server_error": {"enabled": True},
                "response_schema_conformance": {"enabled": True},
            },
            "dictionaries": {"scenarios": {"values": [SCENARIO]}, "users": {"values": users}},
            "parameters": {
                "path.scenario_id": {"dictionary": "scenarios", "probability": half},
                "query.scenario": {"dictionary": "scenarios", "probability": half},
                "query.user": {"dictionary": "users", "probability": half},
            },
            "operations": [
                # Schema-valid bodies are mostly not adaptable: unknown ids, fewer than 8 usable
                # interactions, items outside the pool. Those are 422s the schema cannot say.
                {
                    "include-name": "POST /scenarios/{scenario_id}/adapt",
                    "checks": {"positive_data_acceptance": {"enabled": False}},
                },
            ],
        }
    )


# Any user of an adapted scenario gets a 200: a user with an embedding scored, any other id
# the popular fallback.
USERS = [default_scenario().eval_user, "ghost"]
schema = schemathesis.openapi.from_dict(app.openapi(), config=fuzz_config(USERS))
schema.app = app  # requests go to the app in process (what from_asgi does, without a lifespan)


@pytest.fixture(scope="module", autouse=True)
def published(artifact) -> Iterator[None]:
    publish(artifact, REGISTRY)
    yield
    _registry_dir.cleanup()


@pytest.fixture
def adapted(scenario) -> None:
    """One scenario adapted in this test's lifespan (schemathesis starts it here)."""
    operation = schema["/scenarios/{scenario_id}/adapt"]["POST"]
    case = operation.Case(
        path_parameters={"scenario_id": SCENARIO},
        headers=AUTH,
        body=scenario.body(),
        media_type="application/json",
    )
    response = case.call()
    assert response.status_code == 200, response.text


fuzz_settings = settings(
    database=None, deadline=None, suppress_health_check=list(HealthCheck), print_blob=True
)


@schema.parametrize()
@fuzz_settings
def test_fuzz_without_a_token(case, adapted):
    case.call_and_validate()


@schema.parametrize()
@fuzz_settings
def test_fuzz_with_the_admin_token(case, adapted):
    case.call_and_validate(headers=AUTH)
