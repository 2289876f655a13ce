"""The service's work behind the routes: adapt, recommend, scenario bookkeeping, and the
meta-learner lifecycle (hot reload, re-adaptation across replicas)."""

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

from model.artifact import PUBLISHED_EVENT
from model.ranking import kernel_available
from service.adaptation import (
    AdaptationInputError,
    Registration,
    adapt_registration,
    adapt_registrations,
    registration,
)
from service.batching import RecommendBatcher
from service.learners import LoadedVersion, MetaLearners
from service.metrics import ServiceMetrics
from service.recommenders import (
    AdaptedRecommender,
    RankRequest,
    RecommenderCache,
    RevisionWatch,
)
from service.settings import Settings
from service.store import (
    SCENARIO_EVENT,
    SUBSCRIBED_EVENT,
    ScenarioState,
    ScenarioStore,
    StoredScenario,
    StoreError,
)

logger = logging.getLogger(__name__)

LIST_PAGE = 500
EVENTS_RETRY_S = 5.0  # the most a lost event subscription waits before subscribing again


Adapted = ScenarioState | AdaptationInputError  # one scenario's outcome


class ScenarioNotFoundError(LookupError):
    pass


class NoMetaLearnerError(RuntimeError):
    pass


class QueueFullError(RuntimeError):
    pass


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
        self._loading: dict[tuple[str, int], asyncio.Task[AdaptedRecommender]] = {}
        # With the compiled ranking kernel, which releases the GIL for a whole batch, every
        # batch is scored on the batcher's thread, beside the loop (A/B runs with
        # benchmarks/serving_load.py's generator); without it, small batches on the loop.
        on_cpu_with_kernel = learners.device.type == "cpu" and kernel_available()
        self.batcher = RecommendBatcher(
            settings.recommend_batch_max,
            settings.recommend_batches,
            0 if on_cpu_with_kernel else settings.recommend_inline_pairs,
            metrics.recommend_batch_size.observe,
        )
        # Adaptations get their own bounded pool; recommends are ranked on the loop or the
        # batcher's thread, so they never wait behind an adaptation.
        self._adapt_pool = ThreadPoolExecutor(settings.adapt_workers, thread_name_prefix="adapt")
        self._in_flight = 0
        self._wake = asyncio.Event()
        self._sweep_lock = asyncio.Lock()
        self._failed_readapts: set[tuple[str, str]] = set()
        self._tasks: list[asyncio.Task[None]] = []

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

        (state,) = await self._run_adaptations(run, trigger="request")
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

    async def _run_adaptations(
        self, work: Callable[[], list[Adapted]], trigger: str
    ) -> list[Adapted]:
        """Run one adaptation or one batch of them in the adaptation pool (a batch holds one
        worker, so it counts once in flight)."""
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
        """The scenario's recommender fetched from the store and built, once for all the
        requests that miss the cache on one revision at the same time: each of them did both
        before, and after an adaptation under load every request for the scenario in flight
        then fetched and built it again."""
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
        return AdaptedRecommender(
            scenario_id,
            stored,
            loaded,
            self.settings.faiss_index,
            self.settings.faiss_search,
            self.settings.faiss_min_pool,
        )

    # ---- bookkeeping ---------------------------------------------------------------------

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

    # ---- meta-learner lifecycle ----------------------------------------------------------

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._watch_registry(), name="watch-registry"),
            asyncio.create_task(self._listen_for_events(), name="listen-events"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._adapt_pool.shutdown(wait=True, cancel_futures=True)
        self.batcher.close()

    async def refresh(self) -> str | None:
        """Load the registry's current meta learner if it is new, and tell the other
        replicas. Returns the version switched to, if any."""
        switched = await asyncio.to_thread(self.learners.refresh)
        current = self.learners.current
        if current is not None:
            self.metrics.set_current_version(current.version)
        if switched is not None:
            try:
                await self.store.publish({"type": PUBLISHED_EVENT, "version": switched})
            except StoreError as error:
                logger.warning("could not notify other replicas of %s: %s", switched, error)
        return switched

    async def _watch_registry(self) -> None:
        """Each round: refresh, then re-adapt what still runs on an older meta learner.
        Polling is the fallback; a published event from any replica wakes it early."""
        while True:
            try:
                await self.refresh()
                current = self.learners.current
                if current is not None:
                    await self.readapt_stale(current)
            except StoreError as error:
                logger.warning("re-adaptation paused, store unavailable: %s", error)
            except Exception:
                # A background loop must outlive one bad round; the traceback is logged.
                logger.exception("meta-learner refresh failed")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.reload_poll_s)

    async def _listen_for_events(self) -> None:
        while True:
            try:
                async for event in self.store.events():
                    kind = event.get("type")
                    if kind == SUBSCRIBED_EVENT:
                        self.revisions.went_live()
                        self.metrics.store_events_live.set(1)
                    elif kind == SCENARIO_EVENT:
                        self.revisions.announced(str(event["scenario"]))
                    elif kind == PUBLISHED_EVENT:
                        self._wake.set()
            except StoreError as error:
                logger.warning(
                    "event subscription lost: polling the registry and reading every "
                    "scenario's revision from the store until it is back: %s",
                    error,
                )
            finally:
                self.revisions.lost()
                self.metrics.store_events_live.set(0)
            await asyncio.sleep(min(self.settings.reload_poll_s, EVENTS_RETRY_S))

    async def _all_meta(self) -> AsyncIterator[dict[str, object]]:
        after = None
        while True:
            page = await self.store.list_meta(after, LIST_PAGE)
            for meta in page:
                yield meta
            if len(page) < LIST_PAGE:
                return
            after = str(page[-1]["scenario"])

    async def readapt_stale(self, current: LoadedVersion) -> None:
        """Re-adapt, from its stored interactions, every scenario adapted by an older meta
        learner, up to S2META_READAPT_BATCH of them in one batch on the device: each once
        across all replicas (a store lock per scenario and version), the new revision written
        only if the scenario did not change meanwhile. Until then each scenario keeps serving
        its revision (its meta learner stays loaded)."""
        async with self._sweep_lock:
            stale = [
                str(meta["scenario"])
                async for meta in self._all_meta()
                if meta["meta_learner"] != current.version
            ]
            self.metrics.readapt_backlog.set(len(stale))
            todo = [s for s in stale if (s, current.version) not in self._failed_readapts]
            size = self.settings.readapt_batch
            for start in range(0, len(todo), size):
                await self._readapt(todo[start : start + size], current)
            referenced = set()
            backlog = 0
            async for meta in self._all_meta():
                referenced.add(str(meta["meta_learner"]))
                backlog += meta["meta_learner"] != current.version
            self.metrics.readapt_backlog.set(backlog)
            dropped = self.learners.retain(referenced | self.cache.versions())
            if dropped:
                logger.info("unloaded meta learners no scenario uses: %s", dropped)

    async def _readapt(self, scenario_ids: list[str], current: LoadedVersion) -> None:
        """Re-adapt these scenarios together, those no other replica has taken."""
        locks: dict[str, str] = {}
        try:
            for scenario_id in scenario_ids:
                lock = f"readapt:{scenario_id}:{current.version}"
                token = await self.store.acquire_lock(lock, self.settings.readapt_lock_s)
                if token is not None:  # else another replica is on it
                    locks[scenario_id] = token
            work: list[tuple[str, StoredScenario]] = []
            for scenario_id in locks:
                stored = await self.store.get(scenario_id)
                if stored is not None and stored.state.meta["meta_learner"] != current.version:
                    work.append((scenario_id, stored))
            if work:
                await self._readapt_batch(work, current)
        finally:
            for scenario_id, token in locks.items():
                await self.store.release_lock(f"readapt:{scenario_id}:{current.version}", token)

    async def _readapt_batch(
        self, work: list[tuple[str, StoredScenario]], current: LoadedVersion
    ) -> None:
        registrations = []
        for scenario_id, stored in work:
            meta = stored.state.meta
            variant = str(meta["variant"])
            registered = Registration(
                interactions=stored.state.interactions,
                candidates=stored.state.candidates,
                variant=variant if variant in current.artifact.learners else None,
                seed=int(meta["seed"]),  # type: ignore[call-overload]
            )
            registrations.append((scenario_id, registered))

        def run() -> list[Adapted]:
            return adapt_registrations(current, registrations, self.settings.min_interactions)

        outcomes = await self._run_adaptations(run, trigger="reload")
        for (scenario_id, stored), outcome in zip(work, outcomes, strict=True):
            if isinstance(outcome, AdaptationInputError):
                self._failed_readapts.add((scenario_id, current.version))
                logger.warning(
                    "scenario %s stays on %s: cannot re-adapt with %s: %s",
                    scenario_id,
                    stored.state.meta["meta_learner"],
                    current.version,
                    outcome,
                )
                continue
            revision = await self.store.put(scenario_id, outcome, expected_revision=stored.revision)
            self.revisions.announced(scenario_id)
            if revision is None:
                logger.info(
                    "scenario %s changed during its re-adaptation; kept the newer", scenario_id
                )
            else:
                self.metrics.readaptations.inc()
                logger.info(
                    "scenario %s re-adapted with %s: revision %d",
                    scenario_id,
                    current.version,
                    revision,
                )
