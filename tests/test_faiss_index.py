"""The mapping variant's FAISS index: exact by default, factory strings for approximate
indexes, a fallback to exact where the pool is too small to train one."""

import logging

import numpy as np
import pytest
import torch

from service.recommenders import build_index, check_index_factory

CPU = torch.device("cpu")


@pytest.fixture
def pool() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(2000, 16)).astype(np.float32), rng.normal(size=(5, 16)).astype(
        np.float32
    )


def exact_top(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :k]


def test_flat_is_the_exact_inner_product_ranking(pool):
    vectors, queries = pool
    scores, positions = build_index(vectors, "Flat", 0, CPU).search(queries, 20)
    np.testing.assert_array_equal(positions, exact_top(vectors, queries, 20))
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ vectors.T, positions, 1), 1e-5)


def test_an_approximate_factory_finds_most_of_the_exact_top(pool):
    vectors, queries = pool
    _, positions = build_index(vectors, "HNSW32", 0, CPU).search(queries, 20)
    exact = exact_top(vectors, queries, 20)
    overlap = np.mean([len(set(a) & set(b)) / 20 for a, b in zip(positions, exact, strict=True)])
    assert overlap >= 0.8


def test_small_pools_use_flat_below_the_threshold(pool):
    vectors, queries = pool
    index = build_index(vectors, "HNSW32", len(vectors) + 1, CPU)
    assert index.ntotal == len(vectors) and not hasattr(index, "hnsw")
    _, positions = index.search(queries, 20)
    np.testing.assert_array_equal(positions, exact_top(vectors, queries, 20))


def test_an_untrainable_factory_falls_back_to_flat_with_a_warning(pool, caplog):
    vectors, queries = pool
    with caplog.at_level(logging.WARNING, logger="service.recommenders"):
        index = build_index(vectors[:100], "IVF4096,Flat", 0, CPU)
    assert "using the exact Flat index" in caplog.text
    _, positions = index.search(queries, 10)
    np.testing.assert_array_equal(positions, exact_top(vectors[:100], queries, 10))


def test_a_bad_factory_string_is_refused():
    check_index_factory("IVF64,PQ8")
    with pytest.raises(ValueError, match="S2META_FAISS_INDEX"):
        check_index_factory("NoSuchIndex")
