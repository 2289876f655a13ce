"""Dynamic batching of concurrent recommends.

A recommend that finds fewer than `batches` batches running starts one at once (no added
wait when the service is not busy); otherwise it queues, and the queue goes as the next
batch, at most `max_batch` requests, when a running batch finishes. A batch groups its
requests by adapted recommender and plans each group on the event loop (popular answers,
users' embeddings gathered); then scores them: the interaction and hybrid variants' pools
all in one call (`model.ranking.top_k_pools`: one forward over each pool for all its users),
each mapping-variant group in one FAISS search; then makes the answers on the loop. The
scoring runs on the batcher's own threads, so the loop keeps answering meanwhile, except in
a batch that scores at most `inline_pairs` (user, item) pairs, which is scored on the loop
itself (the service sets that to 0 where the compiled ranking kernel releases the GIL).
"""

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from model.ranking import PoolQuery, top_k_pools
from service.recommenders import AdaptedRecommender, Ranked, RankRequest


class Plan(Protocol):
    """What a recommender's `plan` gives the batcher (service.recommenders.RankPlan)."""

    pool: PoolQuery | None

    def score_alone(self) -> Any: ...

    def finish(self, scored: Any) -> list[Ranked]: ...


Job = tuple[AdaptedRecommender, RankRequest, asyncio.Future[Ranked]]


class RecommendBatcher:
    def __init__(
        self,
        max_batch: int,
        batches: int,
        inline_pairs: int,
        observe_size: Callable[[int], None],
    ) -> None:
        self.max_batch = max_batch
        self.batches = batches
        self.inline_pairs = inline_pairs
        self._observe_size = observe_size
        self._queue: list[Job] = []
        self._running = 0
        self._tasks: set[asyncio.Task[None]] = set()
        # Threads of their own, one per batch ranked at once: the same thread ranks batch
        # after batch, and never waits behind other work sent to the loop's default pool.
        self._threads = ThreadPoolExecutor(max_workers=batches, thread_name_prefix="rank")

    async def rank(self, recommender: AdaptedRecommender, request: RankRequest) -> Ranked:
        future: asyncio.Future[Ranked] = asyncio.get_running_loop().create_future()
        self._queue.append((recommender, request, future))
        if self._running < self.batches:
            self._start_batch()
        return await future

    async def rank_many(
        self, recommender: AdaptedRecommender, requests: list[RankRequest]
    ) -> list[Ranked]:
        """One recommender's requests ranked together in a batch of their own, whatever its
        size: one forward over the pool (or one FAISS search) for all of them."""
        loop = asyncio.get_running_loop()
        jobs: list[Job] = [(recommender, request, loop.create_future()) for request in requests]
        self._launch(jobs)
        return list(await asyncio.gather(*(future for _, _, future in jobs)))

    def close(self) -> None:
        """Stop the ranking threads (after the running batches)."""
        self._threads.shutdown(wait=True)

    def _start_batch(self) -> None:
        batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
        self._launch(batch)

    def _launch(self, batch: list[Job]) -> None:
        self._running += 1
        task = asyncio.create_task(self._run(batch))
        self._tasks.add(task)  # held until done (the loop keeps only weak references)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[Job]) -> None:
        try:
            # Requests whose caller went away (a cancelled future) are not ranked.
            live = [job for job in batch if not job[2].done()]
            self._observe_size(len(live))
            groups = _group(live)
            plans = [_plan(live, positions) for positions in groups]
            # The pairs it scores: each request's pool size.
            if sum(len(job[0].pool_ids) for job in live) <= self.inline_pairs:
                # A small batch costs less scored here than on a thread, where it takes turns
                # with the loop at the GIL at every torch call (docs/performance.md).
                scored = _score(plans)
            else:
                loop = asyncio.get_running_loop()
                scored = await loop.run_in_executor(self._threads, _score, plans)
            for positions, plan, outcome in zip(groups, plans, scored, strict=True):
                ranked = _finish(plan, outcome, len(positions))
                for k, result in zip(positions, ranked, strict=True):
                    future = live[k][2]
                    if future.done():
                        continue
                    if isinstance(result, Exception):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        finally:
            # Whatever ended the batch early (the app shutting down its threads, a bug), no
            # caller waits for ever; the error itself propagates from this task and is logged.
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(RuntimeError("the batch ended before ranking this"))
            self._running -= 1
            if self._queue:
                self._start_batch()


def _group(jobs: list[Job]) -> list[list[int]]:
    """The jobs' positions, by recommender."""
    groups: dict[int, list[int]] = {}
    for position, (recommender, _, _) in enumerate(jobs):
        groups.setdefault(id(recommender), []).append(position)
    return list(groups.values())


# A group that fails, at any step, gives its error to its own requests only. Not swallowed:
# each of the group's callers raises it, and the app's error handler logs it.


def _plan(jobs: list[Job], positions: list[int]) -> Plan | Exception:
    try:
        return jobs[positions[0]][0].plan([jobs[k][1] for k in positions])
    except Exception as error:  # noqa: BLE001
        return error


def _score(plans: list[Plan | Exception]) -> list[Any]:
    """Each plan's scores (an Exception where scoring failed): the pools of all plans that
    have one in one call, the others alone."""
    scored: dict[int, Any] = {}
    pools = {
        k: plan.pool
        for k, plan in enumerate(plans)
        if not isinstance(plan, Exception) and plan.pool is not None
    }
    if pools:
        try:
            scored.update(zip(pools, top_k_pools(list(pools.values())), strict=True))
        except Exception:  # noqa: BLE001
            # Which pool failed: each alone, so that it fails its own plan's requests only.
            for k, pool in pools.items():
                scored[k] = _attempt(lambda pool=pool: top_k_pools([pool])[0])
    for k, plan in enumerate(plans):
        if isinstance(plan, Exception):
            scored[k] = plan
        elif k not in scored:
            scored[k] = _attempt(plan.score_alone)
    return [scored[k] for k in range(len(plans))]


def _attempt(step: Callable[[], Any]) -> Any:
    try:
        return step()
    except Exception as error:  # noqa: BLE001
        return error


def _finish(plan: Plan | Exception, scored: Any, size: int) -> list[Ranked | Exception]:
    if isinstance(scored, Exception):
        return [scored] * size
    assert not isinstance(plan, Exception)  # a failed plan's outcome is its error
    try:
        return list(plan.finish(scored))
    except Exception as error:  # noqa: BLE001
        return [error] * size
