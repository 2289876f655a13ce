"""What serving imports lazily is imported at start-up, before gc.freeze: an adaptation and a
recommend of each variant afterwards import no module. Run in a fresh interpreter, since this
test process has imported most of torch already."""

import json
import subprocess
import sys

SCRIPT = """
import gc, json, sys
from fastapi.testclient import TestClient
from service.app import create_app
from service.settings import Settings

body, user, registry = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
with TestClient(create_app(Settings(registry=registry))) as client:
    frozen, before = gc.get_freeze_count(), set(sys.modules)
    for variant in ("interaction", "mapping", "hybrid"):
        adapted = client.post(f"/scenarios/{variant}/adapt", json={**body, "variant": variant})
        assert adapted.status_code == 200, adapted.text
        served = client.get("/recommend", params={"user": user, "scenario": variant})
        assert served.status_code == 200 and served.json()["source"] == "adapted", served.text
    print(json.dumps({"frozen": frozen, "imported": sorted(set(sys.modules) - before)}))
"""


def test_serving_imports_nothing_after_start_up(registry, scenario):
    body, user = json.dumps(scenario.body()), scenario.eval_user
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, body, user, str(registry)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["frozen"] > 100_000  # torch._dynamo and faiss among what start-up froze
    assert seen["imported"] == [], seen["imported"]
