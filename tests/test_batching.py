"""The recommend batcher on its own: batch bounds, grouping by recommender, errors and
callers that go away."""

import asyncio
import threading

import pytest
import torch
from test_ranking import pool_query

from model.ranking import PoolQuery, top_k_pools
from service import batching
from service.batching import RecommendBatcher
from service.recommenders import Ranked, RankRequest

pytestmark = pytest.mark.anyio


class FakeRecommender:
    """Ranks a user as its own name; records each scoring's users and thread; can be held or
    fail. Its plans have no pool, so each is scored alone (as a mapping variant's)."""

    def __init__(self, name: str, fail: bool = False, pool_size: int = 100) -> None:
        self.name = name
        self.fail = fail
        self.pool_ids = [f"{name}{k}" for k in range(pool_size)]
        self.calls: list[list[str]] = []
        self.threads: list[int] = []
        self.release = threading.Event()
        self.release.set()

    def plan(self, requests: list[RankRequest]) -> "FakePlan":
        return FakePlan(self, requests)


class FakePlan:
    pool = None

    def __init__(self, recommender: FakeRecommender, requests: list[RankRequest]) -> None:
        self.recommender, self.requests = recommender, requests

    def score_alone(self) -> list[Ranked]:
        fake = self.recommender
        fake.release.wait(timeout=10)
        fake.calls.append([request.user for request in self.requests])
        fake.threads.append(threading.get_ident())
        if fake.fail:
            raise RuntimeError(f"{fake.name} cannot rank")
        return [Ranked("adapted", [(f"{fake.name}:{r.user}", float(r.n))]) for r in self.requests]

    def finish(self, scored: list[Ranked]) -> list[Ranked]:
        return scored


def request(user: str) -> RankRequest:
    return RankRequest(user, 3, True)


async def test_requests_that_arrive_while_a_batch_runs_go_together_bounded_and_grouped():
    sizes: list[int] = []
    batcher = RecommendBatcher(max_batch=4, batches=1, inline_pairs=0, observe_size=sizes.append)
    first, second = FakeRecommender("a"), FakeRecommender("b")
    first.release.clear()  # hold the first batch while the others queue
    held = asyncio.create_task(batcher.rank(first, request("u0")))
    await asyncio.sleep(0.05)
    queued = [
        asyncio.create_task(batcher.rank(first if k % 2 else second, request(f"u{k}")))
        for k in range(1, 7)
    ]
    await asyncio.sleep(0.05)
    first.release.set()
    results = await asyncio.gather(held, *queued)
    assert [r.items[0][0] for r in results] == [
        f"{'a' if k % 2 or k == 0 else 'b'}:u{k}" for k in range(7)
    ]
    assert sizes == [1, 4, 2]  # the held one alone, then the queue in batches of at most 4
    # Within a batch each recommender ranked its own requests together, in one call.
    assert first.calls == [["u0"], ["u1", "u3"], ["u5"]]
    assert second.calls == [["u2", "u4"], ["u6"]]


async def test_an_error_reaches_the_callers_of_its_recommender_only():
    sizes: list[int] = []
    batcher = RecommendBatcher(max_batch=8, batches=1, inline_pairs=0, observe_size=sizes.append)
    failing, working = FakeRecommender("bad", fail=True), FakeRecommender("good")
    failing.release.clear()
    calls = [asyncio.create_task(batcher.rank(failing, request(f"u{k}"))) for k in range(3)]
    await asyncio.sleep(0.05)
    same_batch = asyncio.create_task(batcher.rank(working, request("v")))
    failing.release.set()
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(o, RuntimeError) and "cannot rank" in str(o) for o in outcomes)
    assert (await same_batch).items == [("good:v", 3.0)]
    assert sizes == [1, 3]  # u0 alone; u1, u2 and v together
    assert (await batcher.rank(working, request("w"))).items == [("good:w", 3.0)]


async def test_a_caller_that_goes_away_is_not_ranked_and_the_others_are():
    sizes: list[int] = []
    batcher = RecommendBatcher(max_batch=8, batches=1, inline_pairs=0, observe_size=sizes.append)
    recommender = FakeRecommender("a")
    recommender.release.clear()
    held = asyncio.create_task(batcher.rank(recommender, request("u0")))
    await asyncio.sleep(0.05)
    gone = asyncio.create_task(batcher.rank(recommender, request("gone")))
    kept = asyncio.create_task(batcher.rank(recommender, request("kept")))
    await asyncio.sleep(0.05)
    gone.cancel()
    recommender.release.set()
    assert (await held).items[0][0] == "a:u0"
    assert (await kept).items[0][0] == "a:kept"
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert recommender.calls == [["u0"], ["kept"]]
    assert sizes == [1, 1]


async def test_ranking_does_not_wait_behind_the_loops_default_thread_pool():
    """Ranking has threads of its own: with every thread of the loop's default pool busy
    (store reads, recommender builds go there), a recommend is still ranked at once."""
    batcher = RecommendBatcher(max_batch=8, batches=1, inline_pairs=0, observe_size=lambda _: None)
    loop = asyncio.get_running_loop()
    busy = threading.Event()
    # More blocking jobs than the default pool has threads (min(32, cpus + 4)).
    blocked = [loop.run_in_executor(None, busy.wait, 10) for _ in range(40)]
    try:
        ranked = await asyncio.wait_for(batcher.rank(FakeRecommender("a"), request("u")), 5)
        assert ranked.items == [("a:u", 3.0)]
    finally:
        busy.set()
        await asyncio.gather(*blocked)
        batcher.close()


async def test_small_batches_are_ranked_on_the_loop_and_large_ones_on_a_thread():
    """The pairs a batch scores (the pool's size per request) decide where it is ranked."""
    batcher = RecommendBatcher(
        max_batch=8, batches=1, inline_pairs=300, observe_size=lambda _: None
    )
    loop_thread = threading.get_ident()
    small, large = FakeRecommender("s", pool_size=100), FakeRecommender("l", pool_size=400)

    async def behind_a_held_batch(queued: int) -> None:
        """`queued` requests over the pool of 100 wait, as one batch, behind a request over
        the pool of 400 (ranked on the thread, held there)."""
        large.release.clear()
        held = asyncio.create_task(batcher.rank(large, request("held")))
        await asyncio.sleep(0.05)
        tasks = [asyncio.create_task(batcher.rank(small, request(f"q{k}"))) for k in range(queued)]
        await asyncio.sleep(0.05)
        large.release.set()
        await asyncio.gather(held, *tasks)
        assert small.calls[-1] == [f"q{k}" for k in range(queued)]

    try:
        assert (await batcher.rank(small, request("u"))).items == [("s:u", 3.0)]
        assert small.threads == [loop_thread]  # 100 pairs
        await behind_a_held_batch(3)
        assert large.threads[-1] != loop_thread  # 400 pairs
        assert small.threads[-1] == loop_thread  # 300 pairs
        await behind_a_held_batch(4)
        assert small.threads[-1] == large.threads[-1] != loop_thread  # 400 pairs
    finally:
        batcher.close()


class PoolPlan:
    """A plan with a pool (as an interaction or hybrid recommender's): answers its top items'
    positions."""

    def __init__(self, pool: PoolQuery, requests: list[RankRequest]) -> None:
        self.pool, self.requests = pool, requests

    def score_alone(self) -> None:
        raise AssertionError("a plan with a pool is scored with the batch's pools")

    def finish(self, scored: tuple[torch.Tensor, torch.Tensor]) -> list[Ranked]:
        indices = scored[1].tolist()
        return [Ranked("adapted", [(str(p), 0.0) for p in row]) for row in indices]


class PoolRecommender(FakeRecommender):
    def __init__(self, name: str, pool: PoolQuery) -> None:
        super().__init__(name, pool_size=pool.pool.pool_half.shape[0])
        self.pool = pool

    def plan(self, requests: list[RankRequest]) -> PoolPlan:  # type: ignore[override]
        return PoolPlan(self.pool, requests)


async def test_a_batchs_pools_are_ranked_in_one_call_and_a_failing_one_fails_alone(monkeypatch):
    calls: list[int] = []

    def counted(queries: list[PoolQuery]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        calls.append(len(queries))
        return top_k_pools(queries)

    monkeypatch.setattr(batching, "top_k_pools", counted)
    batcher = RecommendBatcher(max_batch=8, batches=1, inline_pairs=0, observe_size=lambda _: None)
    first = PoolRecommender("a", pool_query("interaction", 1, 40, 3, seed=1))
    second = PoolRecommender("b", pool_query("hybrid", 1, 60, 3, seed=2))
    broken = PoolRecommender("c", pool_query("interaction", 1, 5, 6, seed=3))  # k > pool
    holder = FakeRecommender("h")
    try:
        holder.release.clear()  # the three queue behind a held batch, then go as one
        held = asyncio.create_task(batcher.rank(holder, request("u0")))
        await asyncio.sleep(0.05)
        tasks = [
            asyncio.create_task(batcher.rank(recommender, request(f"u{k}")))
            for k, recommender in enumerate([first, second, broken], start=1)
        ]
        await asyncio.sleep(0.05)
        holder.release.set()
        await held
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        assert calls[0] == 3  # all three pools in one call; it failed, so each alone
        assert sorted(calls[1:]) == [1, 1, 1]
        for outcome, recommender in zip(outcomes[:2], [first, second], strict=True):
            want = top_k_pools([recommender.pool])[0][1][0].tolist()
            assert [item for item, _ in outcome.items] == [str(p) for p in want]
        assert isinstance(outcomes[2], RuntimeError)
    finally:
        batcher.close()
