"""Dependencies point one way: service -> model, meta_training -> model; model imports
neither, and the service never imports the training stack (so a serving install need not
carry it). Checked in the source, and in a fresh interpreter that imports the service."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_packages(package: str) -> set[str]:
    found = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return found


def test_model_imports_neither_service_nor_meta_training():
    assert not imported_packages("model") & {"service", "meta_training", "s2meta"}


def test_service_never_imports_meta_training():
    assert not imported_packages("service") & {"meta_training", "s2meta"}


def test_loading_the_service_loads_no_training_module():
    probe = (
        "import sys, service.app, service.cli; "
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('meta_training', 'implicit', 'matplotlib', 'scipy')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
