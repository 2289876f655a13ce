"""Scoring methods compared on the benchmark, and the baselines that need no training.

Each factory receives a `MethodContext`, may fit on the benchmark's meta-train and
meta-valid parts, and returns a scorer for evaluation scenarios; none of them sees an
evaluation interaction.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from meta_training.config import MetaTrainConfig
from meta_training.embeddings import Embeddings
from meta_training.metrics import scenario_metrics
from meta_training.protocol import Benchmark, EvaluationTask, ground_truth


class Scorer(Protocol):
    def __call__(
        self, task: EvaluationTask, users: np.ndarray, rng: np.random.Generator
    ) -> np.ndarray:
        """[len(users), len(task.pool)] scores; higher ranks first."""
        ...


@dataclass
class MethodContext:
    """What a method may use for one seed; `memo` shares fitted models between methods of
    one evaluation run (e.g. the ablations reuse the variant that s2meta chose)."""

    benchmark: Benchmark
    embeddings: Embeddings
    training: MetaTrainConfig
    memo: dict[str, object] = field(default_factory=dict)


MethodFactory = Callable[[MethodContext], Scorer]


def mean_recall_at_20(
    benchmark: Benchmark, tasks: list[EvaluationTask], scorer: Scorer, seed: int
) -> float:
    """Mean Recall@20 of a scorer over tasks: the model-selection criterion."""
    recalls = []
    for index, task in enumerate(tasks):
        users, truth = ground_truth(benchmark, task)
        rng = np.random.default_rng([seed, index])
        recalls.append(scenario_metrics(scorer(task, users, rng), truth, rng)["recall@20"])
    return float(np.mean(recalls))


def random_method(context: MethodContext) -> Scorer:
    def score(task: EvaluationTask, users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return rng.random((len(users), len(task.pool)))

    return score


def itempop(context: MethodContext) -> Scorer:
    """Popularity among the scenario's support interactions (the only in-scenario signal).

    Most pool items have no support interaction; their ties are broken by the items' visible
    interaction count (their history outside the new scenario), then at random. Index order
    would be a hidden popularity signal: item ids follow first appearance in the data.
    """
    data = context.benchmark.data
    visible = context.benchmark.visible
    visible_counts = np.bincount(data.items[visible], minlength=data.num_items)
    # Strictly below 1, so it orders items only within one support count.
    tie_break = visible_counts / (visible_counts.max() + 1.0)

    def score(task: EvaluationTask, users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        counts = np.bincount(data.items[task.support_rows], minlength=data.num_items)
        pool_scores = counts[task.pool] + tie_break[task.pool]  # [P]
        return np.broadcast_to(pool_scores, (len(users), len(task.pool)))

    return score


def mf_dot(context: MethodContext) -> Scorer:
    """The pretrained embeddings' dot product, with no scenario adaptation."""
    embeddings = context.embeddings

    def score(task: EvaluationTask, users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return embeddings.user[users] @ embeddings.item[task.pool].T  # [U, P]

    return score


BASELINES: dict[str, MethodFactory] = {
    "random": random_method,
    "itempop": itempop,
    "mf_dot": mf_dot,
}
