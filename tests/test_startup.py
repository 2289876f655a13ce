"""What serving imports lazily is imported at start-up, before gc.freeze (and what compiling
the adaptation step imports, before the freeze that follows it): an adaptation and a
recommend of each variant afterwards import no module, with the eager or the compiled step.
Run in a fresh interpreter, since this test process has imported most of torch already."""

import json
import subprocess
import sys

import pytest

SCRIPT = """
import gc, json, sys
from fastapi.testclient import TestClient
from service.app import create_app
from service.settings import Settings

body, user, registry = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
compiled = sys.argv[4] == "compiled"
settings = Settings(registry=registry, adapt_compile=compiled, readapt_batch=2, readapt_threads=1)
with TestClient(create_app(settings)) as client:
    # The compile's imports and graphs are frozen once it is over.
    assert client.app.state.service.writes.compiler.wait(600)
    frozen, before = gc.get_freeze_count(), set(sys.modules)
    for variant in ("interaction", "mapping", "hybrid"):
        adapted = client.post(f"/scenarios/{variant}/adapt", json={**body, "variant": variant})
        assert adapted.status_code == 200, adapted.text
        served = client.get("/recommend", params={"user": user, "scenario": variant})
        assert served.status_code == 200 and served.json()["source"] == "adapted", served.text
    print(json.dumps({"frozen": frozen, "imported": sorted(set(sys.modules) - before)}))
"""


@pytest.mark.parametrize("step", ["eager", "compiled"])
def test_serving_imports_nothing_after_start_up(registry, scenario, step):
    body, user = json.dumps(scenario.body()), scenario.eval_user
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, body, user, str(registry), step],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["frozen"] > 100_000  # torch._dynamo and faiss among what start-up froze
    assert seen["imported"] == [], seen["imported"]
