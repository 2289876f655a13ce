"""Top-k of several pools at once: the compiled kernel against the reference (which scores
as `score_pool`, tests/test_recommender.py), chunked pools, the fallback, and the GIL."""

import threading

import pytest
import torch

from model import kernels, ranking
from model.ranking import PoolQuery, RankedPool, top_k_pools
from model.recommender import RecommenderSpec, init_params, pool_first_layer


def pool_query(variant: str, users: int, pool_size: int, k: int, seed: int) -> PoolQuery:
    generator = torch.Generator().manual_seed(seed)
    spec = RecommenderSpec(variant, 16)
    params = init_params(spec, generator)
    table = torch.randn(pool_size * 2, 16, generator=generator)
    rows = torch.randperm(pool_size * 2, generator=generator)[:pool_size]
    pool_pop = torch.log1p(torch.rand(pool_size, generator=generator) * 50)
    with torch.no_grad():
        pool_half = pool_first_layer(params, table[rows])
    user_vectors = torch.randn(users, 16, generator=generator)
    return PoolQuery(RankedPool(spec, params, pool_half, table, rows, pool_pop), user_vectors, k)


QUERIES = [
    ("interaction", 1, 300, 10),
    ("hybrid", 3, 1000, 25),
    ("hybrid", 2, 7, 7),  # k the whole pool
    ("interaction", 4, 50, 1),
]


@pytest.fixture(scope="module")
def extension():
    module = kernels.load()
    assert module is not None, "the compiled kernels should build on this machine"
    return module


@pytest.mark.parametrize("chunk_pairs", [ranking.SCORE_CHUNK, 64, 1])
def test_the_kernel_ranks_as_the_reference(extension, chunk_pairs):
    queries = [pool_query(*shape, seed) for seed, shape in enumerate(QUERIES)]
    with_kernel = top_k_pools(queries, chunk_pairs)
    reference = [ranking._top_k_reference(query, chunk_pairs) for query in queries]
    for (values, indices), (want_values, want_indices), query in zip(
        with_kernel, reference, queries, strict=True
    ):
        assert values.shape == (query.users.shape[0], query.k)
        torch.testing.assert_close(values, want_values, rtol=1e-5, atol=1e-6)
        assert torch.equal(indices, want_indices)
    # Chunking changes nothing but memory: the whole pool in one forward gives the same.
    whole = top_k_pools(queries, ranking.SCORE_CHUNK)
    for (values, indices), (whole_values, whole_indices) in zip(with_kernel, whole, strict=True):
        torch.testing.assert_close(values, whole_values, rtol=1e-5, atol=1e-6)
        assert torch.equal(indices, whole_indices)


def test_without_the_kernel_the_reference_ranks(monkeypatch):
    queries = [pool_query(*shape, seed) for seed, shape in enumerate(QUERIES)]
    monkeypatch.setattr(ranking.kernels, "load", lambda: None)
    assert not ranking.kernel_available()
    for (values, indices), query in zip(top_k_pools(queries), queries, strict=True):
        want_values, want_indices = ranking._top_k_reference(query, ranking.SCORE_CHUNK)
        assert torch.equal(values, want_values) and torch.equal(indices, want_indices)


def test_a_bad_query_raises(extension):
    too_many = pool_query("interaction", 1, 5, 6, seed=0)  # k above the pool's size
    with pytest.raises(RuntimeError):
        top_k_pools([too_many])


def test_the_kernel_releases_the_gil(extension):
    """While a thread is inside the kernel, this thread runs Python: were the GIL held for
    the call, it could run again only once the call returned."""
    large = [pool_query("hybrid", 64, 20_000, 10, seed) for seed in range(6)]
    entering, done = threading.Event(), threading.Event()

    def rank() -> None:
        entering.set()
        top_k_pools(large)
        done.set()

    worker = threading.Thread(target=rank)
    worker.start()
    entering.wait()
    ran_meanwhile = sum(range(1000)) == 499_500 and not done.is_set()
    worker.join()
    assert ran_meanwhile
