"""The mapping variant's retrieval, one contract for every backend (the GPU one where CUDA and
a GPU faiss are here): exact below the minimum pool, factory strings and search parameters
for approximate indexes, a fallback to exact where the pool is too small to train one,
settings checked at start; then what differs by backend, and the default choice."""

import logging

import numpy as np
import pytest
import torch
from conftest import needs_cuda

from service.retrieval import (
    Backend,
    CpuRetriever,
    GpuRetriever,
    Retriever,
    faiss_gpus,
    make_retriever,
)
from service.settings import Settings

DEVICES = {"cpu": torch.device("cpu"), "gpu": torch.device("cuda", 0)}
on_gpu = [
    needs_cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available() or faiss_gpus() == 0, reason="faiss sees no GPU"
    ),
]


@pytest.fixture(params=["cpu", pytest.param("gpu", marks=on_gpu)])
def faiss_backend(request) -> Backend:
    return request.param


def retriever(backend: Backend, factory: str, search: str = "", min_pool: int = 0) -> Retriever:
    return make_retriever(factory, search, min_pool, DEVICES[backend], backend)


@pytest.fixture
def pool() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(2000, 16)).astype(np.float32), rng.normal(size=(5, 16)).astype(
        np.float32
    )


def exact_top(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :k]


def overlap(positions: np.ndarray, exact: np.ndarray) -> float:
    k = exact.shape[1]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(positions, exact, strict=True)]))


def test_the_backend_is_the_one_asked_for(faiss_backend):
    kinds = {"cpu": CpuRetriever, "gpu": GpuRetriever}
    assert type(retriever(faiss_backend, "Flat")) is kinds[faiss_backend]


def test_flat_is_the_exact_inner_product_ranking(faiss_backend, pool):
    vectors, queries = pool
    scores, positions = retriever(faiss_backend, "Flat").build(vectors).search(queries, 20)
    np.testing.assert_array_equal(positions, exact_top(vectors, queries, 20))
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ vectors.T, positions, 1), 1e-5)


def test_an_approximate_factory_finds_most_of_the_exact_top(faiss_backend, pool):
    vectors, queries = pool
    index = retriever(faiss_backend, "IVF16,Flat", "nprobe=10").build(vectors)
    _, positions = index.search(queries, 20)
    assert overlap(positions, exact_top(vectors, queries, 20)) >= 0.8


def test_small_pools_use_flat_below_the_threshold(faiss_backend, pool):
    vectors, queries = pool
    index = retriever(faiss_backend, "IVF16,Flat", "nprobe=1", len(vectors) + 1).build(vectors)
    assert index.ntotal == len(vectors) and not hasattr(index, "nlist")
    _, positions = index.search(queries, 20)
    np.testing.assert_array_equal(positions, exact_top(vectors, queries, 20))


def test_an_untrainable_factory_falls_back_to_flat_with_a_warning(faiss_backend, pool, caplog):
    vectors, queries = pool
    with caplog.at_level(logging.WARNING, logger="service.retrieval"):
        index = retriever(faiss_backend, "IVF4096,Flat", "nprobe=8").build(vectors[:100])
    assert "using the exact Flat index" in caplog.text
    _, positions = index.search(queries, 10)
    np.testing.assert_array_equal(positions, exact_top(vectors[:100], queries, 10))


def test_search_parameters_are_applied_and_trade_recall_for_work(faiss_backend, pool):
    vectors, queries = pool
    exact = exact_top(vectors, queries, 20)
    overlaps = {}
    for nprobe in (1, 16):
        index = retriever(faiss_backend, "IVF16,Flat", f"nprobe={nprobe}").build(vectors)
        assert index.nprobe == nprobe
        _, positions = index.search(queries, 20)
        overlaps[nprobe] = overlap(positions, exact)
    assert overlaps[16] == 1.0  # every list searched: exact
    assert overlaps[1] < 0.9


def test_the_default_settings_are_exact_below_the_minimum_pool_and_ivf_from_it(faiss_backend, pool):
    vectors, queries = pool
    settings = Settings()

    def default(min_pool: int) -> Retriever:
        return retriever(faiss_backend, settings.faiss_index, settings.faiss_search, min_pool)

    _, positions = default(len(vectors) + 1).build(vectors).search(queries, 20)
    np.testing.assert_array_equal(positions, exact_top(vectors, queries, 20))
    large = np.random.default_rng(1).normal(size=(40_000, 16)).astype(np.float32)
    index = default(len(large)).build(large)
    assert index.ntotal == len(large)
    assert index.nlist == 1024 and index.nprobe == 96


def test_index_settings_every_backend_takes_are_accepted(faiss_backend):
    for factory, search in [("IVF64,Flat", "nprobe=4"), ("Flat", "")]:
        retriever(faiss_backend, factory, search).check()


@pytest.mark.parametrize(
    ("factory", "search", "setting"),
    [
        ("NoSuchIndex", "", "S2META_FAISS_INDEX"),
        ("IVF64,Flat", "efSearch=128", "S2META_FAISS_SEARCH"),
        ("Flat", "efSearch=oops", "S2META_FAISS_SEARCH"),
    ],
)
def test_bad_index_settings_are_refused(faiss_backend, factory, search, setting):
    with pytest.raises(ValueError, match=setting):
        retriever(faiss_backend, factory, search).check()


def test_the_cpu_takes_graph_and_compressed_indexes():
    retriever("cpu", "IVF64,PQ8", "nprobe=4").check()
    retriever("cpu", "HNSW32", "efSearch=128").check()
    with pytest.raises(ValueError, match="S2META_FAISS_SEARCH"):
        retriever("cpu", "HNSW32", "nprobe=4").check()


@pytest.mark.parametrize("backend", [pytest.param("gpu", marks=on_gpu)])
def test_the_gpu_refuses_an_index_faiss_cannot_put_there(backend):
    with pytest.raises(ValueError, match="cannot put this index on the GPU"):
        retriever(backend, "HNSW32", "efSearch=128").check()


def test_a_cpu_service_retrieves_on_the_cpu():
    assert isinstance(make_retriever("Flat", "", 0, torch.device("cpu")), CpuRetriever)


@pytest.mark.parametrize("backend", [pytest.param("gpu", marks=on_gpu)])
def test_a_cuda_service_retrieves_on_the_gpu_where_faiss_sees_one(backend):
    chosen = make_retriever("Flat", "", 0, DEVICES[backend])
    assert isinstance(chosen, GpuRetriever) and chosen.device_id == 0
