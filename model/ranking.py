"""Top-k of several interaction or hybrid recommenders' pools at once, for ranking a batch of
requests: the compiled kernel (model/csrc/rank_pools.cpp) where it is built and the tensors
are on the CPU, else the reference below. Both score as `recommender.score_pool` does, a pool
in chunks of about `chunk_pairs` (user, item) pairs, and give the same top-k to float
rounding (tests/test_ranking.py). The kernel releases the GIL for the whole call, so a thread
ranking with it runs beside the thread that called it.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from model import kernels
from model.params import Params
from model.recommender import RecommenderSpec, score_pool

SCORE_CHUNK = 65_536  # (user, item) pairs per forward (bounds memory on large pools)


class RankedPool:
    """One recommender's pool, ready to rank for any users (the interaction or hybrid
    variant): its parameters and the pool's tensors, and the kernel's view of them, made once
    so that ranking a batch does no per-pool Python work besides the call."""

    def __init__(
        self,
        spec: RecommenderSpec,
        params: Params,
        pool_half: Tensor,
        item_table: Tensor,
        pool_rows: Tensor,
        pool_pop: Tensor,
    ) -> None:
        self.spec, self.params = spec, params
        self.pool_half = pool_half  # pool_first_layer(params, pool) [P, H]
        self.item_table = item_table  # the item embeddings the pool's rows index
        self.pool_rows = pool_rows  # [P]
        self.pool_pop = pool_pop  # log-popularity [P]
        layers = range(len(spec.mlp_widths()) - 1)
        self.weights = [params[f"mlp.{layer}.weight"] for layer in layers]
        self.biases = [params[f"mlp.{layer}.bias"] for layer in layers]
        self.hybrid_terms = (
            (item_table, pool_rows, pool_pop, params["dot_scale"], params["pop_weight"])
            if spec.variant == "hybrid"
            else None
        )
        # On the CPU in float32, what the kernel is built and tested for; elsewhere (CUDA)
        # the reference's calls are the same ATen operations.
        self.kernel_applies = pool_half.device.type == "cpu" and pool_half.dtype == torch.float32


@dataclass(frozen=True)
class PoolQuery:
    """A pool to rank for some users: the top k of each."""

    pool: RankedPool
    users: Tensor  # [U, D]
    k: int  # at most the pool's size


def top_k_pools(
    queries: list[PoolQuery], chunk_pairs: int = SCORE_CHUNK
) -> list[tuple[Tensor, Tensor]]:
    """(values, indices) [U, k] of the top-k scores of each query, in the queries' order."""
    extension = kernels.load() if all(query.pool.kernel_applies for query in queries) else None
    if extension is None:
        return [_top_k_reference(query, chunk_pairs) for query in queries]
    arguments = [
        (q.users, q.pool.weights, q.pool.biases, q.pool.pool_half, q.pool.hybrid_terms, q.k)
        for q in queries
    ]
    return extension.top_k_pools(arguments, chunk_pairs)


def kernel_available() -> bool:
    """Whether CPU queries here are ranked by the compiled kernel (with the GIL released)."""
    return kernels.load() is not None


def _top_k_reference(query: PoolQuery, chunk_pairs: int) -> tuple[Tensor, Tensor]:
    pool = query.pool
    with torch.no_grad():
        # index_select, not indexing with a tensor: several times faster on a pool of hundreds
        # (docs/performance.md).
        embeddings = pool.item_table.index_select(0, pool.pool_rows)
        chunk = max(1, chunk_pairs // query.users.shape[0])
        parts = zip(
            torch.split(embeddings, chunk),
            torch.split(pool.pool_pop, chunk),
            torch.split(pool.pool_half, chunk),
            strict=True,
        )
        chunks = [score_pool(pool.spec, pool.params, query.users, *part) for part in parts]
        scores = chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=1)
        top = torch.topk(scores, query.k, dim=1)
    return top.values, top.indices
