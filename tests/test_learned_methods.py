"""The meta-trained methods inside `evaluate`: each configuration is trained once per seed,
s2meta keeps the variant best on meta-valid, and the ablations build on that variant."""

import pytest
from conftest import DATA

import meta_training.learned_methods as learned
from meta_training.config import EmbeddingConfig, MetaTrainConfig, ProtocolConfig
from meta_training.evaluate import evaluate
from meta_training.prepare import prepare
from model.learner_config import LearnerOptions

TINY = MetaTrainConfig(
    iterations=2,
    meta_batch=1,
    learner=LearnerOptions(max_steps=3, min_steps=1),
    valid_every=1,
    test_size=32,
)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare(
        DATA / "LastFM",
        0,
        ProtocolConfig(),
        EmbeddingConfig(dim=8),
        tmp_path_factory.mktemp("cache"),
    )


def test_s2meta_and_an_ablation_train_each_configuration_once(prepared, monkeypatch):
    calls = []
    real = learned.meta_train

    def counting(benchmark, embeddings, config, seed):
        calls.append((config.variant, config.learner.update_rule))
        return real(benchmark, embeddings, config, seed)

    monkeypatch.setattr(learned, "meta_train", counting)
    results = evaluate([prepared], ["s2meta", "s2meta_hybrid", "fixedlr"], training=TINY)
    assert sorted(calls[:3]) == [
        ("hybrid", "learned"),
        ("interaction", "learned"),
        ("mapping", "learned"),
    ]
    assert len(calls) == 4 and calls[3][1] == "sgd"  # the ablation of the chosen variant
    for method in ("s2meta", "s2meta_hybrid", "fixedlr"):
        recall = results["methods"][method]["recall@20"]
        assert 0 <= recall["ci95"][0] <= recall["mean"] <= recall["ci95"][1] <= 1
