"""Meta-training under torchrun: two CPU processes (gloo), each half of every meta-batch,
give the same meta learner as one process with the same global batch."""

import os
import subprocess
import sys
from pathlib import Path

import torch
from conftest import DATA
from safetensors.torch import load_file

from meta_training.cli import main
from model.artifact import load_artifact
from model.learner import init_meta_params

TRAIN = [
    "--data",
    str(DATA / "LastFM"),
    "--meta-steps",
    "3",
    "--variant",
    "hybrid",
    "--meta-batch",
    "4",
    "--valid-every",
    "3",
    "--embedding-dim",
    "16",
]


def test_two_processes_equal_one_with_the_same_global_batch(tmp_path):
    cache = str(tmp_path / "cache")
    single, double = tmp_path / "single", tmp_path / "double"
    assert main(["train", *TRAIN, "--out", str(single), "--cache-dir", cache]) == 0
    torchrun = Path(sys.executable).with_name("torchrun")
    completed = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "meta_training.cli",
            "train",
            *TRAIN,
            "--out",
            str(double),
            "--cache-dir",
            cache,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "2 process(es)" in completed.stdout
    one = load_file(str(single / "meta_learner.hybrid.safetensors"))
    two = load_file(str(double / "meta_learner.hybrid.safetensors"))
    initial = init_meta_params(load_artifact(single).learner, torch.Generator().manual_seed(0))
    moved = max((one[k] - initial[k]).abs().max().item() for k in one)
    assert moved > 1e-4  # training did change the meta learner
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5)
