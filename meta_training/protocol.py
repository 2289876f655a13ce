"""The scenario benchmark: which scenarios, which split, which interactions each method may
see. docs/protocol.md states the same rules in prose; each scenario's support, evaluation
and episode users are drawn in `tasks.py`.

The serving protocol (`s2meta train`'s default) reuses the same steps with no meta-test
split: every selected scenario but a meta-valid slice meta-trains, and only the slice's
claimed rows are hidden, so the embeddings see nearly every interaction.

Interactions are referred to by row index into `InteractionData`, so "this interaction never
reaches pretraining" is a statement about a boolean mask that tests can check directly.
"""

from dataclasses import dataclass

import numpy as np

from meta_training.config import ProtocolConfig, ScenarioSelection
from meta_training.dataset import InteractionData
from meta_training.errors import SettingsError
from meta_training.tasks import EpisodeTask, EvaluationTask, claim_evaluation, episode_tasks

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class Benchmark:
    data: InteractionData
    config: ProtocolConfig
    seed: int
    train: list[EpisodeTask]
    valid: list[EvaluationTask]
    test: list[EvaluationTask]
    visible: np.ndarray  # [n] bool: may reach embedding pretraining
    dropped: dict[str, str]  # scenario id -> why it could not become a task

    def summary(self) -> dict[str, object]:
        data = self.data
        visible_users = np.bincount(data.users[self.visible], minlength=data.num_users)
        visible_items = np.bincount(data.items[self.visible], minlength=data.num_items)
        evaluation = [*self.valid, *self.test]
        episode_rows = _union([task.rows for task in self.train], data.num_interactions)
        evaluation_hidden = ~self.visible & ~episode_rows
        test_users = [np.unique(data.users[task.eval_rows]) for task in self.test]
        return {
            "dataset": data.name,
            "seed": self.seed,
            "users": data.num_users,
            "items": data.num_items,
            "interactions": data.num_interactions,
            "scenarios": {
                "train": len(self.train),
                "valid": len(self.valid),
                "test": len(self.test),
                "dropped": len(self.dropped),
            },
            "support_interactions_mean": _mean([len(t.support_rows) for t in evaluation]),
            "test_eval_users": int(sum(len(u) for u in test_users)),
            "test_eval_interactions": int(sum(len(t.eval_rows) for t in self.test)),
            "valid_eval_users": int(
                sum(len(np.unique(data.users[t.eval_rows])) for t in self.valid)
            ),
            "episode_interactions": int(episode_rows.sum()),
            "episode_share": float(episode_rows.mean()),
            "evaluation_hidden_share": float(evaluation_hidden.mean()),
            "hidden_share": float((~self.visible).mean()),
            "visible_interactions": int(self.visible.sum()),
            "users_without_visible_interaction": int((visible_users == 0).sum()),
            "items_without_visible_interaction": int((visible_items == 0).sum()),
        }


def select_scenarios(
    data: InteractionData, selection: ScenarioSelection, splits: tuple[str, ...] = SPLITS
) -> list[int]:
    """Indices of the scenarios whose pool size and interaction count are in range; at
    least one per split."""
    item_counts = np.bincount(data.items, minlength=data.num_items)
    chosen = [
        index
        for index, pool in enumerate(data.scenario_pools)
        if selection.min_pool_items <= len(pool) <= selection.max_pool_items
        and item_counts[pool].sum() >= selection.min_interactions
    ]
    if len(chosen) < len(splits):
        raise SettingsError(
            f"{data.name}: {len(chosen)} scenario(s) have {selection.min_pool_items}.."
            f"{selection.max_pool_items} pool items and at least {selection.min_interactions} "
            "interactions (settings min_pool_items, max_pool_items, min_interactions); "
            f"at least {len(splits)} are needed for "
            f"{', '.join(f'meta-{split}' for split in splits)}"
        )
    return chosen


def build_benchmark(data: InteractionData, config: ProtocolConfig, seed: int) -> Benchmark:
    serving = config.kind == "serving"
    chosen = select_scenarios(data, config.selection, ("train", "valid") if serving else SPLITS)
    chosen.sort(key=lambda index: data.scenario_ids[index])
    order = np.random.default_rng([seed, len(chosen)]).permutation(len(chosen))
    dropped: dict[str, str] = {}
    if serving:
        # Every scenario may join the validation slice, claimed in seeded order until its
        # hidden rows reach validation_share; the rest, unusable ones included, meta-train.
        queue = [("valid", index) for index in chosen]
        budget = config.validation_share * data.num_interactions
        evaluation, held_out = claim_evaluation(data, queue, config, seed, {}, budget)
        in_slice = {task.scenario_id for task in evaluation["valid"]}
        split_of = {"train": [], "valid": [], "test": []}
        for i in order:
            split = "valid" if data.scenario_ids[chosen[i]] in in_slice else "train"
            split_of[split].append(chosen[i])
    else:
        n_valid = max(1, round(config.valid_share * len(chosen)))
        n_train = max(1, round(config.train_share * len(chosen)))
        n_train = min(n_train, len(chosen) - n_valid - 1)
        split_of = {
            "train": [chosen[i] for i in order[:n_train]],
            "valid": [chosen[i] for i in order[n_train : n_train + n_valid]],
            "test": [chosen[i] for i in order[n_train + n_valid :]],
        }
        queue = [("valid", index) for index in split_of["valid"]]
        queue += [("test", index) for index in split_of["test"]]
        evaluation, held_out = claim_evaluation(data, queue, config, seed, dropped, np.inf)
    for split, tasks in evaluation.items():  # split order, whatever the claiming order was
        rank = {data.scenario_ids[index]: r for r, index in enumerate(split_of[split])}
        tasks.sort(key=lambda task: rank[task.scenario_id])
    for split in ("valid",) if serving else ("valid", "test"):
        if not evaluation[split]:
            raise SettingsError(
                f"{data.name}: no meta-{split} scenario has {config.support_size} support "
                "interactions from shared users and an evaluation user left (settings "
                "support_size, min_outside_interactions)"
            )

    # Serving hides no episode: every shared user's scenario rows feed meta-training and the
    # embeddings alike (docs/protocol.md, "Serving protocol").
    budget = np.inf if serving else config.episode_share * data.num_interactions
    train = episode_tasks(data, split_of["train"], held_out, config, seed, budget)
    hidden = held_out if serving else held_out | _union([t.rows for t in train], len(held_out))
    return Benchmark(
        data=data,
        config=config,
        seed=seed,
        train=train,
        valid=evaluation["valid"],
        test=evaluation["test"],
        visible=~hidden,
        dropped=dropped,
    )


def _union(row_sets: list[np.ndarray], size: int) -> np.ndarray:
    mask = np.zeros(size, dtype=bool)
    for rows in row_sets:
        mask[rows] = True
    return mask


def _mean(values: list[int]) -> float:
    return float(np.mean(values)) if values else 0.0


def ground_truth(benchmark: Benchmark, task: EvaluationTask) -> tuple[np.ndarray, np.ndarray]:
    """The evaluation users [U] and their ground truth over the pool [U, P] (bool)."""
    data = benchmark.data
    position = np.full(data.num_items, -1, dtype=np.int64)
    position[task.pool] = np.arange(len(task.pool))
    users, user_rows = np.unique(data.users[task.eval_rows], return_inverse=True)
    truth = np.zeros((len(users), len(task.pool)), dtype=bool)
    truth[user_rows, position[data.items[task.eval_rows]]] = True
    return users, truth
