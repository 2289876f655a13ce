"""The write path behind the routes: adapt, append interactions, delete, each conditional on
If-Match, and the adaptation pool that re-adaptations share (`service.lifecycle`)."""

import asyncio
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from model.artifact import VERSIONS
from service.adaptation import Registration, adapt_registration, registration
from service.caches import RecommenderCache, RevisionWatch
from service.compilation import StepCompiler
from service.errors import (
    AdaptationInputError,
    ConflictError,
    NoMetaLearnerError,
    QueueFullError,
    RevisionMismatchError,
    ScenarioNotFoundError,
)
from service.learners import LoadedVersion, MetaLearners
from service.metrics import ServiceMetrics
from service.preconditions import IfMatch
from service.settings import Settings
from service.store import ScenarioState, ScenarioStore
from service.store.protocol import with_ids

Adapted = ScenarioState | AdaptationInputError  # one scenario's outcome
APPEND_ATTEMPTS = 3  # an append raced by other writes starts over at most this often


def current_learner(learners: MetaLearners) -> LoadedVersion:
    loaded = learners.current
    if loaded is None:
        raise NoMetaLearnerError("no meta learner is loaded yet")
    return loaded


class ScenarioWrites:
    def __init__(
        self,
        settings: Settings,
        store: ScenarioStore,
        learners: MetaLearners,
        metrics: ServiceMetrics,
        revisions: RevisionWatch,
        cache: RecommenderCache,
    ) -> None:
        self.settings = settings
        self.store = store
        self.learners = learners
        self.metrics = metrics
        self.revisions = revisions
        self.cache = cache
        cores = os.cpu_count() or 1
        # Per trigger: torch's thread count is the calling thread's own (OpenMP's setting).
        self._threads = {
            "request": settings.adapt_threads or cores,
            "reload": settings.readapt_threads or cores,
        }
        self.compiler = StepCompiler(
            settings.adapt_compile,
            settings.readapt_batch,
            (self._threads["request"], self._threads["reload"]),
            metrics,
        )
        # Adaptations get their own bounded pool, so recommends never wait behind one; the
        # batches of a re-adaptation another, so requests do not wait behind them either.
        self.readapt_batches = max(1, cores // self._threads["reload"])
        self._pools = {
            "request": ThreadPoolExecutor(settings.adapt_workers, thread_name_prefix="adapt"),
            "reload": ThreadPoolExecutor(self.readapt_batches, thread_name_prefix="readapt"),
        }
        self._in_flight = {"request": 0, "reload": 0}

    @property
    def in_flight(self) -> int:
        """Adaptations (a re-adaptation's batch counts once) running or queued."""
        return sum(self._in_flight.values())

    def close(self) -> None:
        """Stop the adaptation workers and the compiler's warm-up."""
        self.compiler.close()
        for pool in self._pools.values():
            pool.shutdown(wait=True, cancel_futures=True)

    async def adapt(
        self,
        scenario_id: str,
        interactions: list[tuple[str, str]],
        candidates: list[str],
        variant: str | None,
        seed: int | None,
        if_match: IfMatch | None = None,
        meta_learner: str | None = None,
    ) -> dict[str, object]:
        """Register and adapt, with the current meta learner or, pinned, with `meta_learner`
        (a canary: it stays there through promotions); an identical re-post (the same
        registration, variant, seed and meta learner) answers the stored revision, `reused`,
        without adapting again."""
        self._check_limits(interactions, candidates)
        loaded = await self._learner(meta_learner)
        # Fail fast when the result could not be stored, before the costly learning.
        stored = await self.store.get_meta(scenario_id)
        expected = self._precondition(if_match, stored)
        chosen_seed = self.settings.adapt_seed if seed is None else seed
        registered = await asyncio.to_thread(
            registration, interactions, candidates, variant, chosen_seed, meta_learner is not None
        )
        if stored is not None and stored.get("fingerprint") == registered.fingerprint(loaded):
            return {**stored, "reused": True}
        return await self._adapt_and_put(loaded, scenario_id, registered, expected)

    async def append(
        self,
        scenario_id: str,
        interactions: list[tuple[str, str]],
        if_match: IfMatch | None = None,
    ) -> dict[str, object]:
        """Add interactions to a stored scenario and adapt it again with its pool, variant and
        seed. A write that lands meanwhile is not lost: the append starts over from it, or
        with If-Match gives 412."""
        loaded = current_learner(self.learners)
        self._check_at_most(interactions)  # before any precondition
        for _ in range(APPEND_ATTEMPTS):
            stored = await self.store.get(scenario_id)
            if stored is None:
                raise ScenarioNotFoundError(scenario_id)
            if if_match is not None:
                if_match.require(stored.revision)
            state = stored.state
            merged = list(dict.fromkeys([*state.interactions, *interactions]))
            if len(merged) == len(state.interactions):  # nothing new
                return {**with_ids(scenario_id, stored.revision, state.meta), "reused": True}
            self._check_limits(merged, state.candidates)
            # A pinned scenario stays on its meta learner.
            pinned = bool(state.meta.get("pinned"))
            if pinned:
                loaded = await self._learner(str(state.meta["meta_learner"]))
            registered = await asyncio.to_thread(
                registration,
                merged,
                state.candidates,
                str(state.meta["variant"]),
                int(state.meta["seed"]),  # type: ignore[call-overload]
                pinned,
            )
            try:
                return await self._adapt_and_put(loaded, scenario_id, registered, stored.revision)
            except RevisionMismatchError:
                if if_match is not None:
                    raise
        raise ConflictError(
            f"scenario {scenario_id!r} changed during each of {APPEND_ATTEMPTS} attempts to "
            "append; retry"
        )

    async def _adapt_and_put(
        self,
        loaded: LoadedVersion,
        scenario_id: str,
        registered: Registration,
        expected: int | None,
    ) -> dict[str, object]:
        """Adapt in the adaptation pool and store a new revision; with `expected`, only over
        that revision (0: absent), else RevisionMismatchError."""
        requests = self._in_flight["request"]
        if requests >= self.settings.adapt_workers + self.settings.adapt_queue:
            self.metrics.adaptations_rejected.inc()
            raise QueueFullError(f"{requests} adaptations are running or queued")
        min_interactions = self.settings.min_interactions

        def run() -> list[Adapted]:
            return [
                adapt_registration(loaded, scenario_id, registered, min_interactions, self.compiler)
            ]

        (state,) = await self.run_adaptations(run, "request", loaded.version)
        assert isinstance(state, ScenarioState)  # adapt_registration raises the errors
        revision = await self.store.put(scenario_id, state, expected)
        # Our own write is known at once, without waiting for its announcement to come back.
        self.revisions.announced(scenario_id)
        if revision is None:
            raise RevisionMismatchError(
                f"scenario {scenario_id!r} was written while it adapted (expected revision "
                f"{expected}); nothing stored"
            )
        return {"scenario": scenario_id, "revision": revision, **state.meta, "reused": False}

    async def _learner(self, pinned: str | None) -> LoadedVersion:
        """The current meta learner, or the pinned version, loaded from the registry if this
        process does not hold it; a version not in the registry is a 422."""
        if pinned is None:
            return current_learner(self.learners)
        if not (self.learners.registry / VERSIONS / pinned).is_dir():
            raise AdaptationInputError(f"meta learner {pinned} is not in the registry")
        return await asyncio.to_thread(self.learners.get, pinned)

    @staticmethod
    def _precondition(if_match: IfMatch | None, stored: dict[str, object] | None) -> int | None:
        """The revision a write must replace (0: absent), or None for any."""
        if if_match is None:
            return None
        revision = None if stored is None else int(stored["revision"])  # type: ignore[call-overload]
        if_match.require(revision)
        return revision

    def _check_at_most(self, interactions: list[tuple[str, str]]) -> None:
        if len(interactions) > self.settings.max_interactions:
            raise AdaptationInputError(
                f"{len(interactions)} interactions, at most {self.settings.max_interactions}"
            )

    def _check_limits(self, interactions: list[tuple[str, str]], candidates: list[str]) -> None:
        if len(interactions) < self.settings.min_interactions:
            raise AdaptationInputError(
                f"{len(interactions)} interaction(s): a scenario needs at least "
                f"{self.settings.min_interactions} to adapt on"
            )
        self._check_at_most(interactions)
        if len(candidates) > self.settings.max_candidates:
            raise AdaptationInputError(
                f"{len(candidates)} candidates, at most {self.settings.max_candidates}"
            )

    async def run_adaptations(
        self, work: Callable[[], list[Adapted]], trigger: str, meta_learner: str
    ) -> list[Adapted]:
        """Run one adaptation (trigger "request") in the adaptation pool, or one batch of a
        re-adaptation ("reload") in the re-adaptation pool; a batch holds one worker, so it
        counts once in flight."""
        self._in_flight[trigger] += 1
        self.metrics.adaptations_in_flight.set(self.in_flight)
        try:
            start = time.perf_counter()
            outcomes = await asyncio.get_running_loop().run_in_executor(
                self._pools[trigger], _with_threads, self._threads[trigger], work
            )
        finally:
            self._in_flight[trigger] -= 1
            self.metrics.adaptations_in_flight.set(self.in_flight)
        seconds = time.perf_counter() - start
        self.metrics.adaptation_seconds.labels(trigger, meta_learner).observe(seconds)
        for state in outcomes:
            if isinstance(state, ScenarioState):
                steps = float(state.meta["steps"])  # type: ignore[arg-type]
                self.metrics.adaptation_steps.observe(steps)
                self.metrics.stop_reasons.labels(reason=str(state.meta["stopped_by"])).inc()
        return outcomes

    async def delete(self, scenario_id: str, if_match: IfMatch | None = None) -> None:
        expected = None
        if if_match is not None:
            expected = await self.store.revision(scenario_id)
            if expected is None:
                raise ScenarioNotFoundError(scenario_id)
            if_match.require(expected)
        deleted = await self.store.delete(scenario_id, expected)
        if deleted is None:
            raise RevisionMismatchError(
                f"If-Match {if_match.header if if_match else ''}: the scenario was written "
                "meanwhile; nothing deleted"
            )
        if not deleted:
            raise ScenarioNotFoundError(scenario_id)
        self.revisions.announced(scenario_id)
        self.cache.drop(scenario_id)


def _with_threads(threads: int, work: Callable[[], list[Adapted]]) -> list[Adapted]:
    torch.set_num_threads(threads)  # this worker thread's own count
    return work()
