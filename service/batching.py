"""Dynamic batching of concurrent recommends.

A recommend that finds fewer than `batches` batches running starts one at once (no added
wait when the service is not busy); otherwise it queues, and the queue goes as the next
batch, at most `max_batch` requests, when a running batch finishes. A batch groups its
requests by adapted recommender, and each group is ranked together: one forward over the
pool for all its users (one FAISS search for the mapping variant) instead of one per
request. A batch that scores at most `inline_pairs` (user, item) pairs is ranked on the
event loop itself; a larger one on the batcher's own threads, so that the loop keeps
answering while it is ranked.
"""

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from service.recommenders import AdaptedRecommender, Ranked, RankRequest

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

    def close(self) -> None:
        """Stop the ranking threads (after the running batches)."""
        self._threads.shutdown(wait=True)

    def _start_batch(self) -> None:
        batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
        self._running += 1
        task = asyncio.create_task(self._run(batch))
        self._tasks.add(task)  # held until done (the loop keeps only weak references)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[Job]) -> None:
        try:
            # Requests whose caller went away (a cancelled future) are not ranked.
            live = [job for job in batch if not job[2].done()]
            self._observe_size(len(live))
            # The pairs it scores: each request's pool size.
            if sum(len(job[0].pool_ids) for job in live) <= self.inline_pairs:
                # A small batch costs less ranked here than handed to a thread: under load
                # (A/B runs with benchmarks/serving_load.py's generator) the hand-over, a
                # wake-up each way and the GIL passed back and forth at every tensor
                # operation, cost more than it saved.
                outcomes = _rank_grouped(live)
            else:
                loop = asyncio.get_running_loop()
                outcomes = await loop.run_in_executor(self._threads, _rank_grouped, live)
            for (_, _, future), outcome in zip(live, outcomes, strict=True):
                if future.done():
                    continue
                if isinstance(outcome, Exception):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)
        finally:
            # Whatever ended the batch early (the app shutting down its threads, a bug), no
            # caller waits for ever; the error itself propagates from this task and is logged.
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(RuntimeError("the batch ended before ranking this"))
            self._running -= 1
            if self._queue:
                self._start_batch()


def _rank_grouped(jobs: list[Job]) -> list[Ranked | Exception]:
    """Rank each recommender's requests together; outcomes in the jobs' order. A group that
    fails gives its error to its own requests only."""
    groups: dict[int, list[int]] = {}
    for position, (recommender, _, _) in enumerate(jobs):
        groups.setdefault(id(recommender), []).append(position)
    outcomes: dict[int, Ranked | Exception] = {}
    for positions in groups.values():
        recommender = jobs[positions[0]][0]
        try:
            ranked: list[Ranked | Exception] = list(
                recommender.recommend([jobs[k][1] for k in positions])
            )
        # Not swallowed: each of the group's callers raises it, and the app's error handler
        # logs it.
        except Exception as error:  # noqa: BLE001
            ranked = [error] * len(positions)
        outcomes.update(zip(positions, ranked, strict=True))
    return [outcomes[k] for k in range(len(jobs))]
