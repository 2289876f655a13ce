"""The meta learner's lifecycle on a replica: poll the registry for a newly published version
and load it, hear the store's events (other replicas' publications and scenario writes), and
re-adapt the scenarios an older meta learner adapted, each once across all replicas."""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from model.artifact import PUBLISHED_EVENT
from service.adaptation import Registration, adapt_registrations
from service.errors import AdaptationInputError, StoreError
from service.learners import LoadedVersion
from service.scenarios import ScenarioService
from service.store import SCENARIO_EVENT, SUBSCRIBED_EVENT, ScenarioState, StoredScenario
from service.writes import Adapted

logger = logging.getLogger(__name__)

LIST_PAGE = 500
COMPILE_WAIT_S = 900.0  # the most re-adaptation waits for a compile, then adapts eagerly
EVENTS_RETRY_S = 5.0  # the most a lost event subscription waits before subscribing again


class MetaLearnerLifecycle:
    """Background work beside a ScenarioService: `start` it once the first `refresh` ran,
    `stop` it before closing the service."""

    def __init__(self, service: ScenarioService) -> None:
        self.service = service
        self.settings = service.settings
        self.store = service.store
        self.learners = service.learners
        self.metrics = service.metrics
        self._wake = asyncio.Event()
        self._sweep_lock = asyncio.Lock()
        self._failed_readapts: set[tuple[str, str]] = set()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._watch_registry(), name="watch-registry"),
            asyncio.create_task(self._listen_for_events(), name="listen-events"),
        ]

    async def stop(self) -> None:
        # Cancelled again until done: redis-py can swallow a cancellation that lands inside a
        # command, and the loop would then wait out a whole poll interval.
        for task in self._tasks:
            while not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=0.1)
            if not task.cancelled() and task.exception() is not None:
                logger.error("%s ended with an error", task.get_name(), exc_info=task.exception())

    async def refresh(self) -> str | None:
        """Load the registry's current meta learner if it is new, and tell the other
        replicas. Returns the version switched to, if any."""
        switched = await asyncio.to_thread(self.learners.refresh)
        current = self.learners.current
        if current is not None:
            self.metrics.set_current_version(current.version)
        if switched is not None:
            assert current is not None  # it just switched to it
            self.service.writes.compiler.warm(current)
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
        revisions = self.service.revisions
        while True:
            try:
                async for event in self.store.events():
                    kind = event.get("type")
                    if kind == SUBSCRIBED_EVENT:
                        revisions.went_live()
                        self.metrics.store_events_live.set(1)
                    elif kind == SCENARIO_EVENT:
                        revisions.announced(str(event["scenario"]))
                    elif kind == PUBLISHED_EVENT:
                        self._wake.set()
            except StoreError as error:
                logger.warning(
                    "event subscription lost: polling the registry and reading every "
                    "scenario's revision from the store until it is back: %s",
                    error,
                )
            finally:
                revisions.lost()
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
                if meta["meta_learner"] != current.version and not meta.get("pinned")
            ]
            self.metrics.readapt_backlog.set(len(stale))
            todo = [s for s in stale if (s, current.version) not in self._failed_readapts]
            compiler = self.service.writes.compiler
            if todo and not compiler.settled(current):
                # The scenarios serve meanwhile, and the compiled step re-adapts them faster
                # than the eager one would while it compiles beside it.
                logger.info("re-adaptation waits for the adaptation step to compile")
                await asyncio.to_thread(compiler.wait, COMPILE_WAIT_S)
            size = self.settings.readapt_batch
            await self._readapt_in_turn(
                [todo[start : start + size] for start in range(0, len(todo), size)], current
            )
            referenced = set()
            backlog = 0
            async for meta in self._all_meta():
                referenced.add(str(meta["meta_learner"]))
                backlog += meta["meta_learner"] != current.version and not meta.get("pinned")
            self.metrics.readapt_backlog.set(backlog)
            dropped = self.learners.retain(referenced | self.service.cache.versions())
            if dropped:
                logger.info("unloaded meta learners no scenario uses: %s", dropped)

    async def _readapt_in_turn(self, batches: list[list[str]], current: LoadedVersion) -> None:
        """Re-adapt the batches in the re-adaptation pool, as many side by side as it has
        workers, each batch's locks, reads and writes beside the others' adaptation: one
        batch more in flight than the pool runs."""
        in_flight: list[asyncio.Task[None]] = []
        side_by_side = self.service.writes.readapt_batches
        try:
            for batch in batches:
                taken = await self._take(batch, current)
                in_flight.append(asyncio.create_task(self._readapt(taken, current)))
                if len(in_flight) > side_by_side:
                    await in_flight.pop(0)
            while in_flight:
                await in_flight.pop(0)
        finally:
            for task in in_flight:  # after an error or a cancellation: their locks go
                task.cancel()
            await asyncio.gather(*in_flight, return_exceptions=True)

    async def _take(
        self, scenario_ids: list[str], current: LoadedVersion
    ) -> tuple[dict[str, str], list[tuple[str, StoredScenario]]]:
        """Lock the scenarios no other replica has taken, and read those still stale: the
        locks held (released by `_readapt`, or here on an error) and the work."""
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
        except BaseException:
            await self._release(locks, current)
            raise
        return locks, work

    async def _readapt(
        self,
        taken: tuple[dict[str, str], list[tuple[str, StoredScenario]]],
        current: LoadedVersion,
    ) -> None:
        """Re-adapt a batch `_take` took, together; then release its locks."""
        locks, work = taken
        try:
            if work:
                await self._readapt_batch(work, current)
        finally:
            await self._release(locks, current)

    async def _release(self, locks: dict[str, str], current: LoadedVersion) -> None:
        for scenario_id, token in locks.items():
            await self.store.release_lock(f"readapt:{scenario_id}:{current.version}", token)

    async def _readapt_batch(
        self, work: list[tuple[str, StoredScenario]], current: LoadedVersion
    ) -> None:
        registrations = []
        reused: dict[str, ScenarioState] = {}
        for scenario_id, stored in work:
            meta = stored.state.meta
            variant = str(meta["variant"])
            registered = Registration(
                interactions=stored.state.interactions,
                candidates=stored.state.candidates,
                variant=variant if variant in current.artifact.learners else None,
                seed=int(meta["seed"]),  # type: ignore[call-overload]
            )
            # Back to a meta learner this scenario was adapted with (a rollback): the record
            # it had then, if the registration is still the same, instead of adapting again.
            previous = await self.store.get_previous(scenario_id)
            if previous is not None and previous.meta.get("fingerprint") == (
                registered.fingerprint(current)
            ):
                reused[scenario_id] = previous
            else:
                registrations.append((scenario_id, registered))

        writes = self.service.writes

        def run() -> list[Adapted]:
            return adapt_registrations(
                current, registrations, self.settings.min_interactions, writes.compiler
            )

        ran = await writes.run_adaptations(run, "reload", current.version) if registrations else []
        adapted = iter(ran)
        outcomes = [reused.get(scenario_id) or next(adapted) for scenario_id, _ in work]
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
            self.service.revisions.announced(scenario_id)
            if revision is None:
                logger.info(
                    "scenario %s changed during its re-adaptation; kept the newer", scenario_id
                )
            else:
                await self.store.put_previous(scenario_id, stored.state)
                how = "reused" if scenario_id in reused else "adapted"
                self.metrics.readaptations.labels(how=how).inc()
                logger.info(
                    "scenario %s re-adapted with %s (%s): revision %d",
                    scenario_id,
                    current.version,
                    how,
                    revision,
                )
