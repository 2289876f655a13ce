"""The mapping variant's FAISS index: exact below the minimum pool, factory strings and
search parameters for approximate indexes, a fallback to exact where the pool is too small to
train one, settings checked at start."""

import logging

import numpy as np
import pytest
import torch

from service.recommenders import build_index, check_index_settings
from service.settings import Settings

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
    scores, positions = build_index(vectors, "Flat", "", 0, CPU).search(queries, 20)
    np.testing.assert_array_equal(positions, exact_top(vectors, queries, 20))
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ vectors.T, positions, 1), 1e-5)


def test_an_approximate_factory_finds_most_of_the_exact_top(pool):
    vectors, queries = pool
    _, positions = build_index(vectors, "HNSW32", "efSearch=64", 0, CPU).search(queries, 20)
    exact = exact_top(vectors, queries, 20)
    overlap = np.mean([len(set(a) & set(b)) / 20 for a, b in zip(positions, exact, strict=True)])
    assert overlap >= 0.8


def test_small_pools_use_flat_below_the_threshold(pool):
    vectors, queries = pool
    index = build_index(vectors, "HNSW32", "efSearch=64", len(vectors) + 1, CPU)
    assert index.ntotal == len(vectors) and not hasattr(index, "hnsw")
    _, positions = index.search(queries, 20)
    np.testing.assert_array_equal(positions, exact_top(vectors, queries, 20))


def test_an_untrainable_factory_falls_back_to_flat_with_a_warning(pool, caplog):
    vectors, queries = pool
    with caplog.at_level(logging.WARNING, logger="service.recommenders"):
        index = build_index(vectors[:100], "IVF4096,Flat", "nprobe=8", 0, CPU)
    assert "using the exact Flat index" in caplog.text
    _, positions = index.search(queries, 10)
    np.testing.assert_array_equal(positions, exact_top(vectors[:100], queries, 10))


def test_search_parameters_are_applied_and_trade_recall_for_work(pool):
    vectors, queries = pool
    exact = exact_top(vectors, queries, 20)
    overlaps = {}
    for nprobe in (1, 16):
        index = build_index(vectors, "IVF16,Flat", f"nprobe={nprobe}", 0, CPU)
        assert index.nprobe == nprobe
        _, positions = index.search(queries, 20)
        overlaps[nprobe] = np.mean(
            [len(set(a) & set(b)) / 20 for a, b in zip(positions, exact, strict=True)]
        )
    assert overlaps[16] == 1.0  # every list searched: exact
    assert overlaps[1] < 0.9


def test_the_default_settings_are_exact_below_the_minimum_pool_and_ivf_from_it(pool):
    vectors, queries = pool
    settings = Settings()
    small = build_index(vectors, settings.faiss_index, settings.faiss_search, len(vectors) + 1, CPU)
    _, positions = small.search(queries, 20)
    np.testing.assert_array_equal(positions, exact_top(vectors, queries, 20))
    large = np.random.default_rng(1).normal(size=(40_000, 16)).astype(np.float32)
    index = build_index(large, settings.faiss_index, settings.faiss_search, len(large), CPU)
    assert index.ntotal == len(large)
    assert index.nlist == 1024 and index.nprobe == 96


def test_bad_index_settings_are_refused():
    check_index_settings("IVF64,PQ8", "nprobe=4", CPU)
    check_index_settings("HNSW32", "efSearch=128", CPU)
    check_index_settings("Flat", "", CPU)
    with pytest.raises(ValueError, match="S2META_FAISS_INDEX"):
        check_index_settings("NoSuchIndex", "", CPU)
    with pytest.raises(ValueError, match="S2META_FAISS_SEARCH"):
        check_index_settings("HNSW32", "nprobe=4", CPU)
    with pytest.raises(ValueError, match="S2META_FAISS_SEARCH"):
        check_index_settings("Flat", "efSearch=oops", CPU)
