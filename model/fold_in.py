"""Fold-in: a vector for a user or item the embedding tables lack, from the fixed vectors of
what it interacted with, by the regularised least-squares solve that ALS makes for one row
with the other side fixed (implicit's `recalculate_user` / `recalculate_item`):

    x = (YᵀY + Yᵀ(C - I)Y + λI)⁻¹ Yᵀ C p,   C = diag(alpha * r),  p = 1 where r > 0

YᵀY is over the whole fixed table, Y's rows in the other terms only the counterparts'. The
confidence is alpha * r, as implicit has had it since 0.5 (no "1 +"); with no interaction
the solve gives the zero vector. And scenario-local tables: the rows a batch of scenarios
uses with their folded vectors appended, so adaptation runs on them unchanged.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from model.inner_loss import Tables
from model.scenario import ScenarioInput

# meta_training's EmbeddingConfig defaults, for artifacts whose metrics do not record them.
DEFAULT_REGULARIZATION = 0.01
DEFAULT_ALPHA = 20.0
GRAM_CHUNK = 1 << 16  # rows per step: a 10M-row table is never copied whole in float64
SOLVE_CHUNK = 1024  # systems solved at once: 32 MiB of [D, D] float64 at 64 dims
OUTER_ELEMENTS = 1 << 22  # interactions' [D, D] outer products summed at once: 32 MiB


@dataclass(frozen=True)
class FoldInSettings:
    regularization: float
    alpha: float
    defaulted: bool  # the artifact does not record them: EmbeddingConfig's defaults


def fold_in_settings(metrics: Mapping[str, object]) -> FoldInSettings:
    """The ALS settings the artifact's embeddings were fitted with (metrics["embedding"])."""
    embedding = metrics.get("embedding")
    if isinstance(embedding, Mapping) and "regularization" in embedding and "alpha" in embedding:
        return FoldInSettings(float(embedding["regularization"]), float(embedding["alpha"]), False)
    return FoldInSettings(DEFAULT_REGULARIZATION, DEFAULT_ALPHA, True)


def gram(table: Tensor) -> Tensor:
    """YᵀY [D, D] in float64 of a fixed table [N, D], accumulated in chunks."""
    total = torch.zeros(table.shape[1], table.shape[1], dtype=torch.float64, device=table.device)
    for part in torch.split(table, GRAM_CHUNK):
        part = part.double()
        total.addmm_(part.T, part)
    return total


def fold_in(
    fixed_gram: Tensor,
    counterparts: Sequence[Tensor],
    settings: FoldInSettings,
    strengths: Sequence[Tensor] | None = None,
) -> Tensor:
    """Vectors [R, D] (float32) of R new rows: row k interacted with counterparts[k] [n_k, D]
    (fixed vectors of the other side), strengths[k] [n_k] its r values (1 if None)."""
    dim = fixed_gram.shape[0]
    device = fixed_gram.device
    folded = torch.zeros(len(counterparts), dim, dtype=torch.float64, device=device)
    # A row with no interaction is zero without a solve: a pool may hold a million of them.
    touched = [k for k, vectors in enumerate(counterparts) if len(vectors)]
    base = fixed_gram + settings.regularization * torch.eye(dim, dtype=torch.float64, device=device)
    for start in range(0, len(touched), SOLVE_CHUNK):
        rows = touched[start : start + SOLVE_CHUNK]
        # All the chunk's interactions at once (a few torch calls per chunk, not per row):
        # each row's system sums its interactions' terms.
        y = torch.cat([counterparts[k] for k in rows]).to(device=device, dtype=torch.float64)
        owner = torch.repeat_interleave(
            torch.arange(len(rows), device=device),
            torch.tensor([len(counterparts[k]) for k in rows], device=device),
        )
        if strengths is None:
            confidence = torch.full((len(y),), settings.alpha, dtype=torch.float64, device=device)
        else:
            r = torch.cat([strengths[k] for k in rows]).to(device=device, dtype=torch.float64)
            confidence = settings.alpha * r
        lhs = base.repeat(len(rows), 1, 1)  # [R, D, D]
        weighted = (confidence - 1.0)[:, None] * y
        step = max(1, OUTER_ELEMENTS // (dim * dim))  # interactions' outer products at once
        for first in range(0, len(y), step):
            part = slice(first, first + step)
            lhs.index_add_(0, owner[part], y[part, :, None] * weighted[part, None, :])
        rhs = torch.zeros(len(rows), dim, dtype=torch.float64, device=device)
        rhs.index_add_(0, owner, confidence[:, None] * y)
        solved, info = torch.linalg.solve_ex(lhs, rhs)
        # Singular only without regularisation on a rank-deficient table: the minimum-norm
        # least-squares vector then, rather than an error.
        singular = info != 0
        if singular.any():
            solved[singular] = (torch.linalg.pinv(lhs[singular]) @ rhs[singular, :, None])[..., 0]
        folded[rows] = solved
    return folded.float()


def local_tables(
    tables: Tables,
    scenarios: Sequence[ScenarioInput],
    folded_users: Sequence[Tensor],
    folded_items: Sequence[Tensor],
) -> tuple[Tables, list[ScenarioInput]]:
    """Tables holding only the rows the scenarios use, then each scenario's folded vectors,
    and the scenarios in their rows. In a scenario, row len(tables.user) + k is its
    folded_users[k] (items likewise). The renumbering keeps each scenario's row order, so
    its draws and its adaptation are what the full tables with the folded rows appended
    would give, without copying the tables."""
    num_users, num_items = len(tables.user), len(tables.item)
    users = np.unique(np.concatenate([s.users[s.users < num_users] for s in scenarios]))
    items = np.unique(np.concatenate([np.concatenate([s.pool, s.items]) for s in scenarios]))
    items = items[items < num_items]
    device = tables.user.device
    user_parts = [tables.user[torch.as_tensor(users, device=device)]]
    item_parts = [tables.item[torch.as_tensor(items, device=device)]]
    user_offset, item_offset = len(users), len(items)
    renumbered = []
    for scenario, extra_users, extra_items in zip(
        scenarios, folded_users, folded_items, strict=True
    ):
        user_parts.append(extra_users.to(device))
        item_parts.append(extra_items.to(device))
        renumbered.append(
            replace(
                scenario,
                users=_renumber(scenario.users, users, num_users, user_offset),
                items=_renumber(scenario.items, items, num_items, item_offset),
                pool=_renumber(scenario.pool, items, num_items, item_offset),
            )
        )
        user_offset += len(extra_users)
        item_offset += len(extra_items)
    return Tables(torch.cat(user_parts), torch.cat(item_parts)), renumbered


def _renumber(old: np.ndarray, known: np.ndarray, size: int, offset: int) -> np.ndarray:
    """Rows below `size` to their place in `known` (sorted), the others (folded) after
    `offset`: monotone, so a sorted pool stays sorted."""
    return np.where(old < size, np.searchsorted(known, old), old - size + offset).astype(np.int64)
