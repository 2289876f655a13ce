"""`s2meta publish --gate` and `--stage`: an artifact whose meta learner never trained (0
meta-steps) is refused against a trained current one, exit 2 with both figures and the
registry untouched; the same artifact again passes; --margin is honoured; artifacts of
different benchmarks are not compared; --stage leaves current where it was. LastFM, serving
protocol, the interaction variant (the one that gains most from a few meta-steps), 16 dims."""

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import DATA

from meta_training.cli import main
from meta_training.gate import gate
from model.artifact import MetaLearner, load_artifact, publish, save_artifact
from model.learner import init_meta_params
from model.registry import current_or_none, version_names

LASTFM = DATA / "LastFM"
FIGURES = re.compile(
    r"Recall@20 (\d\.\d{4}) ([<>]=?) current (v\d{4}) (\d\.\d{4}) - margin ([0-9.e-]+)"
)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    """ "trained": five meta-steps; "untrained": the same with every meta learner at the
    initial value meta-training starts from (0 meta-steps); "other-seed": trained's files
    with another seed in its record."""
    root = tmp_path_factory.mktemp("gate")
    trained = root / "trained"
    command = ["train", "--data", str(LASTFM), "--out", str(trained), "--cache-dir"]
    command += [str(root / "cache"), "--embedding-dim", "16", "--variant", "interaction"]
    command += ["--meta-steps", "5", "--meta-batch", "2", "--learning-rate", "0.03"]
    assert main(command) == 0
    artifact = load_artifact(trained)
    seed = torch.Generator().manual_seed(int(artifact.metrics["seed"]))
    learners = {
        variant: MetaLearner(init_meta_params(learner.config, seed), learner.config)
        for variant, learner in artifact.learners.items()
    }
    save_artifact(dataclasses.replace(artifact, learners=learners), root / "untrained")
    other = dataclasses.replace(artifact, metrics={**artifact.metrics, "seed": 1})
    save_artifact(other, root / "other-seed")
    return {"trained": trained, "untrained": root / "untrained", "other-seed": root / "other-seed"}


@pytest.fixture
def registry(artifacts, tmp_path) -> Path:
    """A registry whose current version, v0001, is the trained artifact."""
    path = tmp_path / "registry"
    publish(artifacts["trained"], path)
    return path


def snapshot(registry: Path) -> dict[str, bytes]:
    files = (path for path in registry.rglob("*") if path.is_file())
    return {str(path.relative_to(registry)): path.read_bytes() for path in files}


def publish_cli(artifact: Path, registry: Path, *flags: str) -> int:
    return main(["publish", str(artifact), "--registry", str(registry), *flags])


def gated(artifact: Path, registry: Path, *flags: str) -> int:
    return publish_cli(artifact, registry, "--gate", "--data", str(LASTFM), *flags)


def figures(stderr: str) -> tuple[float, str, float, float]:
    """(candidate, current version, current, margin) from the gate's line."""
    found = FIGURES.search(stderr)
    assert found, stderr
    candidate, _, version, current, margin = found.groups()
    return float(candidate), version, float(current), float(margin)


def test_scores_are_those_training_selected_on(artifacts, registry):
    result = gate(artifacts["untrained"], registry, LASTFM)
    recorded = json.loads((artifacts["trained"] / "metrics.json").read_text())
    assert result.current == recorded["valid_recall@20"]["interaction"]
    assert result.current_version == "v0001" and result.scenarios >= 1
    assert result.candidate < result.current - 0.05  # 0 meta-steps: clearly worse
    assert not result.passed


def test_a_worse_artifact_is_refused_and_nothing_is_written(artifacts, registry, capsys):
    before = snapshot(registry)
    assert gated(artifacts["untrained"], registry) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "nothing published" in captured.err and captured.err.startswith("s2meta: error: gate:")
    candidate, version, current, margin = figures(captured.err)
    assert version == "v0001" and candidate < current and margin == 0
    assert snapshot(registry) == before


def test_an_equal_artifact_passes(artifacts, registry, capsys):
    assert gated(artifacts["trained"], registry) == 0
    captured = capsys.readouterr()
    assert captured.out == "v0002\n"
    candidate, version, current, _ = figures(captured.err)
    assert candidate == current and version == "v0001"
    assert current_or_none(registry) == "v0002"


def test_the_margin_is_an_absolute_recall_drop(artifacts, registry, capsys):
    result = gate(artifacts["untrained"], registry, LASTFM)
    drop = result.current - result.candidate
    assert gated(artifacts["untrained"], registry, "--margin", f"{drop - 0.001:.6f}") == 2
    assert version_names(registry) == ["v0001"]
    capsys.readouterr()
    assert gated(artifacts["untrained"], registry, "--margin", f"{drop + 0.001:.6f}") == 0
    assert capsys.readouterr().out == "v0002\n"
    assert current_or_none(registry) == "v0002"


def test_without_a_current_version_the_gate_passes(artifacts, tmp_path, capsys):
    registry = tmp_path / "empty"
    assert gated(artifacts["untrained"], registry) == 0
    captured = capsys.readouterr()
    assert captured.out == "v0001\n" and "no current version to compare with" in captured.err


def test_artifacts_of_different_benchmarks_are_not_compared(artifacts, registry, capsys):
    before = snapshot(registry)
    assert gated(artifacts["other-seed"], registry) == 2
    error = capsys.readouterr().err
    assert "different benchmarks (seed: 1 vs 0)" in error and "nothing published" in error
    assert snapshot(registry) == before


def test_stage_leaves_current_and_the_gate_compares_with_current(artifacts, registry, capsys):
    assert publish_cli(artifacts["untrained"], registry, "--stage") == 0
    captured = capsys.readouterr()
    assert captured.out == "v0002\n" and "current is unchanged" in captured.err
    assert current_or_none(registry) == "v0001"
    # A gated stage: the candidate is compared with current (v0001), not the staged v0002.
    assert gated(artifacts["trained"], registry, "--stage") == 0
    assert capsys.readouterr().out == "v0003\n"
    assert current_or_none(registry) == "v0001"
    assert version_names(registry) == ["v0001", "v0002", "v0003"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--gate"], "--gate needs --data"),
        (["--margin", "0.1"], "--margin and --data apply only with --gate"),
        (["--gate", "--data", str(LASTFM), "--margin", "-0.1"], "--margin -0.1: expected"),
        (["--gate", "--data", str(LASTFM), "--margin", "nan"], "--margin nan: expected"),
        (["--gate", "--data", str(DATA / "Beauty")], "trained on 'LastFM'"),
    ],
)
def test_bad_gate_flags_exit_2(artifacts, registry, capsys, flags, message):
    before = snapshot(registry)
    assert publish_cli(artifacts["trained"], registry, *flags) == 2
    error = capsys.readouterr().err
    assert error.startswith("s2meta: error: ") and message in error
    assert snapshot(registry) == before
