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
from model.ranking import PoolQuery, RankedPool
from model.recommender import RecommenderSpec, item_vector, pool_first_layer, user_vector
from service.learners import LoadedVersion
from service.store import StoredScenario

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankRequest:
    user: str
    n: int
    exclude_seen: bool


@dataclass(frozen=True)
class Ranked:
    source: str  # "adapted" | "popular"
    items: list[tuple[str, float]]


@dataclass
class RankPlan:
    """One recommender's requests of a batch, ready to score: the popular answers (users
    without an embedding) made, the others' embeddings gathered. Scored in two ways: `pool`,
    a query that the batch ranks together with the other plans' (`model.ranking`), or
    `score_alone` (a FAISS search for the mapping variant); then `finish` makes the answers."""

    recommender: "AdaptedRecommender"
    requests: list[RankRequest]
    ranked: dict[int, Ranked]  # by position in requests
    embedded: list[int]  # positions of the users with an embedding
    excluded: list[set[int]]  # per embedded user, pool positions left out
    users: Tensor | None  # [len(embedded), D]
    wanted: int  # how many to take from the top before exclusions
    pool: PoolQuery | None  # interaction and hybrid variants, with embedded users

    def score_alone(self) -> tuple[Any, Any] | None:
        """(scores, positions) [U, wanted] where `pool` is None and a user is embedded."""
        if self.users is None:
            return None
        return self.recommender.search(self.users, self.wanted)

    def finish(self, scored: tuple[Any, Any] | None) -> list[Ranked]:
        """The answers, in the requests' order, from the scores and positions (tensors or
        arrays) of the embedded users."""
        if scored is not None:
            scores, positions = scored[0].tolist(), scored[1].tolist()
            pool_ids = self.recommender.pool_ids
            for j, k in enumerate(self.embedded):
                items = [
                    (pool_ids[p], s)
                    for p, s in zip(positions[j], scores[j], strict=True)
                    if p >= 0 and p not in self.excluded[j]
                ]
                self.ranked[k] = Ranked("adapted", items[: self.requests[k].n])
        return [self.ranked[k] for k in range(len(self.requests))]


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
        pool_rows = torch.as_tensor(rows, dtype=torch.long, device=device)
        self.index: Any = None
        self.pool: RankedPool | None = None
        with torch.no_grad():
            pool = loaded.tables.item[pool_rows]
            if self.spec.variant == "mapping":
                vectors = item_vector(self.spec, self.params, pool).float().cpu().numpy()
                self.index = build_index(vectors, faiss_index, faiss_search, faiss_min_pool, device)
            else:
                # pool_first_layer: a third of the work of ranking one user, the same for all.
                self.pool = RankedPool(
                    self.spec,
                    self.params,
                    pool_first_layer(self.params, pool),
                    loaded.tables.item,
                    pool_rows,
                    torch.log1p(torch.as_tensor(counts, device=device)),
                )

    def plan(self, requests: list[RankRequest]) -> RankPlan:
        """The users without an embedding answered by the scenario's popularity; the others
        to be ranked together (one forward over the pool, or one FAISS search)."""
        has_embedding = self.loaded.has_embedding
        ranked = {
            k: self._popular(request)
            for k, request in enumerate(requests)
            if not has_embedding(request.user)
        }
        embedded = [k for k in range(len(requests)) if k not in ranked]
        if not embedded:
            return RankPlan(self, requests, ranked, [], [], None, 0, None)
        excluded = [self._excluded(requests[k]) for k in embedded]
        wanted = min(
            max(requests[k].n + len(skip) for k, skip in zip(embedded, excluded, strict=True)),
            len(self.pool_ids),
        )
        rows = [self.loaded.user_rows[requests[k].user] for k in embedded]
        table = self.loaded.tables.user
        users = table.index_select(0, torch.as_tensor(rows, device=table.device))
        query = None if self.pool is None else PoolQuery(self.pool, users, wanted)
        return RankPlan(self, requests, ranked, embedded, excluded, users, wanted, query)

    def search(self, users: Tensor, wanted: int) -> tuple[Any, Any]:
        """The mapping variant's top `wanted` (scores, positions) for users [U, D]: a FAISS
        search of the pool's item-tower vectors with their user-tower vectors."""
        with torch.no_grad():
            queries = user_vector(self.spec, self.params, users).float().cpu().numpy()
        return self.index.search(queries, wanted)

    def _excluded(self, request: RankRequest) -> set[int]:
        return set(self.seen.get(request.user, ())) if request.exclude_seen else set()

    def _popular(self, request: RankRequest) -> Ranked:
        excluded = self._excluded(request)
        # Lazily: on a large pool only the first n items that are not excluded are read.
        order = itertools.islice(
            (k for k in map(int, self.popular_order) if k not in excluded), request.n
        )
        return Ranked("popular", [(self.pool_ids[k], float(self.popular_counts[k])) for k in order])


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
