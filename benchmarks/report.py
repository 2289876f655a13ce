"""Where benchmark figures go: printed, and written as JSON under benchmarks/results/."""

import json
import platform
import subprocess
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "amazon-lastfm"


def git_sha() -> str:
    completed = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    )
    return completed.stdout.strip() or "unknown"


def write_report(name: str, payload: dict[str, object]) -> Path:
    report = {
        "benchmark": name,
        "git": git_sha(),
        "machine": {
            "platform": platform.platform(),
            "cpus": torch.get_num_threads(),
            "python": platform.python_version(),
        },
        **payload,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return path
