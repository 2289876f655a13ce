"""Tuned baselines: settings are chosen on meta-valid, and each method scores every pool."""

import numpy as np
import pytest
from conftest import DATA

from meta_training.config import EmbeddingConfig, MetaTrainConfig, ProtocolConfig
from meta_training.methods import MethodContext
from meta_training.prepare import prepare
from meta_training.protocol import ground_truth
from meta_training.tuned_baselines import mf_finetune, mf_pop_blend, tune_on_valid


@pytest.fixture(scope="module")
def context(tmp_path_factory):
    prepared = prepare(
        DATA / "LastFM",
        0,
        ProtocolConfig(),
        EmbeddingConfig(dim=16),
        tmp_path_factory.mktemp("cache"),
    )
    return MethodContext(prepared.benchmark, prepared.embeddings, MetaTrainConfig())


def test_tuning_picks_the_setting_that_is_best_on_meta_valid(context):
    benchmark = context.benchmark
    truth_of = {t.scenario_id: ground_truth(benchmark, t)[1] for t in benchmark.valid}
    seen = []

    def factory(settings):
        seen.append(settings["quality"])

        def score(task, users, rng):
            noise = rng.random((len(users), len(task.pool)))
            return settings["quality"] * truth_of[task.scenario_id] + noise

        return score

    chosen = tune_on_valid(context, factory, {"quality": [0.0, 2.0, 0.5]})
    assert seen == [0.0, 2.0, 0.5]
    task = benchmark.valid[0]
    users, truth = ground_truth(benchmark, task)
    scores = chosen(task, users, np.random.default_rng(0))
    # Quality 2 puts every relevant item above every other one.
    assert (scores[truth].min()) > (scores[~truth].max())


@pytest.mark.parametrize("method", [mf_pop_blend, mf_finetune])
def test_tuned_baselines_score_every_pool_item(context, method):
    scorer = method(context)
    task = context.benchmark.test[0]
    users, _ = ground_truth(context.benchmark, task)
    scores = scorer(task, users[:5], np.random.default_rng(0))
    assert scores.shape == (5, len(task.pool)) and np.isfinite(scores).all()
