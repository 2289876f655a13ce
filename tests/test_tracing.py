"""OpenTelemetry spans (S2META_OTEL_EXPORTER, docs/observability.md): their names, parents and
attributes from the console exporter's output, OTLP batches reaching a collector by shutdown,
and nothing traced or imported when unset."""

import asyncio
import contextlib
import http.server
import json
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import ClassVar

import httpx
import pytest
from conftest import running, settings_for
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from service.app import create_app
from service.scenarios import ScenarioService
from service.tracing import SERVICE_CALLS
from service.writes import ScenarioWrites

pytestmark = pytest.mark.anyio


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


def test_the_api_images_install_the_otel_extra():
    root = Path(__file__).resolve().parents[1]
    for name, extra in (("api.Dockerfile", "cpu"), ("api-gpu.Dockerfile", "gpu")):
        assert f'pip install ".[{extra},otel]"' in (root / "docker" / name).read_text(), name


def test_every_spanned_call_exists():
    """SERVICE_CALLS names the calls by path: each resolves on the service's classes, so a
    rename fails here (and at start with tracing on) rather than drop its span."""
    owners = {"": ScenarioService, "writes": ScenarioWrites}
    for path in SERVICE_CALLS:
        *owner, call = path.split(".")
        assert callable(getattr(owners[".".join(owner)], call)), path
