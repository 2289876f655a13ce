"""Ranking metrics against hand-computed values, tie handling, and the bootstrap interval."""

import numpy as np
import pytest

from meta_training.metrics import mean_and_ci, rank_top, scenario_metrics


def test_rank_top_orders_by_score():
    scores = np.array([[0.1, 0.9, 0.5, 0.7]])
    assert rank_top(scores, 3, np.random.default_rng(0)).tolist() == [[1, 3, 2]]


def test_ties_are_broken_at_random_not_by_index():
    scores = np.zeros((1, 100))
    firsts = {int(rank_top(scores, 1, np.random.default_rng(seed))[0, 0]) for seed in range(30)}
    assert len(firsts) > 10


def test_recall_and_ndcg_by_hand():
    # Pool of 60 items; user 0 likes items 0 and 30, user 1 likes item 59.
    scores = np.zeros((2, 60))
    scores[0] = -np.arange(60)  # ranks item k at position k
    scores[1] = -np.arange(60)
    truth = np.zeros((2, 60), dtype=bool)
    truth[0, [0, 30]] = True
    truth[1, 59] = True
    m = scenario_metrics(scores, truth, np.random.default_rng(0))
    # User 0: hit at rank 1 (@10, @20, @50) and at rank 31 (@50); user 1: no hit in top 50.
    assert m["recall@10"] == pytest.approx((0.5 + 0.0) / 2)
    assert m["recall@20"] == pytest.approx((0.5 + 0.0) / 2)
    assert m["recall@50"] == pytest.approx((1.0 + 0.0) / 2)
    ideal_two = 1 + 1 / np.log2(3)
    assert m["ndcg@10"] == pytest.approx((1 / ideal_two) / 2)
    assert m["ndcg@50"] == pytest.approx(((1 + 1 / np.log2(32)) / ideal_two) / 2)


def test_recall_divides_by_the_whole_ground_truth():
    scores = -np.arange(100, dtype=float)[None, :]
    truth = np.zeros((1, 100), dtype=bool)
    truth[0, :40] = True  # 40 relevant items, all ranked first
    m = scenario_metrics(scores, truth, np.random.default_rng(0))
    assert m["recall@10"] == pytest.approx(10 / 40)
    assert m["ndcg@10"] == pytest.approx(1.0)
    assert m["recall@50"] == pytest.approx(1.0)


def test_pool_smaller_than_cutoff():
    scores = np.array([[0.3, 0.2, 0.1]])
    truth = np.array([[False, False, True]])
    m = scenario_metrics(scores, truth, np.random.default_rng(0))
    assert m["recall@10"] == 1.0
    assert m["ndcg@10"] == pytest.approx(1 / np.log2(4))


def test_bootstrap_interval_brackets_the_mean_and_shrinks_with_more_scenarios():
    rng = np.random.default_rng(1)
    few = [rng.random(10)]
    many = [rng.random(1000)]
    small = mean_and_ci(few, np.random.default_rng(0))
    large = mean_and_ci(many, np.random.default_rng(0))
    for result in (small, large):
        low, high = result["ci95"]
        assert low <= result["mean"] <= high
    assert large["ci95"][1] - large["ci95"][0] < small["ci95"][1] - small["ci95"][0]


def test_multi_seed_mean_is_mean_of_seed_means():
    per_seed = [np.array([0.1, 0.3]), np.array([0.5, 0.5, 0.5, 0.9])]
    result = mean_and_ci(per_seed, np.random.default_rng(0))
    assert result["mean"] == pytest.approx((0.2 + 0.6) / 2)


def test_bootstrap_resamples_scenarios_within_each_seed():
    # Each seed's mean is fixed (all zeros, all ones), so every resample averages to 0.5;
    # resampling scenarios pooled across seeds would give a wide interval.
    result = mean_and_ci([np.zeros(20), np.ones(20)], np.random.default_rng(0))
    assert result["ci95"] == [0.5, 0.5]


def test_bootstrap_interval_is_the_percentile_interval():
    # Resample means of [0, 1] are 0, 0.5 or 1 with chances 1/4, 1/2, 1/4: the 2.5th and
    # 97.5th percentiles are the extremes (a bias-corrected interval would differ).
    assert mean_and_ci([np.array([0.0, 1.0])], np.random.default_rng(0))["ci95"] == [0.0, 1.0]


def test_a_one_scenario_seed_shifts_the_interval_by_its_value():
    values = np.random.default_rng(2).random(30)
    alone = mean_and_ci([values], np.random.default_rng(5))
    both = mean_and_ci([np.array([1.0]), values], np.random.default_rng(5))
    assert both["mean"] == pytest.approx((1.0 + alone["mean"]) / 2)
    assert both["ci95"] == pytest.approx([(1.0 + bound) / 2 for bound in alone["ci95"]])
    assert mean_and_ci([np.array([0.4])], np.random.default_rng(0))["ci95"] == [0.4, 0.4]
