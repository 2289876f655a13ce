"""Adapted recommenders built from stored scenario records, and top-n from them.

Interaction and hybrid variants score the whole pool in batched forwards on the device. The
mapping variant indexes the adapted item-tower vectors of the pool in FAISS (exact inner
product by default; an index factory string for approximate indexes on large pools; a GPU
index when faiss sees a GPU and the service runs on CUDA) and queries with the user-tower
vector.
"""

import itertools
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors.torch import load
from torch import Tensor

from model.learner import layout_of
from model.params import Params
from model.recommender import (
    RecommenderSpec,
    item_vector,
    pool_first_layer,
    score_pool,
    user_vector,
)
from service.learners import LoadedVersion
from service.store import StoredScenario

logger = logging.getLogger(__name__)

SCORE_CHUNK = 65_536  # (user, item) pairs per forward (bounds memory on large pools)


@dataclass(frozen=True)
class RankRequest:
    user: str
    n: int
    exclude_seen: bool


@dataclass(frozen=True)
class Ranked:
    source: str  # "adapted" | "popular"
    items: list[tuple[str, float]]


class AdaptedRecommender:
    """One scenario revision, ready to rank its pool for a user."""

    def __init__(
        self,
        scenario_id: str,
        stored: StoredScenario,
        loaded: LoadedVersion,
        faiss_index: str,
        faiss_search: str,
        faiss_min_pool: int,
    ) -> None:
        meta = stored.state.meta
        self.scenario_id = scenario_id
        self.revision = stored.revision
        self.meta_learner = str(meta["meta_learner"])
        self.loaded = loaded
        config = loaded.learner(str(meta["variant"])).config
        self.spec: RecommenderSpec = config.recommender
        theta = load(stored.state.params)["theta"].to(loaded.tables.user.device)
        self.params: Params = layout_of(config).unflatten(theta)

        item_rows = loaded.item_rows
        rows = sorted(item_rows[i] for i in stored.state.candidates if i in item_rows)
        self.pool_ids = [loaded.artifact.item_ids[row] for row in rows]
        position = {item: k for k, item in enumerate(self.pool_ids)}
        counts = np.zeros(len(rows), dtype=np.float32)
        for item, count in stored.state.popularity:
            if item in position:
                counts[position[item]] = count
        # Most popular first, ties in pool order: the fallback for users without an embedding.
        self.popular_order = np.argsort(-counts, kind="stable").astype(np.int32)
        self.popular_counts = counts
        self.seen: dict[str, list[int]] = {}
        for user, item in stored.state.interactions:
            if item in position:
                self.seen.setdefault(user, []).append(position[item])

        # Held per scenario (benchmarks/memory.py): the pool's rows in the shared embedding
        # table rather than a copy of its embeddings (gathered per batch, a small copy beside
        # the forward over the pool); the mapping variant's index of item-tower vectors, or
        # the other variants' pool half of the MLP's first layer.
        device = loaded.tables.item.device
        self.pool_rows = torch.as_tensor(rows, dtype=torch.long, device=device)
        self.pool_pop = torch.log1p(torch.as_tensor(counts, device=device))
        self.index: Any = None
        self.pool_half: Tensor | None = None
        with torch.no_grad():
            pool = loaded.tables.item[self.pool_rows]
            if self.spec.variant == "mapping":
                vectors = item_vector(self.spec, self.params, pool).float().cpu().numpy()
                self.index = build_index(vectors, faiss_index, faiss_search, faiss_min_pool, device)
            else:
                # A third of the work of ranking one user, and the same for every user.
                self.pool_half = pool_first_layer(self.params, pool)

    def recommend(self, requests: list[RankRequest]) -> list[Ranked]:
        """Top-n for each request: the users with an embedding ranked together (one forward
        over the pool, or one FAISS search, for all of them), the others by the scenario's
        popularity."""
        has_embedding = self.loaded.has_embedding
        ranked = {
            k: self._popular(request)
            for k, request in enumerate(requests)
            if not has_embedding(request.user)
        }
        embedded = [k for k in range(len(requests)) if k not in ranked]
        if not embedded:
            return list(ranked.values())
        excluded = [self._excluded(requests[k]) for k in embedded]
        wanted = min(
            max(requests[k].n + len(skip) for k, skip in zip(embedded, excluded, strict=True)),
            len(self.pool_ids),
        )
        rows = [self.loaded.user_rows[requests[k].user] for k in embedded]
        users = self.loaded.tables.user.index_select(
            0, torch.as_tensor(rows, device=self.pool_pop.device)
        )
        with torch.no_grad():
            if self.index is not None:
                queries = user_vector(self.spec, self.params, users).float().cpu().numpy()
                scores, positions = self.index.search(queries, wanted)
                scores, positions = scores.tolist(), positions.tolist()
            else:
                top = torch.topk(self._score_pool(users), wanted, dim=1)
                scores, positions = top.values.tolist(), top.indices.tolist()
        for j, k in enumerate(embedded):
            items = [
                (self.pool_ids[p], s)
                for p, s in zip(positions[j], scores[j], strict=True)
                if p >= 0 and p not in excluded[j]
            ]
            ranked[k] = Ranked("adapted", items[: requests[k].n])
        return [ranked[k] for k in range(len(requests))]

    def _excluded(self, request: RankRequest) -> set[int]:
        return set(self.seen.get(request.user, ())) if request.exclude_seen else set()

    def _popular(self, request: RankRequest) -> Ranked:
        excluded = self._excluded(request)
        # Lazily: on a large pool only the first n items that are not excluded are read.
        order = itertools.islice(
            (k for k in map(int, self.popular_order) if k not in excluded), request.n
        )
        return Ranked("popular", [(self.pool_ids[k], float(self.popular_counts[k])) for k in order])

    def _score_pool(self, users: Tensor) -> Tensor:
        """Scores [U, P], the pool in chunks so a forward holds about SCORE_CHUNK pairs."""
        assert self.pool_half is not None  # interaction and hybrid variants
        # index_select, not indexing with a tensor: several times faster on a pool of hundreds,
        # and ranking a pool for a user or two is the service's hot path.
        pool = self.loaded.tables.item.index_select(0, self.pool_rows)
        chunk = max(1, SCORE_CHUNK // users.shape[0])
        if pool.shape[0] <= chunk:
            return score_pool(self.spec, self.params, users, pool, self.pool_pop, self.pool_half)
        parts = zip(
            torch.split(pool, chunk),
            torch.split(self.pool_pop, chunk),
            torch.split(self.pool_half, chunk),
            strict=True,
        )
        return torch.cat(
            [score_pool(self.spec, self.params, users, *part) for part in parts], dim=1
        )


_gpu_resources: Any = None


def _faiss() -> Any:  # the faiss module (no type stubs)
    try:
        import faiss
    except ImportError as error:
        raise RuntimeError(
            "the mapping variant needs faiss: install s2meta[cpu] or s2meta[gpu]"
        ) from error
    return faiss


def check_index_settings(factory: str, search: str, device: torch.device) -> None:
    """Raise ValueError unless faiss can build `factory`, take the `search` parameters and,
    where the service would put indexes on the GPU, move it there (checked once at start)."""
    faiss = _faiss()
    try:
        index = faiss.index_factory(8, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        raise ValueError(
            f"S2META_FAISS_INDEX={factory!r}: not a faiss index factory string"
        ) from error
    if _on_gpu(device):
        try:
            index = faiss.index_cpu_to_gpu(_gpu(), device.index or 0, index)
        except RuntimeError as error:
            raise ValueError(
                f"S2META_FAISS_INDEX={factory!r}: faiss cannot put this index on the GPU"
            ) from error
    try:
        _set_search_parameters(index, search, device)
    except RuntimeError as error:
        raise ValueError(
            f"S2META_FAISS_SEARCH={search!r}: not search parameters of {factory!r} ({error})"
        ) from error


def build_index(
    vectors: np.ndarray, factory: str, search: str, min_pool: int, device: torch.device
) -> Any:
    """An inner-product FAISS index over vectors [P, D]: `factory` with the `search`
    parameters (a faiss ParameterSpace string such as "nprobe=64") for pools of at least
    `min_pool` items, exact "Flat" below that or where the pool is too small to train the
    factory's index; on the GPU when faiss has one and the service runs on CUDA."""
    faiss = _faiss()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if len(vectors) < min_pool:
        factory, search = "Flat", ""
    index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    if _on_gpu(device):
        index = faiss.index_cpu_to_gpu(_gpu(), device.index or 0, index)
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
            return build_index(vectors, "Flat", "", 0, device)
    _set_search_parameters(index, search, device)
    index.add(vectors)
    return index


def _on_gpu(device: torch.device) -> bool:
    return device.type == "cuda" and _faiss().get_num_gpus() > 0


def _gpu() -> Any:
    """The process's faiss GPU resources (scratch memory and streams), made once."""
    global _gpu_resources
    if _gpu_resources is None:
        _gpu_resources = _faiss().StandardGpuResources()
    return _gpu_resources


def _set_search_parameters(index: Any, search: str, device: torch.device) -> None:
    if search:
        faiss = _faiss()
        space = faiss.GpuParameterSpace() if _on_gpu(device) else faiss.ParameterSpace()
        space.set_index_parameters(index, search)


class RevisionWatch:
    """Which scenarios' current revisions this replica knows without asking the store.

    Only while the store's event subscription is live: a revision read after it went live
    stays current until the store announces a write or delete of that scenario (the store
    announces each in the same atomic step as the write). A read that an announcement
    overtook is not recorded. While the subscription is down nothing is known, and every
    request asks the store. Used from the event loop only.
    """

    def __init__(self) -> None:
        self._epoch = 0  # changes whenever the subscription goes live or is lost
        self._live = False
        self._announcements: dict[str, int] = {}  # per scenario, in this epoch
        self._known: dict[str, int] = {}

    def went_live(self) -> None:
        self._epoch += 1
        self._live = True
        self._announcements.clear()
        self._known.clear()

    def lost(self) -> None:
        self._epoch += 1
        self._live = False
        self._known.clear()

    def announced(self, scenario_id: str) -> None:
        self._announcements[scenario_id] = self._announcements.get(scenario_id, 0) + 1
        self._known.pop(scenario_id, None)

    def before_read(self, scenario_id: str) -> tuple[int, int]:
        """A ticket to pass to `read` with the revision then read from the store."""
        return self._epoch, self._announcements.get(scenario_id, 0)

    def read(self, scenario_id: str, ticket: tuple[int, int], revision: int) -> None:
        if self._live and ticket == self.before_read(scenario_id):
            self._known[scenario_id] = revision

    def current(self, scenario_id: str) -> int | None:
        return self._known.get(scenario_id) if self._live else None


class RecommenderCache:
    """Adapted recommenders by (scenario, revision), least recently used dropped first.
    A new revision is a new key, so a replica never serves a stale one once it has read the
    revision from the store."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[tuple[str, int], AdaptedRecommender] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, scenario_id: str, revision: int) -> AdaptedRecommender | None:
        with self._lock:
            entry = self._entries.get((scenario_id, revision))
            if entry is not None:
                self._entries.move_to_end((scenario_id, revision))
            return entry

    def put(self, recommender: AdaptedRecommender) -> None:
        with self._lock:
            held = [k for k in self._entries if k[0] == recommender.scenario_id]
            if any(revision > recommender.revision for _, revision in held):
                return  # built from a read that a newer revision has overtaken
            for key in held:
                del self._entries[key]
            self._entries[(recommender.scenario_id, recommender.revision)] = recommender
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def latest(self, scenario_id: str) -> AdaptedRecommender | None:
        """The newest revision held for a scenario, if any."""
        with self._lock:
            held = [entry for key, entry in self._entries.items() if key[0] == scenario_id]
        return max(held, key=lambda entry: entry.revision, default=None)

    def drop(self, scenario_id: str) -> None:
        with self._lock:
            for key in [k for k in self._entries if k[0] == scenario_id]:
                del self._entries[key]

    def versions(self) -> set[str]:
        with self._lock:
            return {entry.meta_learner for entry in self._entries.values()}
