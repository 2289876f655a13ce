"""Adapted recommenders built from stored scenario records, and top-n from them.

Interaction and hybrid variants score the whole pool in batched forwards on the device. The
mapping variant indexes the adapted item-tower vectors of the pool (`service.retrieval`) and
queries with the user-tower vector.
"""

import itertools
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from safetensors.torch import load
from torch import Tensor

from model.learner import layout_of
from model.params import Params
from model.ranking import PoolQuery, RankedPool
from model.recommender import RecommenderSpec, item_vector, pool_first_layer, user_vector
from service.folding import USERS_KEY, stored_item_vectors
from service.learners import LoadedVersion
from service.retrieval import Index, Retriever
from service.store import StoredScenario


@dataclass(frozen=True)
class RankRequest:
    user: str
    n: int
    exclude_seen: bool
    exclude: frozenset[str] = frozenset()  # item ids left out (out of stock, say)


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
        retriever: Retriever,
    ) -> None:
        meta = stored.state.meta
        self.scenario_id = scenario_id
        self.revision = stored.revision
        self.meta_learner = str(meta["meta_learner"])
        self.loaded = loaded
        config = loaded.learner(str(meta["variant"])).config
        self.spec: RecommenderSpec = config.recommender
        tensors = load(stored.state.params)
        device = loaded.tables.item.device
        self.params: Params = layout_of(config).unflatten(tensors["theta"].to(device))

        # The known candidates by row, then the folded ones (service.folding): the order
        # adaptation used. A record from before fold-in has none folded.
        folded = cast(dict[str, list[str]], meta.get("folded_in") or {"users": [], "items": []})
        folded_items = folded["items"]
        skip = set(folded_items)
        item_rows = loaded.item_rows
        rows = sorted(
            item_rows[i] for i in stored.state.candidates if i in item_rows and i not in skip
        )
        self.pool_ids = [loaded.artifact.item_ids[row] for row in rows] + folded_items
        user_vectors = tensors.get(USERS_KEY, torch.zeros(0)).to(device)  # [F, D]
        self.folded_users = dict(zip(folded["users"], user_vectors, strict=True))
        self.position = position = {item: k for k, item in enumerate(self.pool_ids)}
        counts = np.zeros(len(self.pool_ids), dtype=np.float32)
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

        # Held per scenario: the pool's rows in the shared embedding table rather than a copy
        # (docs/performance.md), or with folded items a pool matrix of their own, so the
        # ranking kernel sees an ordinary table; the mapping variant's index of item-tower
        # vectors, or the other variants' pool half of the MLP's first layer.
        item_table = loaded.tables.item
        pool_rows = torch.as_tensor(rows, dtype=torch.long, device=device)
        if folded_items:
            folded_vectors = stored_item_vectors(tensors, len(folded_items), item_table.shape[1])
            item_table = torch.cat([item_table[pool_rows], folded_vectors.to(device)])
            pool_rows = torch.arange(len(self.pool_ids), device=device)
        self.index: Index | None = None
        self.pool: RankedPool | None = None
        with torch.no_grad():
            pool = item_table[pool_rows]
            if self.spec.variant == "mapping":
                vectors = item_vector(self.spec, self.params, pool).float().cpu().numpy()
                self.index = retriever.build(vectors)
            else:
                # pool_first_layer: a third of the work of ranking one user, the same for all.
                self.pool = RankedPool(
                    self.spec,
                    self.params,
                    pool_first_layer(self.params, pool),
                    item_table,
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
            if not has_embedding(request.user) and request.user not in self.folded_users
        }
        embedded = [k for k in range(len(requests)) if k not in ranked]
        if not embedded:
            return RankPlan(self, requests, ranked, [], [], None, 0, None)
        excluded = [self._excluded(requests[k]) for k in embedded]
        wanted = min(
            max(requests[k].n + len(skip) for k, skip in zip(embedded, excluded, strict=True)),
            len(self.pool_ids),
        )
        users = self._user_vectors([requests[k].user for k in embedded])
        query = None if self.pool is None else PoolQuery(self.pool, users, wanted)
        return RankPlan(self, requests, ranked, embedded, excluded, users, wanted, query)

    def _user_vectors(self, users: list[str]) -> Tensor:
        """[U, D]: from the table, or the scenario's folded vector (a user the table lacks)."""
        table = self.loaded.tables.user
        if not any(user in self.folded_users for user in users):
            rows = [self.loaded.user_rows[user] for user in users]
            return table.index_select(0, torch.as_tensor(rows, device=table.device))
        return torch.stack(
            [
                self.folded_users[user]
                if user in self.folded_users
                else table[self.loaded.user_rows[user]]
                for user in users
            ]
        )

    def search(self, users: Tensor, wanted: int) -> tuple[Any, Any]:
        """The mapping variant's top `wanted` (scores, positions) for users [U, D]: a FAISS
        search of the pool's item-tower vectors with their user-tower vectors."""
        with torch.no_grad():
            queries = user_vector(self.spec, self.params, users).float().cpu().numpy()
        return self.index.search(queries, wanted)

    def _excluded(self, request: RankRequest) -> set[int]:
        excluded = set(self.seen.get(request.user, ())) if request.exclude_seen else set()
        position = self.position
        excluded.update(position[item] for item in request.exclude if item in position)
        return excluded

    def _popular(self, request: RankRequest) -> Ranked:
        excluded = self._excluded(request)
        # Lazily: on a large pool only the first n items that are not excluded are read.
        order = itertools.islice(
            (k for k in map(int, self.popular_order) if k not in excluded), request.n
        )
        return Ranked("popular", [(self.pool_ids[k], float(self.popular_counts[k])) for k in order])
