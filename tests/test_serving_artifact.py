"""`s2meta train` by default trains the serving artifact: embeddings on every interaction but
a small validation slice's, meta-training on every other scenario; `--protocol evaluation`
keeps the split of `s2meta evaluate`. Both on LastFM with 16-dim embeddings and one step."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA

from meta_training.cli import main
from meta_training.config import EmbeddingConfig, ProtocolConfig
from meta_training.prepare import prepare, prepare_for_artifact
from meta_training.protocol import select_scenarios
from model.artifact import load_artifact

LASTFM = DATA / "LastFM"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """The prepared cache and an artifact per protocol kind."""
    root = tmp_path_factory.mktemp("serving")
    cache = root / "cache"
    artifacts = {}
    for kind in ("serving", "evaluation"):
        artifacts[kind] = root / kind
        protocol = [] if kind == "serving" else ["--protocol", "evaluation"]
        command = ["train", "--data", str(LASTFM), "--out", str(artifacts[kind])]
        command += ["--cache-dir", str(cache), "--embedding-dim", "16", "--variant", "hybrid"]
        command += ["--meta-steps", "1", "--meta-batch", "1", *protocol]
        assert main(command) == 0
    return cache, artifacts


def metrics_of(artifact: Path) -> dict:
    return json.loads((artifact / "metrics.json").read_text())


def test_a_train_artifact_embeds_every_user_and_item_with_an_interaction(trained):
    cache, artifacts = trained
    artifact = load_artifact(artifacts["serving"])
    metrics = metrics_of(artifacts["serving"])
    assert metrics["protocol"]["kind"] == "serving"
    benchmark = prepare_for_artifact(metrics, LASTFM, cache).benchmark
    data = benchmark.data
    assert list(artifact.user_ids) == data.user_ids
    assert list(artifact.item_ids) == data.item_ids
    user_nonzero = np.abs(artifact.tables.user.numpy()).sum(axis=1) > 0
    item_nonzero = np.abs(artifact.tables.item.numpy()).sum(axis=1) > 0
    # What holds in general: a vector is nonzero exactly when its id has an interaction
    # outside the validation slice's hidden rows ...
    visible = benchmark.visible
    np.testing.assert_array_equal(
        user_nonzero, np.bincount(data.users[visible], minlength=data.num_users) > 0
    )
    np.testing.assert_array_equal(
        item_nonzero, np.bincount(data.items[visible], minlength=data.num_items) > 0
    )
    # ... which on LastFM is every user and item (under evaluation: 8 users, 83 items lack one).
    assert user_nonzero.all() and item_nonzero.all()
    assert metrics["benchmark"]["users_without_visible_interaction"] == 0
    assert metrics["benchmark"]["items_without_visible_interaction"] == 0


def test_only_the_validation_slice_is_hidden_from_the_embeddings(trained):
    cache, artifacts = trained
    metrics = metrics_of(artifacts["serving"])
    benchmark = prepare_for_artifact(metrics, LASTFM, cache).benchmark
    data, config = benchmark.data, benchmark.config
    hidden = ~benchmark.visible
    slice_rows = np.zeros(data.num_interactions, dtype=bool)
    for task in benchmark.valid:
        assert hidden[task.support_rows].all() and hidden[task.eval_rows].all()
        users = np.zeros(data.num_users, dtype=bool)
        users[data.users[np.r_[task.support_rows, task.eval_rows]]] = True
        in_pool = np.isin(data.items, task.pool)
        slice_rows |= in_pool & users[data.users]
    assert not (hidden & ~slice_rows).any()  # nothing else is hidden
    assert hidden.sum() >= config.validation_share * data.num_interactions  # budget reached
    assert metrics["benchmark"]["hidden_share"] == pytest.approx(hidden.mean())
    assert hidden.mean() < 0.06  # LastFM: 5.3%, against 66.3% under the evaluation protocol
    assert metrics["validation"]["scenarios"] == [task.scenario_id for task in benchmark.valid]


def test_serving_meta_trains_on_every_scenario_outside_the_validation_slice(trained):
    cache, artifacts = trained
    benchmark = prepare_for_artifact(metrics_of(artifacts["serving"]), LASTFM, cache).benchmark
    data = benchmark.data
    selected = {data.scenario_ids[i] for i in select_scenarios(data, benchmark.config.selection)}
    train = {task.scenario_id for task in benchmark.train}
    valid = {task.scenario_id for task in benchmark.valid}
    assert benchmark.test == [] and not train & valid and train | valid == selected
    assert 1 <= len(valid) < len(train)
    for task in benchmark.train:  # episodes are visible to the embeddings: nothing hidden
        assert benchmark.visible[task.rows].all()


def test_protocol_evaluation_trains_as_before(trained, tmp_path):
    _, artifacts = trained
    metrics = metrics_of(artifacts["evaluation"])
    assert metrics["protocol"] == ProtocolConfig().model_dump(mode="json")
    assert metrics["protocol"]["kind"] == "evaluation"
    summary = metrics["benchmark"]
    assert summary["evaluation_hidden_share"] == pytest.approx(0.5634, abs=5e-5)
    assert summary["scenarios"] == {"train": 80, "valid": 11, "test": 23, "dropped": 0}
    # The same embeddings as the evaluation protocol's, prepared afresh.
    fresh = prepare(LASTFM, 0, ProtocolConfig(), EmbeddingConfig(dim=16), tmp_path)
    artifact = load_artifact(artifacts["evaluation"])
    np.testing.assert_array_equal(artifact.tables.user.numpy(), fresh.embeddings.user)
    np.testing.assert_array_equal(artifact.tables.item.numpy(), fresh.embeddings.item)


def test_the_prepared_cache_keys_on_the_protocol_kind(trained):
    cache, artifacts = trained
    directories = {
        kind: prepare_for_artifact(metrics_of(artifacts[kind]), LASTFM, cache)
        for kind in ("serving", "evaluation")
    }
    assert all(prepared.from_cache for prepared in directories.values())
    assert directories["serving"].cache_dir != directories["evaluation"].cache_dir
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 2
