"""Meta-training episodes and the benchmark's scenarios as learner inputs.

An episode of a meta-train scenario: its episode users shuffled, users taken in order until
their interactions reach the support size (the last one's earliest kept) as the training
set, and the remaining episode users' interactions as the test set. Each draw is fresh.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from meta_training.protocol import Benchmark, EpisodeTask, EvaluationTask
from model.learner_config import LearnerConfig
from model.sampling import sample_triples
from model.scenario import ScenarioInput, stack_triples


@dataclass(frozen=True)
class EpisodeBatch:
    train: dict[str, Tensor]  # triples [S, T, N]
    test: dict[str, Tensor]  # triples [S, M]
    uniforms: Tensor  # [S, T]


def usable_episode_tasks(benchmark: Benchmark) -> list[EpisodeTask]:
    """Meta-train scenarios with at least two episode users (a train and a test side)."""
    users = benchmark.data.users
    return [task for task in benchmark.train if len(np.unique(users[task.rows])) >= 2]


def draw_episode(
    benchmark: Benchmark, task: EpisodeTask, support_size: int, rng: np.random.Generator
) -> tuple[ScenarioInput, np.ndarray, np.ndarray]:
    """(training scenario input, test users, test items) of one fresh episode."""
    data = benchmark.data
    users = data.users[task.rows]
    order = rng.permutation(np.unique(users))
    counts = np.array([(users == u).sum() for u in order])
    # Leave at least one user for the test side.
    reach = np.searchsorted(np.cumsum(counts), support_size)
    last = int(min(reach, len(order) - 2))
    train_rows = []
    for user in order[: last + 1]:
        train_rows.append(task.rows[users == user])
    train_rows[-1] = train_rows[-1][: max(1, support_size - sum(map(len, train_rows[:-1])))]
    train = np.concatenate(train_rows)
    test_mask = np.isin(users, order[last + 1 :])
    test = task.rows[test_mask]
    scenario = ScenarioInput(task.scenario_id, data.users[train], data.items[train], task.pool)
    return scenario, data.users[test], data.items[test]


def episode_batch(
    benchmark: Benchmark,
    tasks: Sequence[EpisodeTask],
    config: LearnerConfig,
    support_size: int,
    test_size: int,
    rngs: Sequence[np.random.Generator],
    device: torch.device | None = None,
) -> EpisodeBatch:
    """One fresh episode per task, each drawn from its own generator (so a task's episode
    does not depend on which other tasks share its batch or process)."""
    train, test, uniforms = [], [], []
    for task, rng in zip(tasks, rngs, strict=True):
        scenario, test_users, test_items = draw_episode(benchmark, task, support_size, rng)
        train.append(
            sample_triples(
                scenario.users,
                scenario.items,
                scenario.pool,
                (config.max_steps, config.batch_size),
                rng,
            )
        )
        test.append(
            sample_triples(
                test_users,
                test_items,
                scenario.pool,
                (test_size,),
                rng,
                popularity_items=scenario.items,
            )
        )
        uniforms.append(torch.as_tensor(rng.random(config.max_steps), dtype=torch.float32))
    return EpisodeBatch(
        stack_triples(train, device), stack_triples(test, device), torch.stack(uniforms).to(device)
    )


def support_input(benchmark: Benchmark, task: EvaluationTask) -> ScenarioInput:
    """A meta-valid/test scenario as the learner sees it: its support set and pool."""
    data = benchmark.data
    return ScenarioInput(
        task.scenario_id, data.users[task.support_rows], data.items[task.support_rows], task.pool
    )
