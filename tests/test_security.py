"""Security: tokens guard the routes, are counted when refused and never logged; no pickle
anywhere; registry paths cannot leave the registry; CORS is off unless configured."""

import ast
import dataclasses
import logging
from pathlib import Path

import pytest
from conftest import running
from problem_checks import assert_problem, urn

from model.artifact import current_version
from model.errors import ArtifactError
from service.app import create_app
from service.settings import Settings

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parents[1]
ADMIN, READ = "admin-SECRET-7f3a9c", "read-SECRET-21be44"


async def test_read_token_and_admin_token_guard_their_routes(registry, scenario, caplog):
    settings = Settings(registry=registry, admin_token=ADMIN, read_token=READ)
    admin = {"Authorization": f"Bearer {ADMIN}"}
    read = {"Authorization": f"Bearer {READ}"}
    wrong = {"Authorization": "Bearer nope"}
    caplog.set_level(logging.DEBUG)
    async with running(settings) as (_, client):
        url = "/scenarios/guarded/adapt"
        assert (await client.post(url, json=scenario.body(), headers=read)).status_code == 403
        assert (await client.post(url, json=scenario.body(), headers=admin)).status_code == 200
        params = {"user": scenario.eval_user, "scenario": "guarded"}
        for route, query in (
            ("/recommend", params),
            ("/scenarios/guarded", {}),
            ("/scenarios", {}),
        ):
            missing = await client.get(route, params=query)
            assert_problem(missing, 401, detail="read token required")
            assert missing.headers["WWW-Authenticate"] == "Bearer"
            refused = await client.get(route, params=query, headers=wrong)
            assert_problem(refused, 403, detail="read token not accepted")
            assert (await client.get(route, params=query, headers=read)).status_code == 200
            assert (await client.get(route, params=query, headers=admin)).status_code == 200
        # The token is checked before the query: no validation details without one.
        assert (await client.get("/recommend", params={"n": 0})).status_code == 401
        assert (await client.get("/healthz")).status_code == 200  # probes stay open
        assert (await client.get("/metrics")).status_code == 200
        metrics = (await client.get("/metrics")).text
    assert 's2meta_auth_failures_total{reason="missing",role="read"} 4.0' in metrics
    assert 's2meta_auth_failures_total{reason="wrong",role="read"} 3.0' in metrics
    assert 's2meta_auth_failures_total{reason="wrong",role="admin"} 1.0' in metrics
    assert ADMIN not in caplog.text and READ not in caplog.text
    assert ADMIN not in repr(settings) and READ not in str(dataclasses.asdict(_Shown(settings)))


def test_openapi_declares_each_routes_token(tmp_path):
    """The read routes take the bearer token or none (open unless a read token is set), the
    admin routes the bearer token; recommend, which checks its token without a dependency,
    declares the same as the other read routes."""
    paths = create_app(Settings(registry=tmp_path)).openapi()["paths"]
    read, admin = [{"HTTPBearer": []}, {}], [{"HTTPBearer": []}]
    assert paths["/recommend"]["get"]["security"] == read
    assert paths["/scenarios"]["get"]["security"] == read
    assert paths["/scenarios/{scenario_id}"]["get"]["security"] == read
    assert paths["/scenarios/{scenario_id}"]["delete"]["security"] == admin
    assert paths["/scenarios/{scenario_id}/adapt"]["post"]["security"] == admin


@dataclasses.dataclass
class _Shown:
    settings: Settings


def test_no_pickle_anywhere():
    """Weights are safetensors, metadata JSON: nothing deserialises pickles."""
    for package in ("model", "service", "meta_training", "s2meta"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    names = [a.name for a in node.names] + [getattr(node, "module", "") or ""]
                    assert not any("pickle" in n or n == "dill" for n in names), path
                if isinstance(node, ast.Call):
                    called = ast.unparse(node.func)
                    assert called not in ("torch.load", "pickle.loads", "joblib.load"), path
                    for keyword in node.keywords:
                        allows = keyword.arg == "allow_pickle"
                        assert not (allows and ast.unparse(keyword.value) == "True"), path


@pytest.mark.parametrize("pointer", ["../../etc", "v0001/../../x", "/etc/passwd", "latest"])
def test_registry_pointer_cannot_leave_the_registry(tmp_path, pointer):
    (tmp_path / "current").write_text(pointer + "\n")
    with pytest.raises(ArtifactError, match="not a version name"):
        current_version(tmp_path)


async def test_a_tampered_version_in_the_store_cannot_open_other_paths(registry, scenario):
    async with running(Settings(registry=registry)) as (app, client):
        await client.post("/scenarios/tampered/adapt", json=scenario.body())
        store = app.state.service.store
        stored = await store.get("tampered")
        meta = {**stored.state.meta, "meta_learner": "../../outside"}
        await store.put("tampered", dataclasses.replace(stored.state, meta=meta))
        params = {"user": scenario.eval_user, "scenario": "tampered"}
        response = await client.get("/recommend", params=params)
    assert_problem(response, 503, urn("meta-learner-unavailable"), "not a version name")


async def test_cors_is_off_unless_configured(registry):
    preflight = {"Origin": "https://shop.example", "Access-Control-Request-Method": "GET"}
    async with running(Settings(registry=registry)) as (_, client):
        response = await client.options("/recommend", headers=preflight)
        assert "access-control-allow-origin" not in response.headers
    configured = Settings(registry=registry, cors_origins=["https://shop.example"])
    async with running(configured) as (_, client):
        response = await client.options("/recommend", headers=preflight)
        assert response.headers["access-control-allow-origin"] == "https://shop.example"
        # A browser may send the conditional and tracing headers and read the answers'.
        asked = {**preflight, "Access-Control-Request-Headers": "if-match, x-request-id"}
        assert (await client.options("/recommend", headers=asked)).status_code == 200
        simple = await client.get("/healthz", headers={"Origin": "https://shop.example"})
        exposed = simple.headers["access-control-expose-headers"]
        assert {"ETag", "X-Request-ID", "Retry-After"} <= set(exposed.split(", "))
        # A refused preflight is a problem like every other 4xx.
        refused = await client.options(
            "/recommend", headers={**preflight, "Origin": "https://elsewhere.example"}
        )
        assert_problem(refused, 400, "about:blank", "Disallowed CORS origin")
