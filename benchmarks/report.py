"""Where benchmark figures go: printed, and written as JSON under benchmarks/results/."""

import json
import os
import platform
import shutil
import subprocess
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
# The scripts' S2META_DATA_DIR (scripts/main.sh), else the shared data beside the checkout.
DATA = Path(
    os.environ.get(
        "S2META_DATA_DIR",
        Path(__file__).resolve().parents[2] / "shared" / "data" / "amazon-lastfm",
    )
)


def git_sha() -> str:
    """The commit measured: S2META_GIT_SHA where the tree is a copy without .git (gpu.sh on a
    lent machine sets it from the bundle), else git's."""
    if "S2META_GIT_SHA" in os.environ:
        return os.environ["S2META_GIT_SHA"]
    if shutil.which("git") is None:
        return "unknown"
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
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        **payload,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return path
