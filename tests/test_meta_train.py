"""Meta-training on real episodes: it learns, it is seeded, it resumes exactly, and the
artifact it writes round-trips through publishing."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DATA

from meta_training.cli import main
from meta_training.config import EmbeddingConfig, MetaTrainConfig, ProtocolConfig
from meta_training.episodes import draw_episode, usable_episode_tasks
from meta_training.meta_train import learner_config, meta_train, trainable_names
from meta_training.prepare import prepare
from model.artifact import (
    Artifact,
    MetaLearner,
    load_artifact,
    load_current,
    publish,
    save_artifact,
    verify_artifact,
)
from model.errors import ArtifactError
from model.inner_loss import Tables
from model.learner import init_meta_params
from model.learner_config import LearnerConfig, LearnerOptions
from model.recommender import RecommenderSpec

SMALL = MetaTrainConfig(
    iterations=4,
    meta_batch=2,
    learner=LearnerOptions(max_steps=5, min_steps=2),
    valid_every=2,
    test_size=64,
)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return prepare(DATA / "LastFM", 0, ProtocolConfig(), EmbeddingConfig(dim=16), cache)


def train_cli(artifact: Path, cache: Path, variant: str, *extra: str) -> int:
    """`s2meta train` on LastFM with a tiny budget (16-dim embeddings, as `prepared`)."""
    return main(
        [
            "train",
            "--data",
            str(DATA / "LastFM"),
            "--out",
            str(artifact),
            "--variant",
            variant,
            "--cache-dir",
            str(cache),
            "--embedding-dim",
            "16",
            "--meta-steps",
            "1",
            "--meta-batch",
            "1",
            *extra,
        ]
    )


def test_episodes_split_episode_users_into_disjoint_train_and_test(prepared):
    benchmark = prepared.benchmark
    rng = np.random.default_rng(0)
    for task in usable_episode_tasks(benchmark)[:10]:
        scenario, test_users, test_items = draw_episode(benchmark, task, 64, rng)
        assert 1 <= len(scenario.users) <= 64
        assert not set(scenario.users.tolist()) & set(test_users.tolist())
        assert len(test_users) > 0
        episode_pairs = set(
            zip(
                benchmark.data.users[task.rows].tolist(),
                benchmark.data.items[task.rows].tolist(),
                strict=True,
            )
        )
        drawn = set(zip(scenario.users.tolist(), scenario.items.tolist(), strict=True))
        drawn |= set(zip(test_users.tolist(), test_items.tolist(), strict=True))
        assert drawn <= episode_pairs  # only episode interactions feed meta-training


def test_meta_training_is_seeded_and_updates_what_it_learns(prepared):
    first = meta_train(prepared.benchmark, prepared.embeddings, SMALL, seed=3)
    again = meta_train(prepared.benchmark, prepared.embeddings, SMALL, seed=3)
    for name in first.meta:
        torch.testing.assert_close(first.meta[name], again.meta[name])
    assert [h["step"] for h in first.history] == [2, 4]
    assert first.best_step in (2, 4)
    assert first.best_valid_recall == max(h["valid_recall@20"] for h in first.history)


@pytest.mark.parametrize(
    ("changes", "frozen_prefix"),
    [
        ({"learn_init": False}, "init"),
        ({"learner": {"update_rule": "sgd"}}, "update."),
        ({"learner": {"stop_rule": "max_steps"}}, "stop."),
    ],
)
def test_ablations_freeze_their_part(prepared, changes, frozen_prefix):
    config = SMALL.with_changes(**changes, valid_every=1)
    trained = meta_train(prepared.benchmark, prepared.embeddings, config, seed=0)
    untouched = meta_train(
        prepared.benchmark,
        prepared.embeddings,
        config.model_copy(update={"iterations": 1}),
        seed=0,
    )
    assert not any(n.startswith(frozen_prefix) for n in trainable_names(trained.meta, config))
    # Whichever step was selected, the frozen part equals its initial value.
    initial = init_meta_params(learner_config(config, 16), torch.Generator().manual_seed(0))
    for name, value in trained.meta.items():
        if name.startswith(frozen_prefix):
            torch.testing.assert_close(value, initial[name])
    assert untouched.best_step == 1


def test_resume_from_checkpoint_matches_an_uninterrupted_run(prepared, tmp_path):
    whole = meta_train(prepared.benchmark, prepared.embeddings, SMALL, seed=1)
    half = SMALL.model_copy(update={"iterations": 2})
    meta_train(prepared.benchmark, prepared.embeddings, half, seed=1, checkpoint_dir=tmp_path)
    # A checkpoint of another configuration is ignored, not mixed in.
    record = json.loads((tmp_path / "checkpoint.json").read_text())
    assert record["config"]["iterations"] == 2
    record["config"] = SMALL.model_dump(mode="json")
    (tmp_path / "checkpoint.json").write_text(json.dumps(record))
    resumed = meta_train(
        prepared.benchmark, prepared.embeddings, SMALL, seed=1, checkpoint_dir=tmp_path
    )
    for name in whole.meta:
        torch.testing.assert_close(resumed.meta[name], whole.meta[name])
    assert resumed.history == whole.history


def test_train_publish_and_load(prepared, tmp_path, capsys):
    artifact = tmp_path / "artifact"
    registry = tmp_path / "registry"
    assert (
        train_cli(
            artifact,
            tmp_path / "cache",
            "hybrid",
            "--meta-steps",
            "2",
            "--valid-every",
            "1",
            "--meta-batch",
            "2",
            "--adapt-max-steps",
            "6",
            "--adapt-min-steps",
            "3",
        )
        == 0
    )
    metrics = json.loads((artifact / "metrics.json").read_text())
    assert metrics["variant"] == "hybrid" and metrics["dataset"] == "LastFM"
    # The training configuration round-trips through the artifact, its learner options
    # nested, and they are the options the saved learner adapts with.
    training = MetaTrainConfig.model_validate(metrics["training"])
    assert training == MetaTrainConfig(
        variant="hybrid",
        iterations=2,
        valid_every=1,
        meta_batch=2,
        learner=LearnerOptions(max_steps=6, min_steps=3),
    )
    assert load_artifact(artifact).learner == LearnerConfig.of(
        RecommenderSpec("hybrid", 16), training.learner
    )
    assert main(["publish", str(artifact), "--registry", str(registry)]) == 0
    assert main(["publish", str(artifact), "--registry", str(registry)]) == 0
    assert capsys.readouterr().out.split()[-2:] == ["v0001", "v0002"]
    version, loaded = load_current(registry)
    assert version == "v0002"
    assert loaded.learner.recommender.variant == loaded.default_variant == "hybrid"
    assert list(loaded.learners) == ["hybrid"]
    assert loaded.tables.user.shape == (1090, 16)
    assert len(loaded.item_ids) == loaded.tables.item.shape[0] == 3646


def test_corrupt_or_partial_artifacts_are_refused(prepared, tmp_path, capsys):
    artifact = tmp_path / "artifact"
    assert train_cli(artifact, tmp_path / "cache", "mapping") == 0
    verify_artifact(artifact)
    registry = tmp_path / "registry"
    publish(artifact, registry)
    blob = artifact / "meta_learner.mapping.safetensors"
    blob.write_bytes(blob.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ArtifactError, match="sha256"):
        load_artifact(artifact)
    capsys.readouterr()
    assert main(["publish", str(artifact), "--registry", str(registry)]) == 2
    assert "sha256" in capsys.readouterr().err
    assert (registry / "current").read_text().strip() == "v0001"  # nothing moved
    (artifact / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="manifest"):
        load_artifact(artifact)


def test_unavailable_device_is_a_clear_error(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    code = main(
        [
            "train",
            "--data",
            str(DATA / "LastFM"),
            "--out",
            str(tmp_path / "a"),
            "--device",
            "cuda",
            "--cache-dir",
            str(tmp_path / "cache"),
        ]
    )
    assert code == 2 and "cuda" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_trace_draws_the_adaptation_of_a_scenario(prepared, tmp_path, capsys):
    artifact = tmp_path / "artifact"
    cache = tmp_path / "cache"
    # Meta-test scenarios exist under the evaluation protocol only.
    assert train_cli(artifact, cache, "hybrid", "--protocol", "evaluation") == 0

    def trace(scenario: str, out: Path) -> int:
        return main(
            [
                "trace",
                "--artifact",
                str(artifact),
                "--data",
                str(DATA / "LastFM"),
                "--scenario",
                scenario,
                "--out",
                str(out),
                "--cache-dir",
                str(cache),
            ]
        )

    scenario = prepared.benchmark.test[0].scenario_id  # same protocol and seed
    out = tmp_path / "trace.png"
    capsys.readouterr()
    assert trace(scenario, out) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"scenario {scenario}:" in capsys.readouterr().out
    assert trace("no-such", tmp_path / "x.png") == 2
    assert not (tmp_path / "x.png").exists()


def test_learner_config_is_saved_flat_and_checked_on_load(tmp_path):
    config = LearnerConfig(RecommenderSpec("mapping", 8), max_steps=6)
    meta = init_meta_params(config, torch.Generator().manual_seed(0))
    artifact = Artifact(
        learners={"mapping": MetaLearner(meta, config)},
        default_variant="mapping",
        tables=Tables(torch.zeros(3, 8), torch.zeros(4, 8)),
        user_ids=["u0", "u1", "u2"],
        item_ids=["i0", "i1", "i2", "i3"],
        metrics={},
    )
    save_artifact(artifact, tmp_path / "good")
    saved = json.loads((tmp_path / "good" / "config.json").read_text())["learners"]["mapping"]
    # Format 2 as before the options had their own type, so older artifacts still load.
    assert saved == {
        "recommender": {"variant": "mapping", "embedding_dim": 8},
        "controller_hidden": 16,
        "stop_hidden": 16,
        "batch_size": 128,
        "min_steps": 4,
        "max_steps": 6,
        "update_rule": "learned",
        "sgd_lr": 0.01,
        "stop_rule": "learned",
    }
    assert load_artifact(tmp_path / "good").learner == config
    object.__setattr__(config, "update_rule", "adam")  # what validation would refuse
    save_artifact(artifact, tmp_path / "bad")
    with pytest.raises(ArtifactError, match=r"learner 'mapping': update_rule: Input should be"):
        load_artifact(tmp_path / "bad")
