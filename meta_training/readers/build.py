"""`InteractionData`, and the one function every reader ends in: ids to indices, rows sorted
by user and time, repeated (user, item) pairs merged, scenario pools with cold items."""

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from meta_training.errors import DataError


@dataclass(frozen=True)
class InteractionData:
    """Implicit feedback with a scenario dimension.

    Rows are sorted by user and, within a user, by time: a user's rows are contiguous and
    earliest first, so "the earliest k" is a slice. Items named only by the scenario
    membership (cold items) come after every interacted item in `item_ids` and have no row.
    """

    name: str
    user_ids: list[str]
    item_ids: list[str]
    users: np.ndarray  # [n] int32, index into user_ids
    items: np.ndarray  # [n] int32, index into item_ids
    scenario_ids: list[str]
    scenario_pools: list[np.ndarray]  # per scenario: sorted unique item indices
    source_files: tuple[Path, ...]
    # [n] float64 > 0, the ALS confidence of each row; None when the input has no weights.
    weights: np.ndarray | None = None

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def num_interactions(self) -> int:
        return len(self.users)


def build_interactions(
    name: str,
    users: list[str],
    items: list[str],
    times: np.ndarray,
    weights: np.ndarray | None,
    memberships: Iterable[tuple[str, str]],
    files: tuple[Path, ...],
) -> InteractionData:
    """One row per (user, item, time[, weight]) and (item, scenario) memberships in input order.

    A repeated (user, item) pair keeps its earliest occurrence, because the protocol reasons
    about which items a user met first; its weights add up, as repeated purchases or plays
    of one item are more confidence in the same preference.
    """
    if not users:
        raise DataError(f"{files[0]}: no interactions")
    user_index: dict[str, int] = {}
    item_index: dict[str, int] = {}
    user_rows = np.fromiter(
        (user_index.setdefault(u, len(user_index)) for u in users), np.int64, len(users)
    )
    item_rows = np.fromiter(
        (item_index.setdefault(i, len(item_index)) for i in items), np.int64, len(items)
    )
    # Sort by user, then time, then input order; keep a pair's earliest occurrence.
    order = np.lexsort((np.arange(len(user_rows)), times, user_rows))
    user_rows, item_rows = user_rows[order], item_rows[order]
    pair_keys = user_rows * len(item_index) + item_rows
    _, first, group = np.unique(pair_keys, return_index=True, return_inverse=True)
    keep = np.sort(first)
    if weights is not None:
        totals = np.bincount(group, weights=np.asarray(weights, dtype=np.float64)[order])
        weights = totals[group[keep]]

    scenario_index: dict[str, int] = {}
    members: list[set[int]] = []
    for item, scenario in memberships:
        position = scenario_index.setdefault(scenario, len(scenario_index))
        if position == len(members):
            members.append(set())
        # An item never interacted with is a cold item: in its pools, with no row.
        members[position].add(item_index.setdefault(item, len(item_index)))
    if not members:
        raise DataError(f"{files[-1]}: no item is assigned to any scenario")

    return InteractionData(
        name=name,
        user_ids=list(user_index),
        item_ids=list(item_index),
        users=user_rows[keep].astype(np.int32),
        items=item_rows[keep].astype(np.int32),
        scenario_ids=list(scenario_index),
        scenario_pools=[np.array(sorted(m), dtype=np.int32) for m in members],
        source_files=files,
        weights=weights,
    )
