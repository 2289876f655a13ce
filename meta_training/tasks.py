"""A scenario's tasks: a meta-valid/test task (support users, evaluation users, and every row
it claims) or a meta-train task (episode users), each drawn in a seeded order. `protocol.py`
decides which scenario goes to which split; docs/protocol.md states the rules in prose.
"""

from dataclasses import dataclass

import numpy as np

from meta_training.config import ProtocolConfig
from meta_training.dataset import InteractionData
from model.scenario import scenario_rng


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


def claim_evaluation(
    data: InteractionData,
    queue: list[tuple[str, int]],
    config: ProtocolConfig,
    seed: int,
    dropped: dict[str, str],
    budget: float,
) -> tuple[dict[str, list[EvaluationTask]], np.ndarray]:
    """Meta-valid/test tasks and every row they claim (support, cut remainder, evaluation).

    One seeded interleaved claim order, each split skipping what the other claimed: no
    meta-test interaction reaches model selection, and neither split gets only leftovers
    where scenarios overlap (docs/protocol.md). Claiming stops once `budget` rows are taken.
    """
    claimed = {"valid": np.zeros(data.num_interactions, dtype=bool)}
    claimed["test"] = claimed["valid"].copy()
    other = {"valid": "test", "test": "valid"}
    evaluation: dict[str, list[EvaluationTask]] = {"valid": [], "test": []}
    for position in np.random.default_rng([seed, len(queue), 1]).permutation(len(queue)):
        if claimed["valid"].sum() + claimed["test"].sum() >= budget:
            break
        split, index = queue[position]
        blocked = claimed[other[split]]
        task = _evaluation_task(data, index, blocked, config, seed, dropped)
        if task is not None:
            mine = claimed[split]
            mine[task.support_rows] = True
            mine[task.eval_rows] = True
            mine[_cut_rows(data, task, blocked)] = True
            evaluation[split].append(task)
    return evaluation, claimed["valid"] | claimed["test"]


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


def episode_tasks(
    data: InteractionData,
    indices: list[int],
    claimed: np.ndarray,
    config: ProtocolConfig,
    seed: int,
    budget: float,
) -> list[EpisodeTask]:
    """Episode users per meta-train scenario, drawn round-robin (one user per scenario per
    round, in a seeded order) until their scenario rows reach `budget` rows."""
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
