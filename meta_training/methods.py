"""Scoring methods compared on the benchmark. Each factory may fit on the benchmark's
meta-train and meta-valid parts and returns a scorer for meta-test scenarios; none of them
sees a meta-test evaluation interaction."""

from collections.abc import Callable
from typing import Protocol

import numpy as np

from meta_training.embeddings import Embeddings
from meta_training.protocol import Benchmark, EvaluationTask


class Scorer(Protocol):
    def __call__(
        self, task: EvaluationTask, users: np.ndarray, rng: np.random.Generator
    ) -> np.ndarray:
        """[len(users), len(task.pool)] scores; higher ranks first."""
        ...


MethodFactory = Callable[[Benchmark, Embeddings], Scorer]


def _random(benchmark: Benchmark, embeddings: Embeddings) -> Scorer:
    def score(task: EvaluationTask, users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return rng.random((len(users), len(task.pool)))

    return score


def _itempop(benchmark: Benchmark, embeddings: Embeddings) -> Scorer:
    """Popularity among the scenario's support interactions (the only in-scenario signal).

    Most pool items have no support interaction; their ties are broken by the items' visible
    interaction count (their history outside the new scenario), then at random. Index order
    would be a hidden popularity signal: item ids follow first appearance in the data.
    """
    data = benchmark.data
    visible_counts = np.bincount(data.items[benchmark.visible], minlength=data.num_items)
    # Strictly below 1, so it orders items only within one support count.
    tie_break = visible_counts / (visible_counts.max() + 1.0)

    def score(task: EvaluationTask, users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        counts = np.bincount(data.items[task.support_rows], minlength=data.num_items)
        pool_scores = counts[task.pool] + tie_break[task.pool]  # [P]
        return np.broadcast_to(pool_scores, (len(users), len(task.pool)))

    return score


def _mf_dot(benchmark: Benchmark, embeddings: Embeddings) -> Scorer:
    """The pretrained embeddings' dot product, with no scenario adaptation."""

    def score(task: EvaluationTask, users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return embeddings.user[users] @ embeddings.item[task.pool].T  # [U, P]

    return score


METHODS: dict[str, MethodFactory] = {
    "random": _random,
    "itempop": _itempop,
    "mf_dot": _mf_dot,
}
