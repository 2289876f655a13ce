"""Baselines score what they claim to, and the evaluation table has the promised shape."""

import numpy as np
import pytest
from conftest import DATA

from meta_training.config import EmbeddingConfig, MetaTrainConfig, ProtocolConfig
from meta_training.evaluate import evaluate, results_markdown, write_results
from meta_training.methods import MethodContext
from meta_training.prepare import prepare
from meta_training.protocol import ground_truth
from meta_training.registry import METHODS


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return [
        prepare(DATA / "LastFM", seed, ProtocolConfig(), EmbeddingConfig(), cache)
        for seed in (0, 1)
    ]


def test_ground_truth_matches_evaluation_rows(prepared):
    benchmark = prepared[0].benchmark
    data = benchmark.data
    task = benchmark.test[0]
    users, truth = ground_truth(benchmark, task)
    assert truth.sum() == len(task.eval_rows)
    for row in task.eval_rows[:50]:
        u = np.searchsorted(users, data.users[row])
        p = np.searchsorted(task.pool, data.items[row])
        assert truth[u, p]


def test_itempop_ranks_support_popularity_then_visible_popularity(prepared):
    benchmark, embeddings = prepared[0].benchmark, prepared[0].embeddings
    data = benchmark.data
    task = benchmark.test[0]
    scores = METHODS["itempop"](MethodContext(benchmark, embeddings, MetaTrainConfig()))(
        task, np.arange(3), None
    )
    assert scores.shape == (3, len(task.pool))
    support = np.bincount(data.items[task.support_rows], minlength=data.num_items)[task.pool]
    visible = np.bincount(data.items[benchmark.visible], minlength=data.num_items)[task.pool]
    order = np.argsort(-scores[0], kind="stable")
    assert np.all(np.diff(support[order]) <= 0)
    for count in np.unique(support):
        same = order[support[order] == count]
        assert np.all(np.diff(visible[same]) <= 0)


def test_mf_dot_is_the_embedding_dot_product(prepared):
    benchmark, embeddings = prepared[0].benchmark, prepared[0].embeddings
    task = benchmark.test[0]
    users = np.array([0, 5, 9])
    scores = METHODS["mf_dot"](MethodContext(benchmark, embeddings, MetaTrainConfig()))(
        task, users, None
    )
    expected = np.einsum("ud,pd->up", embeddings.user[users], embeddings.item[task.pool])
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)


def test_results_shape_and_sanity(prepared, tmp_path):
    results = evaluate(prepared, ["random", "itempop", "mf_dot"])
    assert results["dataset"] == "LastFM"
    assert results["seeds"] == [0, 1]
    counts = results["counts"]
    assert results["split"] == "test"
    assert counts["scenarios"] == sum(len(p.benchmark.test) for p in prepared)
    assert counts["eval_users"] == sum(
        len(np.unique(p.benchmark.data.users[t.eval_rows]))
        for p in prepared
        for t in p.benchmark.test
    )
    for method in ("random", "itempop", "mf_dot"):
        metrics = results["methods"][method]
        for name in ("recall@10", "recall@20", "recall@50", "ndcg@10", "ndcg@20", "ndcg@50"):
            low, high = metrics[name]["ci95"]
            assert 0 <= low <= metrics[name]["mean"] <= high <= 1
        assert metrics["recall@10"]["mean"] <= metrics["recall@20"]["mean"]
        assert metrics["recall@20"]["mean"] <= metrics["recall@50"]["mean"]
    # Random ranking: expected Recall@20 is the mean over scenarios of 20 / pool size.
    expected = np.mean([np.mean([20 / len(t.pool) for t in p.benchmark.test]) for p in prepared])
    assert results["methods"]["random"]["recall@20"]["mean"] == pytest.approx(expected, abs=0.03)
    for method in ("itempop", "mf_dot"):
        assert (
            results["methods"][method]["recall@20"]["mean"]
            > results["methods"]["random"]["recall@20"]["mean"] + 0.05
        )
    write_results(results, tmp_path)
    markdown = (tmp_path / "results.md").read_text()
    assert markdown == results_markdown(results)
    assert all(f"| {method} |" in markdown for method in results["methods"])


def test_evaluation_is_reproducible(prepared):
    first = evaluate(prepared[:1], ["random", "itempop"])
    again = evaluate(prepared[:1], ["random", "itempop"])
    assert first == again


def test_unknown_method_is_refused(prepared):
    with pytest.raises(ValueError, match="unknown method"):
        evaluate(prepared, ["nope"])


def test_valid_split_scores_meta_valid_scenarios(prepared):
    results = evaluate(prepared, ["mf_dot"], split="valid")
    assert results["split"] == "valid"
    assert results["counts"]["scenarios"] == sum(len(p.benchmark.valid) for p in prepared)
