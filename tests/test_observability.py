"""Observability (docs/observability.md): request ids on every response and log line, JSON log
lines, the meta-learner info metric. The spans: tests/test_tracing.py."""

import io
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import uuid

import httpx
import pytest
from conftest import running, serving, settings_for
from fastapi import Request

from service.app import create_app
from service.context import request_id
from service.metrics import ServiceMetrics
from service.observability import JsonFormatter, TextFormatter

pytestmark = pytest.mark.anyio
GENERATED = re.compile(r"[0-9a-f]{32}")


async def test_request_id_is_echoed_generated_or_replaced(registry):
    async with running(settings_for(registry)) as (_, client):
        given = await client.get("/healthz", headers={"X-Request-ID": "checkout-42.a/b"})
        assert given.headers["x-request-id"] == "checkout-42.a/b"
        made = [(await client.get("/healthz")).headers["x-request-id"] for _ in range(2)]
        assert all(GENERATED.fullmatch(value) for value in made) and made[0] != made[1]
        assert {uuid.UUID(value).version for value in made} == {4}
        for invalid in ("x" * 129, "has space", "tab\tin", "é"):
            answer = await client.get("/healthz", headers={"X-Request-ID": invalid.encode()})
            assert GENERATED.fullmatch(answer.headers["x-request-id"]), invalid
        assert request_id.get() is None  # reset after each request


async def test_errors_and_refusals_carry_the_request_id(registry, scenario):
    settings = settings_for(registry, max_body_bytes=1024)
    async with running(settings) as (_, client):
        headers = {"X-Request-ID": "r-1"}
        for answer in [
            await client.post("/scenarios/s1/adapt", json=scenario.body(), headers=headers),
            await client.get(
                "/recommend", params={"user": "u", "scenario": "nope"}, headers=headers
            ),
            await client.get("/recommend", headers=headers),
            await client.get("/nowhere", headers=headers),
        ]:
            assert answer.status_code in (404, 413, 422), answer.text
            assert answer.headers["x-request-id"] == "r-1"


async def test_an_unhandled_error_answers_500_with_the_request_id(registry, monkeypatch):
    app = create_app(settings_for(registry))

    async def broken(scenario_id: str) -> dict:
        raise RuntimeError("a bug")

    async with app.router.lifespan_context(app):
        monkeypatch.setattr(app.state.service, "describe", broken)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://s2meta") as client:
            answer = await client.get("/scenarios/s1", headers={"X-Request-ID": "boom-1"})
    assert answer.status_code == 500
    assert answer.headers["x-request-id"] == "boom-1"


async def test_json_log_lines_carry_the_request_id_and_extra_fields(registry):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("s2meta.test")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    app = create_app(settings_for(registry))

    async def logs(request: Request) -> dict:
        logger.info("inside %s", "the request", extra={"scenario": "s1"})
        try:
            raise ValueError("caught")
        except ValueError:
            logger.exception("with a traceback")
        return {}

    app.add_api_route("/logs", logs)
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://s2meta") as client:
                answer = await client.get("/logs")
        logger.info("outside")
    finally:
        logger.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 3
    inside, failed, outside = lines
    assert inside["message"] == "inside the request" and inside["level"] == "INFO"
    assert inside["logger"] == "s2meta.test" and inside["scenario"] == "s1"
    assert inside["request_id"] == answer.headers["x-request-id"] == failed["request_id"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", inside["time"])
    assert "ValueError: caught" in failed["exception"] and failed["level"] == "ERROR"
    assert "request_id" not in outside


def test_text_lines_name_the_request_id():
    record = logging.LogRecord("s2meta", logging.INFO, __file__, 1, "hello", None, None)
    assert TextFormatter().format(record).endswith("INFO s2meta: hello")
    token = request_id.set("abc")
    try:
        assert TextFormatter().format(record).endswith("hello [request_id=abc]")
    finally:
        request_id.reset(token)


def test_serve_writes_json_lines_uvicorns_included(registry, scenario, tmp_path):
    env = {
        "S2META_REGISTRY": str(registry),
        "S2META_LOG_FORMAT": "json",
        "S2META_ACCESS_LOG": "true",
    }
    with serving(env, tmp_path / "serve.log") as base:
        params = {"user": scenario.eval_user, "scenario": "unknown"}
        answer = httpx.get(f"{base}/recommend", params=params, headers={"X-Request-ID": "q-7"})
        assert answer.status_code == 404 and answer.headers["x-request-id"] == "q-7"
    lines = [json.loads(line) for line in (tmp_path / "serve.log").read_text().splitlines()]
    loggers = {line["logger"] for line in lines}
    assert {"uvicorn.error", "uvicorn.access"} <= loggers, loggers
    (access,) = [line for line in lines if line.get("path", "").startswith("/recommend")]
    assert access["request_id"] == "q-7" and access["status"] == 404
    assert any(line["message"] == "Application shutdown complete." for line in lines)


def test_metrics_info_shows_each_loaded_version():
    metrics = ServiceMetrics()
    loaded = {("v0001", "hybrid", "hybrid,mapping")}
    metrics.track_loaded(lambda: set(loaded))
    text = metrics.exposition().decode()
    line = 's2meta_meta_learner_info{default_variant="hybrid",variants="hybrid,mapping",'
    assert line + 'version="v0001"} 1.0' in text
    loaded.add(("v0002", "mapping", "mapping"))
    assert 'version="v0002"} 1.0' in metrics.exposition().decode()
    loaded.discard(("v0001", "hybrid", "hybrid,mapping"))
    text = metrics.exposition().decode()
    assert 'version="v0001"' not in text and 'version="v0002"} 1.0' in text


async def test_metrics_endpoint_shows_the_loaded_meta_learner(registry):
    async with running(settings_for(registry)) as (_, client):
        text = (await client.get("/metrics")).text
    line = 's2meta_meta_learner_info{default_variant="hybrid",variants="hybrid,interaction,'
    assert line + 'mapping",version="v0001"} 1.0' in text


def test_metrics_info_across_worker_processes(tmp_path):
    """Multiprocess mode: each worker's loaded versions, shown by any of them; a version a
    live worker unloaded reads 0, one only an exited worker held is gone."""
    worker = textwrap.dedent(
        """
        import sys
        from service.metrics import ServiceMetrics
        versions, then = set(sys.argv[1].split(",")), sys.argv[2]
        metrics = ServiceMetrics()
        metrics.track_loaded(lambda: {(v, "hybrid", "hybrid") for v in versions})
        if then == "exit":
            metrics.process_exiting()
        elif then == "unload":
            versions.clear()
            metrics.show_loaded()
        else:
            print(metrics.exposition().decode())
        """
    )

    def run(versions: str, then: str) -> str:
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
        command = [sys.executable, "-c", worker, versions, then]
        return subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout

    run("v0001", "exit")
    run("v0004", "unload")
    text = run("v0002,v0003", "show")
    shown = re.findall(r's2meta_meta_learner_info\{[^}]*version="(v\d+)"\} (\S+)', text)
    assert dict(shown) == {"v0002": "1.0", "v0003": "1.0", "v0004": "0.0"}
