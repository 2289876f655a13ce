"""The request path behind the routes: adapt, recommend, and the scenario reads. The meta
learner's lifecycle (hot reload, re-adaptation) is `service.lifecycle`."""

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from model.ranking import kernel_available
from service.adaptation import adapt_registration, registration
from service.batching import RecommendBatcher
from service.caches import RecommenderCache, RevisionWatch
from service.errors import (
    AdaptationInputError,
    NoMetaLearnerError,
    QueueFullError,
    ScenarioNotFoundError,
    StoreError,
)
from service.learners import MetaLearners
from service.metrics import ServiceMetrics
from service.recommenders import AdaptedRecommender, RankRequest
from service.retrieval import make_retriever
from service.settings import Settings
from service.store import ScenarioState, ScenarioStore, StoredScenario

Adapted = ScenarioState | AdaptationInputError  # one scenario's outcome


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
        # Adaptations get their own bounded pool, so recommends never wait behind one.
        self._adapt_pool = ThreadPoolExecutor(settings.adapt_workers, thread_name_prefix="adapt")
        self._in_flight = 0

    def close(self) -> None:
        """Stop the adaptation workers and the ranking threads."""
        self._adapt_pool.shutdown(wait=True, cancel_futures=True)
        self.batcher.close()

    # ---- adapt and recommend -------------------------------------------------------------

    async def adapt(
        self,
        scenario_id: str,
        interactions: list[tuple[str, str]],
        candidates: list[str],
        variant: str | None,
        seed: int | None,
    ) -> dict[str, object]:
        loaded = self.learners.current
        if loaded is None:
            raise NoMetaLearnerError("no meta learner is loaded yet")
        self._check_limits(interactions, candidates)
        # Fail fast when the result could not be stored, before the costly learning.
        await self.store.ping()
        if self._in_flight >= self.settings.adapt_workers + self.settings.adapt_queue:
            self.metrics.adaptations_rejected.inc()
            raise QueueFullError(f"{self._in_flight} adaptations are running or queued")
        chosen_seed = self.settings.adapt_seed if seed is None else seed

        def run() -> list[Adapted]:
            return [
                adapt_registration(
                    loaded,
                    scenario_id,
                    registration(interactions, candidates, variant, chosen_seed),
                    self.settings.min_interactions,
                )
            ]

        (state,) = await self.run_adaptations(run, trigger="request")
        assert isinstance(state, ScenarioState)  # adapt_registration raises the errors
        revision = await self.store.put(scenario_id, state)
        # Our own write is known at once, without waiting for its announcement to come back.
        self.revisions.announced(scenario_id)
        if revision is None:  # an unconditional write always takes a revision
            raise StoreError(f"scenario {scenario_id!r}: the store took no revision")
        return {"scenario": scenario_id, "revision": revision, **state.meta}

    def _check_limits(self, interactions: list[tuple[str, str]], candidates: list[str]) -> None:
        if not interactions:
            raise AdaptationInputError("no interactions: a scenario needs a few to adapt on")
        if len(interactions) > self.settings.max_interactions:
            raise AdaptationInputError(
                f"{len(interactions)} interactions, at most {self.settings.max_interactions}"
            )
        if len(candidates) > self.settings.max_candidates:
            raise AdaptationInputError(
                f"{len(candidates)} candidates, at most {self.settings.max_candidates}"
            )

    async def run_adaptations(
        self, work: Callable[[], list[Adapted]], trigger: str
    ) -> list[Adapted]:
        """Run one adaptation or one batch of them (a re-adaptation's) in the adaptation pool;
        a batch holds one worker, so it counts once in flight."""
        self._in_flight += 1
        self.metrics.adaptations_in_flight.set(self._in_flight)
        try:
            start = time.perf_counter()
            outcomes = await asyncio.get_running_loop().run_in_executor(self._adapt_pool, work)
        finally:
            self._in_flight -= 1
            self.metrics.adaptations_in_flight.set(self._in_flight)
        self.metrics.adaptation_seconds.labels(trigger=trigger).observe(time.perf_counter() - start)
        for state in outcomes:
            if isinstance(state, ScenarioState):
                steps = float(state.meta["steps"])  # type: ignore[arg-type]
                self.metrics.adaptation_steps.observe(steps)
                self.metrics.stop_reasons.labels(reason=str(state.meta["stopped_by"])).inc()
        return outcomes

    async def recommend(
        self, scenario_id: str, user: str, n: int, exclude_seen: bool
    ) -> dict[str, object]:
        recommender = await self._recommender(scenario_id)
        ranked = await self.batcher.rank(recommender, RankRequest(user, n, exclude_seen))
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
        stale = current is not None and meta["meta_learner"] != current.version
        return {**meta, "status": "readapting" if stale else "ready"}

    async def describe(self, scenario_id: str) -> dict[str, object]:
        meta = await self.store.get_meta(scenario_id)
        if meta is None:
            raise ScenarioNotFoundError(scenario_id)
        return self._with_status(meta)

    async def list_scenarios(self, after: str | None, limit: int) -> list[dict[str, object]]:
        return [self._with_status(meta) for meta in await self.store.list_meta(after, limit)]

    async def delete(self, scenario_id: str) -> None:
        if not await self.store.delete(scenario_id):
            raise ScenarioNotFoundError(scenario_id)
        self.revisions.announced(scenario_id)
        self.cache.drop(scenario_id)

    async def readiness(self) -> str | None:
        """None when ready, else why not."""
        if self.learners.current is None:
            return "no meta learner loaded"
        try:
            await self.store.ping()
        except StoreError as error:
            return f"scenario store unavailable: {error}"
        return None
