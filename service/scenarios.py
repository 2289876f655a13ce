"""The request path behind the routes: recommend, the scenario reads and readiness; the writes
are `service.writes`, the meta learner's lifecycle (hot reload, re-adaptation)
`service.lifecycle`."""

import asyncio
import time

from prometheus_client import Histogram

from model.ranking import kernel_available
from service.batching import RecommendBatcher
from service.caches import RecommenderCache, RevisionWatch
from service.errors import ScenarioNotFoundError, StoreError
from service.learners import MetaLearners
from service.metrics import ServiceMetrics
from service.recommenders import AdaptedRecommender, RankRequest
from service.retrieval import make_retriever
from service.settings import Settings
from service.store import ScenarioStore, StoredScenario
from service.writes import ScenarioWrites, current_learner


class ScenarioService:
    def __init__(
        self,
        settings: Settings,
        store: ScenarioStore,
        learners: MetaLearners,
        metrics: ServiceMetrics,
    ) -> None:
        self.settings = settings
        self.store = store
        self.learners = learners
        self.metrics = metrics
        self.cache = RecommenderCache(settings.cache_scenarios)
        self.revisions = RevisionWatch()
        self.retriever = make_retriever(
            settings.faiss_index, settings.faiss_search, settings.faiss_min_pool, learners.device
        )
        self._loading: dict[tuple[str, int], asyncio.Task[AdaptedRecommender]] = {}
        self._recommend_seconds: dict[str, Histogram] = {}
        # The compiled ranking kernel releases the GIL for a whole batch, so every batch goes
        # to the batcher's thread; without it small batches are cheaper on the loop
        # (docs/performance.md).
        on_cpu_with_kernel = learners.device.type == "cpu" and kernel_available()
        self.batcher = RecommendBatcher(
            settings.recommend_batch_max,
            settings.recommend_batches,
            0 if on_cpu_with_kernel else settings.recommend_inline_pairs,
            metrics.recommend_batch_size.observe,
        )
        self.writes = ScenarioWrites(settings, store, learners, metrics, self.revisions, self.cache)

    def close(self) -> None:
        """Stop the adaptation workers and the ranking threads."""
        self.writes.close()
        self.batcher.close()

    # ---- recommend -----------------------------------------------------------------------

    async def recommend(
        self, scenario_id: str, user: str, n: int, exclude_seen: bool, exclude: list[str]
    ) -> dict[str, object]:
        start = time.perf_counter()
        recommender = await self._recommender(scenario_id)
        request = RankRequest(user, n, exclude_seen, frozenset(exclude))
        ranked = await self.batcher.rank(recommender, request)
        self._observe(recommender.meta_learner, start)
        if ranked.source == "popular":
            self.metrics.popular_fallbacks.inc()
        return {
            "user": user,
            "scenario": scenario_id,
            "revision": recommender.revision,
            "meta_learner": recommender.meta_learner,
            "source": ranked.source,
            "items": [{"item": item, "score": score} for item, score in ranked.items],
        }

    async def recommend_many(
        self, scenario_id: str, users: list[str], n: int, exclude_seen: bool, exclude: list[str]
    ) -> dict[str, object]:
        """Many users of one scenario ranked in one pass, from one revision."""
        start = time.perf_counter()
        recommender = await self._recommender(scenario_id)
        skip = frozenset(exclude)
        requests = [RankRequest(user, n, exclude_seen, skip) for user in users]
        answers = await self.batcher.rank_many(recommender, requests)
        self._observe(recommender.meta_learner, start)
        popular = sum(ranked.source == "popular" for ranked in answers)
        if popular:
            self.metrics.popular_fallbacks.inc(popular)
        return {
            "scenario": scenario_id,
            "revision": recommender.revision,
            "meta_learner": recommender.meta_learner,
            "results": [
                {
                    "user": user,
                    "source": ranked.source,
                    "items": [{"item": item, "score": score} for item, score in ranked.items],
                }
                for user, ranked in zip(users, answers, strict=True)
            ],
        }

    def _observe(self, meta_learner: str, start: float) -> None:
        histogram = self._recommend_seconds.get(meta_learner)
        if histogram is None:  # labels() costs more than the observation
            histogram = self.metrics.recommend_seconds.labels(meta_learner)
            self._recommend_seconds[meta_learner] = histogram
        histogram.observe(time.perf_counter() - start)

    async def _recommender(self, scenario_id: str) -> AdaptedRecommender:
        # While the store's announcements are heard, a revision read before is current
        # until announced otherwise: no round trip to the store.
        known = self.revisions.current(scenario_id)
        if known is not None:
            cached = self.cache.get(scenario_id, known)
            if cached is not None:
                self.metrics.cache_hits.inc()
                return cached
        ticket = self.revisions.before_read(scenario_id)
        self.metrics.revision_reads.inc()
        try:
            revision = await self.store.revision(scenario_id)
        except StoreError:
            # The store is down: a scenario this replica holds keeps being served (the last
            # revision it read); any other gets the 503.
            held = self.cache.latest(scenario_id)
            if held is None:
                raise
            self.metrics.store_fallbacks.inc()
            return held
        if revision is None:
            raise ScenarioNotFoundError(scenario_id)
        self.revisions.read(scenario_id, ticket, revision)
        cached = self.cache.get(scenario_id, revision)
        if cached is not None:
            self.metrics.cache_hits.inc()
            return cached
        self.metrics.cache_misses.inc()
        return await self._load(scenario_id, revision)

    async def _load(self, scenario_id: str, revision: int) -> AdaptedRecommender:
        """The scenario's recommender fetched from the store and built once for all the
        requests that miss the cache on one revision at the same time (docs/performance.md)."""
        key = (scenario_id, revision)
        loading = self._loading.get(key)
        if loading is None:
            loading = asyncio.create_task(self._fetch_and_build(scenario_id))
            self._loading[key] = loading
            loading.add_done_callback(lambda _: self._loading.pop(key, None))
        # Shielded: a request that goes away does not cancel the load the others wait for.
        # An error reaches every request waiting; the next miss loads again.
        return await asyncio.shield(loading)

    async def _fetch_and_build(self, scenario_id: str) -> AdaptedRecommender:
        stored = await self.store.get(scenario_id)
        if stored is None:  # deleted between the two reads
            raise ScenarioNotFoundError(scenario_id)
        recommender = await asyncio.to_thread(self._build, scenario_id, stored)
        self.cache.put(recommender)
        return recommender

    def _build(self, scenario_id: str, stored: StoredScenario) -> AdaptedRecommender:
        loaded = self.learners.get(str(stored.state.meta["meta_learner"]))
        return AdaptedRecommender(scenario_id, stored, loaded, self.retriever)

    # ---- the scenario reads --------------------------------------------------------------

    def _with_status(self, meta: dict[str, object]) -> dict[str, object]:
        current = self.learners.current
        stale = (
            current is not None
            and meta["meta_learner"] != current.version
            and not meta.get("pinned")
        )
        return {**meta, "status": "readapting" if stale else "ready"}

    async def describe(self, scenario_id: str) -> dict[str, object]:
        meta = await self.store.get_meta(scenario_id)
        if meta is None:
            raise ScenarioNotFoundError(scenario_id)
        return self._with_status(meta)

    async def list_scenarios(self, after: str | None, limit: int) -> list[dict[str, object]]:
        return [self._with_status(meta) for meta in await self.store.list_meta(after, limit)]

    async def readiness(self) -> tuple[str, list[str]]:
        """The loaded meta learner's version and what is degraded (empty: nothing); a store
        every replica shares being down does not make a replica unready (docs/operations.md).
        NoMetaLearnerError when none is loaded."""
        loaded = current_learner(self.learners)
        causes = []
        try:
            await self.store.ping()
        except StoreError as error:
            causes.append(f"scenario store unavailable: {error}")
        self.metrics.store_reachable.set(0 if causes else 1)
        return loaded.version, causes
