"""Soak: the service as deployed (one API process over Redis with an append-only file) under
a bounded, mixed load for a fixed time, with one hot reload in the middle. It measures what
short tests cannot: whether anything fails, loses a write or leaks when the same process
serves for minutes through a meta-learner switch.

Everything runs on loopback in a temporary directory: its own redis-server (`--appendonly
yes --appendfsync always`, as the stack runs it), a meta learner trained on LastFM with a
tiny budget and published, and `s2meta serve` as a subprocess. Meta-test scenarios are
registered first (POST adapt); then a few asyncio workers send GET /recommend over the
registered scenarios (their evaluation users and some unknown users, who get the popular
fallback) while one worker POSTs an adapt at a fixed interval (re-adapting existing
scenarios with a new seed, and adding the other meta-test scenarios as new ids spread over
the run). Halfway, the same artifact is published again as a new version with a Redis
notification; the time until every scenario reports the new meta learner (GET /scenarios) is
the hot-reload time. The API's resident memory (RSS) is sampled throughout.

Criteria (docs/benchmarks.md#soak): zero 5xx (and no failed connection); no acknowledged write
lost (every HTTP 200 adapt's scenario still exists at a revision >= the acknowledged one,
no revision acknowledged twice, also after Redis restarts from its append-only file); RSS
growth under 10% after warm-up, growth = (median of the last quarter - the sample at the end
of warm-up, the first 20% of the run) / that sample. Also reported: requests by route and
status, requests/s, recommend latency p50/p95/p99, and whether every scenario ended on the
new meta learner.

Prints a table and writes benchmarks/results/soak.json; exits 1 if a criterion fails.
Not part of the test run. Run: python -m benchmarks.soak [--minutes 10]
"""

import argparse
import asyncio
import contextlib
import random
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks.harness import (
    NAMESPACE,
    Scenario,
    Stack,
    meta_test_scenarios,
    percentile,
    rss_bytes,
)
from benchmarks.report import DATA, write_report
from service.store import RedisStore

WARMUP_SHARE, RELOAD_AT_SHARE, LAST_SHARE = 0.2, 0.5, 0.25
RSS_LIMIT = 0.10
ADAPT_ROUTE, RECOMMEND_ROUTE = "POST /scenarios/{id}/adapt", "GET /recommend"
LIST_ROUTE, DETAIL_ROUTE = "GET /scenarios", "GET /scenarios/{id}"


@dataclass(frozen=True)
class Ack:
    """An adapt the service acknowledged (HTTP 200)."""

    scenario: str
    revision: int
    meta_learner: str
    at_s: float


@dataclass
class Record:
    """What the traffic saw."""

    statuses: Counter[tuple[str, str]] = field(default_factory=Counter)
    recommend_ms: list[float] = field(default_factory=list)
    adapt_ms: list[float] = field(default_factory=list)
    acks: list[Ack] = field(default_factory=list)
    sources: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)  # 5xx bodies and transport errors


class Soak:
    """The traffic, the hot reload and the memory samples of one run."""

    def __init__(self, stack: Stack, scenarios: list[Scenario], args: argparse.Namespace) -> None:
        self.stack = stack
        self.args = args
        self.duration_s = args.minutes * 60
        self.initial = scenarios[: args.scenarios]
        self.new = scenarios[args.scenarios :]
        self.live: list[Scenario] = []  # scenarios acknowledged at least once
        self.unknown_users = [f"soak-unknown-{k}" for k in range(20)]
        self.record = Record()
        self.rss: list[tuple[float, float]] = []
        self.reload: dict[str, object] = {}
        self.admin = {"Authorization": f"Bearer {stack.admin_token}"}
        self.t0 = time.monotonic()
        self.traffic_s = 0.0

    def now(self) -> float:
        return time.monotonic() - self.t0

    async def call(
        self, client: httpx.AsyncClient, route: str, method: str, url: str, **kwargs: object
    ) -> httpx.Response | None:
        """One request, counted by route and status; None after a transport error."""
        try:
            response = await client.request(method, url, **kwargs)
        except httpx.TransportError as error:
            self.record.statuses[route, type(error).__name__] += 1
            self.record.failures.append(f"{self.now():.1f}s {route}: {error!r}")
            return None
        self.record.statuses[route, str(response.status_code)] += 1
        if response.status_code >= 500:
            self.record.failures.append(
                f"{self.now():.1f}s {route} {response.status_code}: {response.text[:300]}"
            )
        return response

    async def adapt(self, client: httpx.AsyncClient, scenario: Scenario, seed: int) -> None:
        start = time.perf_counter()
        response = await self.call(
            client,
            ADAPT_ROUTE,
            "POST",
            f"/scenarios/{scenario.scenario_id}/adapt",
            json={**scenario.body, "seed": seed},
            headers=self.admin,
        )
        if response is None or response.status_code != 200:
            return
        self.record.adapt_ms.append((time.perf_counter() - start) * 1000)
        body = response.json()
        ack = Ack(scenario.scenario_id, body["revision"], body["meta_learner"], self.now())
        self.record.acks.append(ack)
        if all(s.scenario_id != scenario.scenario_id for s in self.live):
            self.live.append(scenario)

    async def run(self) -> None:
        limits = httpx.Limits(max_connections=self.args.workers + 4)
        async with httpx.AsyncClient(
            base_url=self.stack.base_url, timeout=120, limits=limits
        ) as client:
            for scenario in self.initial:
                await self.adapt(client, scenario, seed=0)
            if len(self.live) != len(self.initial):
                raise RuntimeError(f"registering the scenarios failed: {self.record.failures}")
            self.t0 = time.monotonic()
            stop = asyncio.Event()
            sampler = asyncio.create_task(self.sample_rss(stop))
            reload = asyncio.create_task(self.hot_reload(client))
            await asyncio.gather(
                *(self.recommend_worker(client, k) for k in range(self.args.workers)),
                self.adapt_worker(client),
            )
            self.traffic_s = self.now()
            stop.set()
            await sampler
            await reload

    async def recommend_worker(self, client: httpx.AsyncClient, k: int) -> None:
        rng = random.Random(self.args.seed * 1000 + k)
        interval = self.args.workers / self.args.rate if self.args.rate > 0 else 0.0
        next_at = self.now()
        while self.now() < self.duration_s:
            scenario = rng.choice(self.live)
            unknown = rng.random() < self.args.unknown_share
            user = rng.choice(self.unknown_users if unknown else scenario.users)
            params = {"user": user, "scenario": scenario.scenario_id, "n": 10}
            start = time.perf_counter()
            response = await self.call(client, RECOMMEND_ROUTE, "GET", "/recommend", params=params)
            if response is not None and response.status_code == 200:
                self.record.recommend_ms.append((time.perf_counter() - start) * 1000)
                self.record.sources[response.json()["source"]] += 1
            next_at = max(next_at + interval, self.now())
            await asyncio.sleep(next_at - self.now())

    async def adapt_worker(self, client: httpx.AsyncClient) -> None:
        """An adapt every interval: a new scenario when one is due (the new ones spread
        evenly over the run), else an existing one re-adapted with a fresh seed."""
        rng = random.Random(self.args.seed)
        due = [(i + 1) / (len(self.new) + 1) * self.duration_s for i in range(len(self.new))]
        waiting = list(self.new)
        next_at = self.now()
        while self.now() < self.duration_s:
            if waiting and due[len(self.new) - len(waiting)] <= self.now():
                await self.adapt(client, waiting.pop(0), seed=0)
            else:
                await self.adapt(client, rng.choice(self.live), seed=rng.randrange(1_000_000))
            next_at = max(next_at + self.args.adapt_every, self.now())
            await asyncio.sleep(min(next_at, self.duration_s) - self.now())

    async def sample_rss(self, stop: asyncio.Event) -> None:
        assert self.stack.api is not None
        while not stop.is_set():
            value = rss_bytes(self.stack.api.pid)
            if value is not None:
                self.rss.append((self.now(), value / 2**20))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.args.sample_every)

    async def scenario_pages(self, client: httpx.AsyncClient) -> list[dict] | None:
        """Every scenario's summary (GET /scenarios, paged), None if a page failed."""
        summaries: list[dict] = []
        after = None
        while True:
            params = {"limit": 100, **({"after": after} if after else {})}
            response = await self.call(client, LIST_ROUTE, "GET", "/scenarios", params=params)
            if response is None or response.status_code != 200:
                return None
            page = response.json()
            summaries += page["scenarios"]
            if page["next"] is None:
                return summaries
            after = page["next"]

    async def hot_reload(self, client: httpx.AsyncClient) -> None:
        """Halfway: publish the artifact again with a notification (`s2meta publish
        --notify`), then watch until the service serves the new version and every scenario
        reports it, polling until the traffic ends and a grace period after. The times are
        from the notification (the publish command's end)."""
        await asyncio.sleep(max(0.0, RELOAD_AT_SHARE * self.duration_s - self.now()))
        start = self.now()
        process = await asyncio.create_subprocess_exec(
            *self.stack.publish_command(notify=True),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await process.communicate()
        if process.returncode != 0:
            self.reload = {"error": err.decode()[-2000:]}
            return
        version = out.decode().split()[-1]
        notified = self.now()
        self.reload = {
            "version": version,
            "at_s": start,
            "publish_command_s": notified - start,
            "notified_at_s": notified,
        }
        deadline = self.duration_s + self.args.grace_s
        while self.now() < deadline and "all_scenarios_s" not in self.reload:
            if "serving_s" not in self.reload:
                ready = await self.call(client, "GET /readyz", "GET", "/readyz")
                if ready is not None and ready.json().get("meta_learner") == version:
                    self.reload["serving_s"] = self.now() - notified
            summaries = await self.scenario_pages(client)
            if summaries and all(
                s["meta_learner"] == version and s["status"] == "ready" for s in summaries
            ):
                self.reload["all_scenarios_s"] = self.now() - notified
                self.reload["scenarios"] = len(summaries)
            await asyncio.sleep(0.5)

    async def final_state(self) -> dict[str, dict]:
        """Every scenario's summary after the traffic, once all are on the new meta learner
        or the grace period is over."""
        version = self.reload.get("version")
        async with httpx.AsyncClient(base_url=self.stack.base_url, timeout=30) as client:
            deadline = time.monotonic() + self.args.grace_s
            while True:
                summaries = await self.scenario_pages(client) or []
                settled = all(s["meta_learner"] == version for s in summaries)
                if settled or time.monotonic() > deadline:
                    break
                await asyncio.sleep(1)
            for scenario in self.live:  # each acknowledged scenario also on its own route
                await self.call(client, DETAIL_ROUTE, "GET", f"/scenarios/{scenario.scenario_id}")
        return {s["scenario"]: s for s in summaries}


def lost_writes(acks: list[Ack], revisions: dict[str, int | None]) -> list[str]:
    """Acknowledged adapts not reflected in the final revisions: the scenario is gone or
    behind the acknowledged revision, or a revision was acknowledged twice."""
    lost = []
    for scenario, count in Counter((a.scenario, a.revision) for a in acks).items():
        if count > 1:
            lost.append(f"{scenario[0]} revision {scenario[1]} acknowledged {count} times")
    for ack in acks:
        final = revisions.get(ack.scenario)
        if final is None or final < ack.revision:
            lost.append(f"{ack.scenario} revision {ack.revision} acknowledged, now {final}")
    return lost


async def stored_revisions(url: str, scenarios: set[str]) -> dict[str, int | None]:
    store = RedisStore(url, NAMESPACE)
    try:
        return {s: await store.revision(s) for s in sorted(scenarios)}
    finally:
        await store.close()


def memory_growth(samples: list[tuple[float, float]], duration_s: float) -> dict[str, object]:
    warm = [v for t, v in samples if t <= WARMUP_SHARE * duration_s]
    last = [v for t, v in samples if t >= (1 - LAST_SHARE) * duration_s]
    if not warm or not last:
        return {"warmup_mib": None, "growth": None}
    at_warmup = warm[-1]
    median = statistics.median(last)
    return {
        "warmup_mib": at_warmup,
        "last_quarter_median_mib": median,
        "end_mib": samples[-1][1],
        "max_mib": max(v for _, v in samples),
        "growth": (median - at_warmup) / at_warmup,
        "samples": [[round(t, 1), round(v, 1)] for t, v in samples],
    }


def worktree_changes() -> list[str]:
    """Files that differ from the commit write_report records: the run served this tree."""
    done = subprocess.run(
        ["git", "status", "--porcelain", "--", "model", "service", "meta_training", "s2meta"],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.splitlines()


def log_problems(log: str) -> dict[str, object]:
    lines = log.splitlines()
    bad = [line for line in lines if " ERROR " in line or "Traceback" in line]
    return {
        # uvicorn re-raises the SIGTERM after its graceful shutdown: exit code -15.
        "clean_stop": any("Finished server process" in line for line in lines),
        "warning_lines": sum(" WARNING " in line for line in lines),
        "error_lines": len(bad),
        "first_errors": bad[:5],
    }


def slash(*values: float | None, spec: str = ".1f") -> str:
    """Figures joined by " / ": floats with `spec`, ints as they are, None as "-"."""
    return " / ".join(
        "-" if v is None else str(v) if isinstance(v, int) else format(v, spec) for v in values
    )


def print_table(figures: dict) -> None:
    print(
        f"\nsoak: {figures['minutes']} min on loopback, {figures['workers']} recommend "
        f"workers, an adapt every {figures['adapt_every_s']} s, hot reload at "
        f"{slash(figures['hot_reload'].get('at_s'))} s"
    )
    print(f"{'route':<52}{'status':>15}{'count':>15}")
    for route, statuses in figures["requests"].items():
        for status, count in statuses.items():
            print(f"{route:<52}{status:>15}{count:>15}")
    latency, adapt = figures["recommend_latency_ms"], figures["adapt_latency_ms"]
    reload, memory, log = figures["hot_reload"], figures["rss"], figures["api_log"]
    scenarios, codes = figures["scenarios"], figures["exit_codes"]
    growth = memory.get("growth")
    rows = {
        "requests/s (all, recommend)": slash(figures["requests_per_s"], figures["recommend_per_s"]),
        "recommend ms p50 / p95 / p99": slash(latency["p50"], latency["p95"], latency["p99"]),
        "recommend sources": ", ".join(f"{k} {v}" for k, v in figures["sources"].items()),
        "adapt ms p50 / p95": slash(adapt["p50"], adapt["p95"], spec=".0f"),
        "5xx / transport errors": slash(figures["5xx"], figures["transport_errors"]),
        "acknowledged adapts / scenarios": slash(
            figures["acknowledged_adapts"], scenarios["at_end"]
        ),
        "lost writes: API / after Redis restart": slash(
            len(figures["lost_writes"]), len(figures["lost_after_redis_restart"])
        ),
        "publish command s (reload's start)": slash(reload.get("publish_command_s")),
        f"notified -> serving {reload.get('version')} / all re-adapted s": slash(
            reload.get("serving_s"), reload.get("all_scenarios_s"), spec=".2f"
        ),
        "scenarios on the new meta learner / all": slash(
            scenarios["on_new_meta_learner"], scenarios["at_end"]
        ),
        "RSS MiB warm-up / last-quarter median / end": slash(
            memory.get("warmup_mib"), memory.get("last_quarter_median_mib"), memory.get("end_mib")
        ),
        "RSS growth after warm-up": "-" if growth is None else f"{100 * growth:+.2f} %",
        "API log lines: warnings / errors": slash(log["warning_lines"], log["error_lines"]),
        "exit codes: API / Redis": slash(codes["api"], codes["redis"]),
        "API stopped cleanly": str(log["clean_stop"]),
    }
    for label, value in rows.items():
        print(f"{label:<52}{value:>30}")
    for name, passed in figures["criteria"].items():
        print(f"{name:<52}{'PASS' if passed else 'FAIL':>30}")


def summarise(soak: Soak, final: dict[str, dict], after_restart: dict[str, int | None]) -> dict:
    record = soak.record
    requests: dict[str, dict[str, int]] = {}
    for (route, status), count in sorted(record.statuses.items()):
        requests.setdefault(route, {})[status] = count
    five_xx = sum(c for (_, s), c in record.statuses.items() if s.isdigit() and int(s) >= 500)
    transport = sum(c for (_, s), c in record.statuses.items() if not s.isdigit())
    traffic = [c for (r, _), c in record.statuses.items() if r in (RECOMMEND_ROUTE, ADAPT_ROUTE)]
    recommends = sum(c for (r, _), c in record.statuses.items() if r == RECOMMEND_ROUTE)
    revisions = {s: (final[s]["revision"] if s in final else None) for s in after_restart}
    lost = lost_writes(record.acks, revisions)
    lost_restart = lost_writes(record.acks, after_restart)
    version = soak.reload.get("version")
    switched = float(soak.reload.get("notified_at_s", 0.0)) + float(
        soak.reload.get("serving_s", float("inf"))
    )
    on_new = sum(s["meta_learner"] == version for s in final.values())
    memory = memory_growth(soak.rss, soak.duration_s)
    growth = memory.get("growth")
    return {
        "minutes": soak.args.minutes,
        "workers": soak.args.workers,
        "recommend_rate_target": soak.args.rate or None,
        "adapt_every_s": soak.args.adapt_every,
        "unknown_user_share": soak.args.unknown_share,
        "rss_sample_every_s": soak.args.sample_every,
        "traffic_s": soak.traffic_s,
        "requests": requests,
        "requests_per_s": sum(traffic) / soak.traffic_s,
        "recommend_per_s": recommends / soak.traffic_s,
        "recommend_latency_ms": {f"p{q}": percentile(record.recommend_ms, q) for q in (50, 95, 99)},
        "adapt_latency_ms": {f"p{q}": percentile(record.adapt_ms, q) for q in (50, 95)},
        "sources": dict(record.sources),
        "5xx": five_xx,
        "transport_errors": transport,
        "failures": record.failures[:20],
        "acknowledged_adapts": len(record.acks),
        # An adapt started before the switch finishes on the old meta learner; the next
        # re-adaptation round must catch it.
        "acknowledged_on_old_meta_learner_after_switch": sum(
            a.meta_learner != version and a.at_s > switched for a in record.acks
        ),
        "lost_writes": lost,
        "lost_after_redis_restart": lost_restart,
        "hot_reload": soak.reload,
        "scenarios": {
            "initial": len(soak.initial),
            "at_end": len(final),
            "on_new_meta_learner": on_new,
        },
        "rss": memory,
        "api_log": log_problems(soak.stack.api_log.read_text(errors="replace")),
        "criteria": {
            "zero 5xx (and no failed connection)": five_xx == 0 and transport == 0,
            "no acknowledged write lost": not lost and not lost_restart and bool(record.acks),
            f"RSS growth after warm-up < {RSS_LIMIT:.0%}": growth is not None
            and growth < RSS_LIMIT,
            "hot reload: every scenario on the new meta learner": bool(final)
            and on_new == len(final)
            and "all_scenarios_s" in soak.reload,
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=10.0, help="traffic duration")
    parser.add_argument("--workers", type=int, default=4, help="concurrent recommend workers")
    parser.add_argument(
        "--rate", type=float, default=50.0, help="recommends/s in all (0: as fast as they go)"
    )
    parser.add_argument("--adapt-every", type=float, default=3.0, help="seconds between adapts")
    parser.add_argument("--scenarios", type=int, default=8, help="registered before traffic")
    parser.add_argument("--unknown-share", type=float, default=0.1, help="unknown users' share")
    parser.add_argument("--sample-every", type=float, default=2.0, help="RSS sampling, seconds")
    parser.add_argument("--grace-s", type=float, default=60.0, help="wait for re-adaptation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=DATA / "LastFM", help="dataset stem")
    parser.add_argument("--name", default="soak", help="benchmarks/results/<name>.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="s2meta-soak-") as tmp:
        stack = Stack(Path(tmp), secrets.token_urlsafe(24))
        changes = worktree_changes()
        try:
            print("soak: training a meta learner (tiny budget) and publishing it ...", flush=True)
            first = stack.train_and_publish(args.data)
            scenarios = meta_test_scenarios(stack.artifact, args.data, stack.cache)
            stack.start_redis()
            stack.start_api()
            print(
                f"soak: API ready on {stack.base_url} with {first}; registering "
                f"{args.scenarios} of {len(scenarios)} meta-test scenarios, then "
                f"{args.minutes} min of traffic ...",
                flush=True,
            )
            soak = Soak(stack, scenarios, args)
            asyncio.run(soak.run())
            final = asyncio.run(soak.final_state())
            api_code = stack.stop_api()
            redis_code = stack.stop_redis()
            # The acknowledged writes must survive Redis restarting from its append-only file.
            stack.start_redis()
            acked = {a.scenario for a in soak.record.acks}
            after_restart = asyncio.run(stored_revisions(stack.redis_url, acked))
            stack.stop_redis()
        except BaseException:
            if stack.api_log.exists():
                print(stack.log_tail(), file=sys.stderr)
            raise
        finally:
            stack.close()
        figures = summarise(soak, final, after_restart)
        figures["exit_codes"] = {"api": api_code, "redis": redis_code}
        figures["worktree_changes"] = changes
    print_table(figures)
    write_report(args.name, figures)
    return 0 if all(figures["criteria"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
