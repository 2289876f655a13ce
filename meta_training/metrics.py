"""Ranking metrics and their confidence intervals.

For each evaluation user every item of the scenario's pool is ranked; ties are broken by a
seeded random order so no method gains from the pool's index order.
Recall@N = hits in the top N / size of the user's ground truth.
NDCG@N = DCG@N / ideal DCG@N, with the ideal placing min(N, |truth|) hits first.
Per-user values are averaged within a scenario, then over scenarios.
"""

import numpy as np
from scipy import stats

CUTOFFS = (10, 20, 50)
METRICS = tuple(f"{name}@{n}" for name in ("recall", "ndcg") for n in CUTOFFS)


def rank_top(scores: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """[U, min(n, P)] pool positions of the n best scores per row, ties in random order."""
    shuffle = rng.permutation(scores.shape[1])
    order = np.argsort(-scores[:, shuffle], axis=1, kind="stable")[:, :n]
    return shuffle[order]


def scenario_metrics(
    scores: np.ndarray, truth: np.ndarray, rng: np.random.Generator
) -> dict[str, float]:
    """Mean over users of every metric in METRICS.

    scores: [U, P] float; truth: [U, P] bool, each row with at least one True.
    """
    top = rank_top(scores, max(CUTOFFS), rng)  # [U, K]
    hits = np.take_along_axis(truth, top, axis=1).astype(np.float64)  # [U, K]
    truth_sizes = truth.sum(axis=1)  # [U]
    discounts = 1.0 / np.log2(np.arange(hits.shape[1]) + 2.0)  # [K]
    results: dict[str, float] = {}
    for n in CUTOFFS:
        results[f"recall@{n}"] = float((hits[:, :n].sum(axis=1) / truth_sizes).mean())
        dcg = hits[:, :n] @ discounts[:n]
        ideal = np.cumsum(discounts[:n])[np.minimum(truth_sizes, n) - 1]
        results[f"ndcg@{n}"] = float((dcg / ideal).mean())
    return results


def mean_and_ci(
    per_seed: list[np.ndarray], rng: np.random.Generator, resamples: int = 2000
) -> dict[str, object]:
    """Mean over seeds of the per-seed scenario mean, and a 95% percentile bootstrap interval.

    per_seed[s] holds one value per meta-test scenario of seed s; the bootstrap resamples
    scenarios with replacement within each seed (seeds have different test scenarios).
    """
    mean = float(np.mean([values.mean() for values in per_seed]))
    # scipy refuses one-value samples; such a seed's mean is the same in every resample.
    varying = [values for values in per_seed if len(values) > 1]
    if not varying:
        return {"mean": mean, "ci95": [mean, mean]}
    fixed = sum(float(values[0]) for values in per_seed if len(values) == 1)

    def seeds_mean(*samples: np.ndarray, axis: int) -> np.ndarray:
        return (sum(sample.mean(axis=axis) for sample in samples) + fixed) / len(per_seed)

    # Unpaired: each seed's scenarios are resampled on their own.
    interval = stats.bootstrap(
        varying,
        seeds_mean,
        n_resamples=resamples,
        vectorized=True,
        paired=False,
        method="percentile",
        rng=rng,
    ).confidence_interval
    return {"mean": mean, "ci95": [float(interval.low), float(interval.high)]}
