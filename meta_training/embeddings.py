"""Pretrained user and item embeddings: implicit's ALS on the visible interactions only.

A user or item with no visible interaction has no embedding: its vector is zero (so every
dot-product score involving it is 0, a tie broken at random by the ranking) and its entry in
`user_known` / `item_known` is False, so methods can tell and fall back.
"""

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from implicit.cpu.als import AlternatingLeastSquares
from threadpoolctl import threadpool_limits

from meta_training.config import EmbeddingConfig
from meta_training.dataset import InteractionData


@dataclass(frozen=True)
class Embeddings:
    user: np.ndarray  # [U, D] float32
    item: np.ndarray  # [I, D] float32
    user_known: np.ndarray  # [U] bool
    item_known: np.ndarray  # [I] bool


def pretrain_embeddings(
    data: InteractionData, visible: np.ndarray, config: EmbeddingConfig, seed: int
) -> Embeddings:
    users, items = data.users[visible], data.items[visible]
    # The input's weights are ALS confidences (implicit scales them by alpha); else all 1.
    values = np.ones(len(users)) if data.weights is None else data.weights[visible]
    user_items = sp.csr_matrix(
        (values.astype(np.float32), (users, items)),
        shape=(data.num_users, data.num_items),
    )
    # implicit parallelises over users itself; a multi-threaded BLAS underneath only contends.
    with threadpool_limits(1, "blas"):
        model = AlternatingLeastSquares(
            factors=config.dim,
            regularization=config.regularization,
            alpha=config.alpha,
            iterations=config.iterations,
            random_state=seed,
        )
        model.fit(user_items, show_progress=False)
    user_known = np.bincount(users, minlength=data.num_users) > 0
    item_known = np.bincount(items, minlength=data.num_items) > 0
    user_vectors = np.asarray(model.user_factors, dtype=np.float32).copy()
    item_vectors = np.asarray(model.item_factors, dtype=np.float32).copy()
    user_vectors[~user_known] = 0.0
    item_vectors[~item_known] = 0.0
    return Embeddings(user_vectors, item_vectors, user_known, item_known)
