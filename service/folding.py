"""Fold-in at serving time: vectors for the candidates and users of a registration that the
meta learner's tables lack (no row, or a zero vector), from the scenario's interactions
(model/fold_in.py; docs/http-api.md says what a client sees).

Items first, from the fixed vectors of the known users who interacted with them; a candidate
no known user touched gets the zero vector, what the solve gives with no interaction, so the
recommender's embedding terms carry nothing for it and the scenario's popularity decides.
Then users, from the vectors of their items (folded ones included). A user none of whose
items has a nonzero vector cannot be folded and is ignored.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from model.fold_in import fold_in
from service.learners import LoadedVersion

# In the record's safetensors: the folded users' vectors; the folded items' nonzero vectors
# and their positions among the folded items (the others are zero).
USERS_KEY, ITEMS_KEY, ITEM_ROWS_KEY = "folded_users", "folded_items", "folded_item_rows"


@dataclass(frozen=True)
class Folded:
    """A registration's folded ids and their vectors, in order (rows [F, D])."""

    users: list[str]
    user_vectors: Tensor
    items: list[str]
    item_vectors: Tensor
    unfoldable_users: list[str]  # unknown users with nothing to fold from

    def tensors(self) -> dict[str, Tensor]:
        """What the record keeps beside theta (nothing when nothing was folded). Items no
        known user touched are zero and not kept: a large new pool is mostly those."""
        rows = torch.nonzero(self.item_vectors.any(dim=1)).flatten()
        parts = {
            USERS_KEY: self.user_vectors,
            ITEMS_KEY: self.item_vectors[rows],
            ITEM_ROWS_KEY: rows,
        }
        return {
            key: value.detach().cpu().contiguous() for key, value in parts.items() if len(value)
        }


def stored_item_vectors(tensors: dict[str, Tensor], count: int, dim: int) -> Tensor:
    """[count, dim]: the folded items' vectors from a record's `Folded.tensors()`."""
    vectors = torch.zeros(count, dim)
    if ITEMS_KEY in tensors:
        vectors[tensors[ITEM_ROWS_KEY]] = tensors[ITEMS_KEY].float()
    return vectors


def embedded_user_rows(loaded: LoadedVersion, users: Sequence[str]) -> dict[str, int]:
    """The rows of those of `users` with a nonzero vector in `loaded`'s table; one search for
    all of them."""
    rows = loaded.embedded_user_rows(users)
    return {user: int(row) for user, row in zip(users, rows, strict=True) if row >= 0}


def fold_registration(
    loaded: LoadedVersion,
    interactions: list[tuple[str, str]],
    candidates: list[str],
    candidate_rows: np.ndarray,
    user_rows: dict[str, int],
    item_rows: dict[str, int],
) -> Folded:
    """candidate_rows: `loaded.embedded_item_rows(candidates)`; user_rows:
    `embedded_user_rows` of the interactions' users; item_rows: the candidates with a row,
    by id (the caller has them all: one search over the tables for each side)."""
    settings = loaded.fold_settings
    tables = loaded.tables
    dim, device = tables.item.shape[1], tables.item.device
    new_items = [candidates[k] for k in np.flatnonzero(candidate_rows < 0)]
    known_users: dict[str, list[int]] = {item: [] for item in new_items}
    for user, item in interactions:
        if item in known_users and user in user_rows:
            known_users[item].append(user_rows[user])
    # The Gram matrices only when something is folded: at 10M users it takes seconds, once.
    item_vectors = torch.zeros(0, dim, device=device)
    if new_items:
        # Most new candidates of a large pool have no interaction: no gather for those.
        untouched = tables.user[:0]
        counterparts = [
            tables.user[torch.as_tensor(rows, dtype=torch.long, device=device)]
            if rows
            else untouched
            for rows in known_users.values()
        ]
        item_vectors = fold_in(loaded.user_gram, counterparts, settings)
    folded_item = dict(zip(new_items, item_vectors, strict=True))

    item_vectors_of: dict[str, list[Tensor]] = {}
    for user, item in interactions:
        if user in user_rows:
            continue
        vectors = item_vectors_of.setdefault(user, [])
        if item in folded_item:
            if known_users[item]:  # a zero vector says nothing about the user
                vectors.append(folded_item[item])
        else:  # a known item: interactions are checked to be among the candidates
            vectors.append(tables.item[item_rows[item]])
    users = sorted(user for user, vectors in item_vectors_of.items() if vectors)
    user_vectors = torch.zeros(0, dim, device=device)
    if users:
        counterparts = [torch.stack(item_vectors_of[user]) for user in users]
        user_vectors = fold_in(loaded.item_gram, counterparts, settings)
    return Folded(
        users=users,
        user_vectors=user_vectors,
        items=new_items,
        item_vectors=item_vectors,
        unfoldable_users=sorted(user for user, vectors in item_vectors_of.items() if not vectors),
    )
