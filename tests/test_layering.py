"""A serving install carries no training stack: loading the service loads no training module,
and the service tests collect and run with every training module missing. (Which package may
import which is import-linter's part: [tool.importlinter] in pyproject.toml, run by
scripts/test.sh.)"""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# meta_training/ and the packages of the `train` extra that nothing else brings (torch
# itself uses tqdm where it is installed).
TRAINING = ("meta_training", "implicit", "scipy", "matplotlib")
SERVICE_TESTS = [
    "test_adaptation_batch.py",
    "test_artifact_mmap.py",
    "test_bad_input.py",
    "test_batching.py",
    "test_canary.py",
    "test_client.py",
    "test_client_retries.py",
    "test_direct_routes.py",
    "test_faiss_index.py",
    "test_faults.py",
    "test_fold_in.py",
    "test_fuzz.py",
    "test_hot_reload.py",
    "test_observability.py",
    "test_openapi.py",
    "test_openapi_operations.py",
    "test_problems.py",
    "test_recommend_options.py",
    "test_redis_auth.py",
    "test_registry.py",
    "test_rollout.py",
    "test_scenario_writes.py",
    "test_security.py",
    "test_serve_cli.py",
    "test_service.py",
    "test_startup.py",
    "test_store.py",
    "test_tracing.py",
]
# Run, not only collected: an adaptation and a recommend through the app (checked against
# the model code), and a batch of adaptations.
RUN = (
    "test_adapt_then_recommend_equals_the_model_code and memory and hybrid"
    " or test_a_batch_adapts_each_scenario_as_alone"
)

# pytest in a fresh interpreter where no finder finds a training module, as without the
# train extra (an import fails, a probe gets None); prints which were looked for.
WITHOUT_TRAINING = f"""
import json, sys

looked_for = []


class WithoutTraining:
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {TRAINING!r}:
            looked_for.append(name)
            return None
        find_spec = getattr(self.finder, "find_spec", None)
        return find_spec(name, path, target) if find_spec else None

    def __getattr__(self, name):  # find_distributions (plugins' entry points) and the rest
        return getattr(self.finder, name)


sys.meta_path[:] = [WithoutTraining(finder) for finder in sys.meta_path]
import pytest

code = pytest.main(sys.argv[1:])
print(json.dumps(sorted(set(looked_for))))
sys.exit(code)
"""


def test_loading_the_service_loads_no_training_module():
    probe = (
        "import sys, service.app, service.cli; "
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        f"{TRAINING!r}]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_service_tests_run_without_the_training_stack():
    modules = [f"tests/{name}" for name in SERVICE_TESTS]
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            WITHOUT_TRAINING,
            *modules,
            "-q",
            "-p",
            "no:cacheprovider",
            "-k",
            RUN,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        check=False,
    )
    report = done.stdout[-3000:] + done.stderr[-3000:]
    assert done.returncode == 0, report
    assert "2 passed" in done.stdout, report
    # Libraries may look for scipy and the like (and go on without them); no test module
    # nor the service may look for meta_training.
    looked_for = json.loads(done.stdout.strip().splitlines()[-1])
    assert not [name for name in looked_for if name.startswith("meta_training")], looked_for
