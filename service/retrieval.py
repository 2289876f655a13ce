"""Retrieval for the mapping variant: an inner-product FAISS index over a pool's item-tower
vectors, queried with user-tower vectors.

One interface, two backends, as in implicit: `Retriever` builds indexes on the CPU
(`CpuRetriever`) or on a GPU (`GpuRetriever`), and `make_retriever` picks the backend: the
GPU where the service runs on CUDA and faiss sees a GPU, else the CPU. Every index is exact
("Flat") below `min_pool` items, else built from the `factory` string with the `search`
parameters (a faiss ParameterSpace string such as "nprobe=64"). faiss is imported on first
use, so a service without it serves every other variant.
"""

import functools
import logging
from abc import ABC, abstractmethod
from typing import Any, Literal, Protocol

import numpy as np
import torch

logger = logging.getLogger(__name__)

Backend = Literal["cpu", "gpu"]


class Index(Protocol):
    """A built faiss index (faiss has no type stubs)."""

    ntotal: int

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, positions) [Q, k] of the queries [Q, D]; position -1 past the pool."""
        ...


def _faiss() -> Any:  # the faiss module
    try:
        import faiss
    except ImportError as error:
        raise RuntimeError(
            "the mapping variant needs faiss: install s2meta[cpu] or s2meta[gpu]"
        ) from error
    return faiss


class Retriever(ABC):
    """Builds the indexes of one configuration on one backend."""

    def __init__(self, factory: str, search: str, min_pool: int) -> None:
        self.factory = factory
        self.search_parameters = search
        self.min_pool = min_pool

    @abstractmethod
    def _place(self, index: Any) -> Any:
        """The index on this backend (RuntimeError if faiss cannot put it there)."""

    @abstractmethod
    def _parameter_space(self) -> Any:
        """This backend's faiss ParameterSpace, which sets search parameters."""

    def build(self, vectors: np.ndarray) -> Index:
        """An index over vectors [P, D], exact "Flat" where the pool is below `min_pool` or
        too small to train the factory's index (logged)."""
        if len(vectors) < self.min_pool:
            return self._build(vectors, "Flat", "")
        return self._build(vectors, self.factory, self.search_parameters)

    def _build(self, vectors: np.ndarray, factory: str, search: str) -> Index:
        faiss = _faiss()
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        index = self._place(
            faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        )
        if not index.is_trained:
            try:
                index.train(vectors)
            except RuntimeError as error:
                logger.warning(
                    "index %r cannot be trained on a pool of %d (%s); using the exact Flat index",
                    factory,
                    len(vectors),
                    error,
                )
                return self._build(vectors, "Flat", "")
        self._set_search_parameters(index, search)
        index.add(vectors)
        return index

    def check(self) -> None:
        """Raise ValueError unless faiss can build the factory on this backend and take the
        search parameters (checked once at start)."""
        faiss = _faiss()
        try:
            index = faiss.index_factory(8, self.factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as error:
            raise ValueError(
                f"S2META_FAISS_INDEX={self.factory!r}: not a faiss index factory string"
            ) from error
        try:
            index = self._place(index)
        except RuntimeError as error:
            raise ValueError(
                f"S2META_FAISS_INDEX={self.factory!r}: faiss cannot put this index on the GPU"
            ) from error
        try:
            self._set_search_parameters(index, self.search_parameters)
        except RuntimeError as error:
            raise ValueError(
                f"S2META_FAISS_SEARCH={self.search_parameters!r}: not search parameters of "
                f"{self.factory!r} ({error})"
            ) from error

    def _set_search_parameters(self, index: Any, search: str) -> None:
        if search:
            self._parameter_space().set_index_parameters(index, search)


class CpuRetriever(Retriever):
    def _place(self, index: Any) -> Any:
        return index

    def _parameter_space(self) -> Any:
        return _faiss().ParameterSpace()


class GpuRetriever(Retriever):
    def __init__(self, factory: str, search: str, min_pool: int, device_id: int = 0) -> None:
        super().__init__(factory, search, min_pool)
        self.device_id = device_id

    def _place(self, index: Any) -> Any:
        return _faiss().index_cpu_to_gpu(_gpu_resources(), self.device_id, index)

    def _parameter_space(self) -> Any:
        return _faiss().GpuParameterSpace()


@functools.cache
def _gpu_resources() -> Any:
    """The process's faiss GPU resources (scratch memory and streams), made once."""
    return _faiss().StandardGpuResources()


def faiss_gpus() -> int:
    """How many GPUs faiss sees (0 without faiss, or with a CPU-only faiss)."""
    try:
        return int(_faiss().get_num_gpus())
    except RuntimeError:
        return 0


def make_retriever(
    factory: str,
    search: str,
    min_pool: int,
    device: torch.device,
    backend: Backend | None = None,
) -> Retriever:
    """The retriever for a service on `device`: `backend`, or by default the GPU where the
    device is CUDA and faiss sees a GPU, else the CPU."""
    if backend is None:
        backend = "gpu" if device.type == "cuda" and faiss_gpus() > 0 else "cpu"
    if backend == "gpu":
        return GpuRetriever(factory, search, min_pool, device.index or 0)
    return CpuRetriever(factory, search, min_pool)
