"""The scenario benchmark: which scenarios, which split, which interactions each method may
see. docs/protocol.md states the same rules in prose.

Interactions are referred to by row index into `InteractionData`, so "this interaction never
reaches pretraining" is a statement about a boolean mask that tests can check directly.
"""

from dataclasses import dataclass

import numpy as np

from meta_training.config import ProtocolConfig, ScenarioSelection
from meta_training.dataset import InteractionData
from meta_training.errors import SettingsError
from model.scenario import scenario_rng

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class EvaluationTask:
    """A meta-valid or meta-test scenario: few support interactions, held-out users."""

    scenario_id: str
    pool: np.ndarray  # [P] item indices, sorted
    support_rows: np.ndarray  # [<= support_size] interaction rows
    eval_rows: np.ndarray  # interaction rows of the evaluation users in the scenario


@dataclass(frozen=True)
class EpisodeTask:
    """A meta-train scenario: its episode users' scenario interactions, hidden from pretraining."""

    scenario_id: str
    pool: np.ndarray  # [P] item indices, sorted
    rows: np.ndarray  # interaction rows of the episode users in the scenario


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
            "visible_interactions": int(self.visible.sum()),
            "users_without_visible_interaction": int((visible_users == 0).sum()),
            "items_without_visible_interaction": int((visible_items == 0).sum()),
        }


def select_scenarios(data: InteractionData, selection: ScenarioSelection) -> list[int]:
    """Indices of the scenarios whose pool size and interaction count are in range."""
    item_counts = np.bincount(data.items, minlength=data.num_items)
    chosen = [
        index
        for index, pool in enumerate(data.scenario_pools)
        if selection.min_pool_items <= len(pool) <= selection.max_pool_items
        and item_counts[pool].sum() >= selection.min_interactions
    ]
    if len(chosen) < len(SPLITS):
        raise SettingsError(
            f"{data.name}: {len(chosen)} scenario(s) have {selection.min_pool_items}.."
            f"{selection.max_pool_items} pool items and at least {selection.min_interactions} "
            "interactions (settings min_pool_items, max_pool_items, min_interactions); "
            "at least 3 are needed for meta-train, meta-valid and meta-test"
        )
    return chosen


def build_benchmark(data: InteractionData, config: ProtocolConfig, seed: int) -> Benchmark:
    chosen = select_scenarios(data, config.selection)
    chosen.sort(key=lambda index: data.scenario_ids[index])
    order = np.random.default_rng([seed, len(chosen)]).permutation(len(chosen))
    n_train = max(1, round(config.train_share * len(chosen)))
    n_valid = max(1, round(config.valid_share * len(chosen)))
    n_train = min(n_train, len(chosen) - n_valid - 1)
    split_of = {
        "train": [chosen[i] for i in order[:n_train]],
        "valid": [chosen[i] for i in order[n_train : n_train + n_valid]],
        "test": [chosen[i] for i in order[n_train + n_valid :]],
    }

    dropped: dict[str, str] = {}
    # One seeded interleaved claim order, each split skipping what the other claimed: no
    # meta-test interaction reaches model selection, and neither split gets only leftovers
    # where scenarios overlap (docs/protocol.md).
    claimed = {"valid": np.zeros(data.num_interactions, dtype=bool)}
    claimed["test"] = claimed["valid"].copy()
    other = {"valid": "test", "test": "valid"}
    evaluation: dict[str, list[EvaluationTask]] = {"valid": [], "test": []}
    queue = [("valid", index) for index in split_of["valid"]]
    queue += [("test", index) for index in split_of["test"]]
    for position in np.random.default_rng([seed, len(queue), 1]).permutation(len(queue)):
        split, index = queue[position]
        blocked = claimed[other[split]]
        task = _evaluation_task(data, index, blocked, config, seed, dropped)
        if task is not None:
            mine = claimed[split]
            mine[task.support_rows] = True
            mine[task.eval_rows] = True
            mine[_cut_rows(data, task, blocked)] = True
            evaluation[split].append(task)
    for split, tasks in evaluation.items():  # split order, whatever the claiming order was
        rank = {data.scenario_ids[index]: r for r, index in enumerate(split_of[split])}
        tasks.sort(key=lambda task: rank[task.scenario_id])
    for split in ("valid", "test"):
        if not evaluation[split]:
            raise SettingsError(
                f"{data.name}: no meta-{split} scenario has {config.support_size} support "
                "interactions from shared users and an evaluation user left (settings "
                "support_size, min_outside_interactions)"
            )

    held_out = claimed["valid"] | claimed["test"]
    train = _episode_tasks(data, split_of["train"], held_out, config, seed)
    episode_rows = _union([task.rows for task in train], data.num_interactions)
    return Benchmark(
        data=data,
        config=config,
        seed=seed,
        train=train,
        valid=evaluation["valid"],
        test=evaluation["test"],
        visible=~(held_out | episode_rows),
        dropped=dropped,
    )


def _pool_mask(data: InteractionData, index: int) -> np.ndarray:
    mask = np.zeros(data.num_items, dtype=bool)
    mask[data.scenario_pools[index]] = True
    return mask


def _shared_users(
    data: InteractionData, in_pool: np.ndarray, blocked: np.ndarray, min_outside: int
) -> tuple[np.ndarray, np.ndarray]:
    """The scenario's unblocked rows, and its users with enough unblocked rows outside it."""
    scenario_rows = np.flatnonzero(in_pool & ~blocked)
    outside = np.bincount(data.users[~in_pool & ~blocked], minlength=data.num_users)
    scenario_users = np.unique(data.users[scenario_rows])
    return scenario_rows, scenario_users[outside[scenario_users] >= min_outside]


def _rows_by_user(data: InteractionData, rows: np.ndarray) -> dict[int, np.ndarray]:
    """Rows grouped by user; rows are sorted by user then time, so groups are earliest first."""
    users = data.users[rows]
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    return {
        int(users[s]): group for s, group in zip(starts, np.split(rows, starts[1:]), strict=True)
    }


def _evaluation_task(
    data: InteractionData,
    index: int,
    blocked: np.ndarray,
    config: ProtocolConfig,
    seed: int,
    dropped: dict[str, str],
) -> EvaluationTask | None:
    scenario_id = data.scenario_ids[index]
    in_pool = _pool_mask(data, index)[data.items]
    scenario_rows, shared = _shared_users(data, in_pool, blocked, config.min_outside_interactions)
    rows_of = _rows_by_user(data, scenario_rows)
    rng = scenario_rng(seed, scenario_id)
    shared = rng.permutation(shared)

    counts = np.array([len(rows_of[int(u)]) for u in shared], dtype=np.int64)
    reached = np.flatnonzero(np.cumsum(counts) >= config.support_size)
    if len(reached) == 0 or reached[0] + 1 >= len(shared):
        dropped[scenario_id] = (
            f"shared users have {int(counts.sum())} interactions in {len(shared)} users: "
            f"not enough for {config.support_size} support interactions and an evaluation user"
        )
        return None
    last = int(reached[0])
    support_parts = [rows_of[int(u)] for u in shared[:last]]
    # The last support user contributes their earliest interactions up to the support size.
    room = config.support_size - sum(len(part) for part in support_parts)
    support_parts.append(rows_of[int(shared[last])][:room])

    remaining = shared[last + 1 :]
    n_eval = max(1, round(config.eval_user_share * len(remaining)))
    eval_users = np.sort(rng.choice(remaining, size=n_eval, replace=False))
    return EvaluationTask(
        scenario_id=scenario_id,
        pool=data.scenario_pools[index],
        support_rows=np.sort(np.concatenate(support_parts)),
        eval_rows=np.sort(np.concatenate([rows_of[int(u)] for u in eval_users])),
    )


def _cut_rows(data: InteractionData, task: EvaluationTask, blocked: np.ndarray) -> np.ndarray:
    """The last support user's scenario rows beyond the support size: hidden, never used."""
    support_users = np.unique(data.users[task.support_rows])
    pool_mask = np.zeros(data.num_items, dtype=bool)
    pool_mask[task.pool] = True
    user_mask = np.zeros(data.num_users, dtype=bool)
    user_mask[support_users] = True
    rows = np.flatnonzero(pool_mask[data.items] & user_mask[data.users] & ~blocked)
    return np.setdiff1d(rows, task.support_rows, assume_unique=True)


def _episode_tasks(
    data: InteractionData,
    indices: list[int],
    claimed: np.ndarray,
    config: ProtocolConfig,
    seed: int,
) -> list[EpisodeTask]:
    """Episode users per meta-train scenario, drawn round-robin (one user per scenario per
    round, in a seeded order) until their scenario rows reach `episode_share` of all rows."""
    budget = config.episode_share * data.num_interactions
    queues: list[tuple[int, list[np.ndarray]]] = []
    for index in indices:
        in_pool = _pool_mask(data, index)[data.items]
        scenario_rows, shared = _shared_users(
            data, in_pool, claimed, config.min_outside_interactions
        )
        rows_of = _rows_by_user(data, scenario_rows)
        order = scenario_rng(seed, data.scenario_ids[index]).permutation(shared)
        queues.append((index, [rows_of[int(u)] for u in order]))

    hidden = np.zeros(data.num_interactions, dtype=bool)
    taken: list[list[np.ndarray]] = [[] for _ in queues]
    hidden_count = 0
    for round_number in range(max((len(q) for _, q in queues), default=0)):
        for position, (_, queue) in enumerate(queues):
            if hidden_count >= budget:
                break
            if round_number < len(queue):
                rows = queue[round_number]
                hidden_count += int((~hidden[rows]).sum())
                hidden[rows] = True
                taken[position].append(rows)
        if hidden_count >= budget:
            break
    return [
        EpisodeTask(
            scenario_id=data.scenario_ids[index],
            pool=data.scenario_pools[index],
            rows=np.sort(np.concatenate(parts)) if parts else np.empty(0, dtype=np.int64),
        )
        for (index, _), parts in zip(queues, taken, strict=True)
    ]


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
