"""Training triples for scenario-specific learning.

Each step takes N (user, positive, negative) triples: the pair from the scenario's training
interactions, the negative drawn from the scenario's item pool and not a positive of that
user. Popularity features are log(1 + count in the training interactions); a positive's
count leaves its own interaction out, so the feature means the same in training as for a
new user at serving time.
"""

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

NEGATIVE_REDRAWS = 20


@dataclass(frozen=True)
class Triples:
    """Index tensors into the embedding tables and popularity features, shape [..., N]."""

    users: Tensor
    positives: Tensor
    negatives: Tensor
    positive_pop: Tensor
    negative_pop: Tensor

    def as_dict(self) -> dict[str, Tensor]:
        return dict(self.__dict__)


def pool_popularity(train_items: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """[P] log(1 + count) of each pool item in the training interactions."""
    counts = np.zeros(len(pool), dtype=np.float32)
    position = np.searchsorted(pool, train_items)
    inside = (position < len(pool)) & (pool[np.minimum(position, len(pool) - 1)] == train_items)
    np.add.at(counts, position[inside], 1.0)
    return np.log1p(counts)


def sample_triples(
    train_users: np.ndarray,
    train_items: np.ndarray,
    pool: np.ndarray,
    shape: tuple[int, ...],
    rng: np.random.Generator,
    popularity_items: np.ndarray | None = None,
) -> Triples:
    """Triples of the given leading shape (e.g. (steps, N)); pool must be sorted.

    Popularity comes from the sampled interactions themselves (each positive leaving itself
    out) or, for held-out triples, from `popularity_items` (the scenario's training items).
    """
    if len(train_users) == 0:
        raise ValueError("a scenario needs at least one training interaction")
    if len(pool) < 2:
        raise ValueError("a scenario's pool needs at least two items")
    if not _in_sorted(train_items, pool).all():
        raise ValueError("every training interaction's item must be in the pool")
    picks = rng.integers(0, len(train_users), size=shape)
    users, positives = train_users[picks], train_items[picks]
    negative_slots = _negative_slots(train_users, train_items, users, pool, rng)
    negatives = pool[negative_slots]

    own = popularity_items is None
    counts = np.expm1(pool_popularity(train_items if own else popularity_items, pool))
    # Pool positions of the few training items, then of each pick (a search per triple is
    # the sampler's largest cost otherwise).
    positive_counts = counts[np.searchsorted(pool, train_items)[picks]] - (1.0 if own else 0.0)
    negative_counts = counts[negative_slots]
    return Triples(
        users=torch.as_tensor(users, dtype=torch.long),
        positives=torch.as_tensor(positives, dtype=torch.long),
        negatives=torch.as_tensor(negatives, dtype=torch.long),
        positive_pop=torch.as_tensor(np.log1p(positive_counts), dtype=torch.float32),
        negative_pop=torch.as_tensor(np.log1p(negative_counts), dtype=torch.float32),
    )


def _negative_slots(
    train_users: np.ndarray,
    train_items: np.ndarray,
    users: np.ndarray,
    pool: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """Pool positions of items that are not a training positive of the matching user (redrawn
    where they are; a user who has every pool item keeps the last draw)."""
    stride = np.int64(max(int(pool.max()), int(train_items.max())) + 1)
    positive_keys = np.unique(train_users.astype(np.int64) * stride + train_items)
    user_keys = users.astype(np.int64) * stride
    slots = rng.integers(0, len(pool), size=users.shape)
    for _ in range(NEGATIVE_REDRAWS):
        clash = _in_sorted(user_keys + pool[slots], positive_keys)
        if not clash.any():
            break
        slots[clash] = rng.integers(0, len(pool), size=int(clash.sum()))
    return slots


def _in_sorted(values: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """np.isin(values, keys) for sorted `keys`, by binary search: several times faster at
    these sizes (np.isin sorts both arrays on every call)."""
    position = np.minimum(np.searchsorted(keys, values), len(keys) - 1)
    return keys[position] == values
