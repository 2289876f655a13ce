"""Observability (docs/observability.md): request ids on every response and log line, JSON log
lines, OpenTelemetry spans (console exporter and OTLP), the meta-learner info metric."""

import asyncio
import contextlib
import http.server
import io
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import ClassVar

import httpx
import pytest
from conftest import running, serving, settings_for
from fastapi import Request
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

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


def spans_printed(out: str) -> list[dict]:
    """The console exporter's spans: JSON objects one after another."""
    decoder, spans, at = json.JSONDecoder(), [], 0
    while (at := out.find("{", at)) != -1:
        span, at = decoder.raw_decode(out, at)
        spans.append(span)
    return spans


async def test_console_spans_of_adapt_and_recommend(registry, scenario, capsys):
    settings = settings_for(registry, otel_exporter="console")
    async with running(settings) as (_, client):
        capsys.readouterr()
        sid = scenario.scenario_id
        headers = {"X-Request-ID": "adapt-1"}
        adapted = await client.post(
            f"/scenarios/{sid}/adapt", json=scenario.body(), headers=headers
        )
        assert adapted.status_code == 200, adapted.text
        adapt_spans = spans_printed(capsys.readouterr().out)
        params = {"user": scenario.eval_user, "scenario": sid}
        traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        headers = {"X-Request-ID": "rec-1", "traceparent": traceparent}
        assert (await client.get("/recommend", params=params, headers=headers)).status_code == 200
        recommend_spans = spans_printed(capsys.readouterr().out)
    revision = adapted.json()["revision"]

    by_name = {span["name"]: span for span in adapt_spans}
    server = by_name["POST /scenarios/{scenario_id}/adapt"]
    adapt = by_name["adapt"]
    assert server["kind"] == "SpanKind.SERVER" and server["parent_id"] is None
    assert adapt["parent_id"] == server["context"]["span_id"]
    store_spans = [span for span in adapt_spans if span["name"].startswith("store.")]
    assert "store.put" in by_name
    assert all(span["parent_id"] == adapt["context"]["span_id"] for span in store_spans), [
        (span["name"], span["parent_id"]) for span in adapt_spans
    ]
    assert server["attributes"]["http.response.status_code"] == 200
    assert adapt["attributes"]["s2meta.scenario_id"] == sid
    assert adapt["attributes"]["s2meta.revision"] == revision
    assert adapt["attributes"]["s2meta.variant"] == adapted.json()["variant"]
    assert by_name["store.put"]["attributes"]["s2meta.revision"] == revision
    assert {span["attributes"]["s2meta.request_id"] for span in adapt_spans} == {"adapt-1"}
    assert len({span["context"]["trace_id"] for span in adapt_spans}) == 1

    by_name = {span["name"]: span for span in recommend_spans}
    server, recommend, rank = by_name["GET /recommend"], by_name["recommend"], by_name["rank"]
    # The caller's trace continues: its W3C traceparent is the server span's parent.
    assert server["context"]["trace_id"] == "0x0af7651916cd43dd8448eb211c80319c"
    assert server["parent_id"] == "0xb7ad6b7169203331"
    assert recommend["parent_id"] == server["context"]["span_id"]
    assert rank["parent_id"] == recommend["context"]["span_id"]
    assert rank["attributes"]["s2meta.revision"] == revision
    assert rank["attributes"]["s2meta.variant"] == adapted.json()["variant"]
    assert rank["attributes"]["s2meta.source"] == "adapted"
    assert recommend["attributes"]["s2meta.scenario_id"] == sid
    assert {span["attributes"]["s2meta.request_id"] for span in recommend_spans} == {"rec-1"}


class Collector(http.server.BaseHTTPRequestHandler):
    """An OTLP/HTTP endpoint that keeps what it is sent."""

    received: ClassVar[list[tuple[str, bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.path, body))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@contextlib.asynccontextmanager
async def lifespan_through_asgi(app: object) -> AsyncIterator[None]:
    """The app's lifespan run through its ASGI interface, as uvicorn runs it."""
    events: asyncio.Queue[dict] = asyncio.Queue()
    sent: asyncio.Queue[dict] = asyncio.Queue()
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    task = asyncio.create_task(app(scope, events.get, sent.put))
    await events.put({"type": "lifespan.startup"})
    assert (await sent.get())["type"] == "lifespan.startup.complete"
    yield
    await events.put({"type": "lifespan.shutdown"})
    assert (await sent.get())["type"] == "lifespan.shutdown.complete"
    await task


async def test_otlp_spans_reach_the_endpoint_by_shutdown(registry, monkeypatch):
    server = http.server.HTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "s2meta-test")
    app = create_app(settings_for(registry, otel_exporter="otlp"))
    try:
        # The spans are sent in batches: the one still held goes out at shutdown.
        async with lifespan_through_asgi(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://s2meta") as client:
                assert (await client.get("/scenarios/nope")).status_code == 404
            assert not Collector.received
    finally:
        server.shutdown()
    request = ExportTraceServiceRequest()
    paths = {path for path, _ in Collector.received}
    assert paths == {"/v1/traces"}
    for _, body in Collector.received:
        request.MergeFromString(body)
    (resource,) = request.resource_spans
    service_name = {a.key: a.value.string_value for a in resource.resource.attributes}
    assert service_name["service.name"] == "s2meta-test"
    names = {span.name for scope in resource.scope_spans for span in scope.spans}
    assert {"GET /scenarios/{scenario_id}", "describe", "store.get_meta"} <= names, names


async def test_no_exporter_no_spans_and_no_sdk(registry):
    async with running(settings_for(registry)) as (app, client):
        assert app.state.tracer is None
        assert not hasattr(app.state.service.store, "_store")  # not wrapped
        assert (await client.get("/healthz")).status_code == 200
    # fastapi and redis import parts of OpenTelemetry themselves; tracing's are not imported.
    code = (
        "import sys; from service.app import create_app; from service.settings import Settings; "
        "create_app(Settings(registry='.')); "
        "print(sorted(m for m in sys.modules if m.startswith(("
        "'opentelemetry.sdk.trace', 'opentelemetry.exporter'))))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


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


def test_the_api_images_install_the_otel_extra():
    root = Path(__file__).resolve().parents[1]
    for name, extra in (("api.Dockerfile", "cpu"), ("api-gpu.Dockerfile", "gpu")):
        assert f'pip install ".[{extra},otel]"' in (root / "docker" / name).read_text(), name
