"""Memory: bytes per adapted scenario in Redis and in the service's process, how many
scenarios fit in 1 GiB of each, and the service's peak RSS holding 10,000 adapted scenarios.

The stack runs as deployed (Redis, `s2meta serve` as a subprocess) with a meta learner
trained on LastFM with a tiny budget (64-dim embeddings; the budget changes no sizes). The
LastFM meta-test scenarios with pools of 300 to 1,000 candidates are adapted through the API
once per recommender variant.

- Redis: MEMORY USAGE of each scenario's keys (the record hash and its revision counter),
  median per variant; and, as a cross-check, the growth of Redis's used_memory over the
  10,000 scenarios below, per scenario (it also counts the index of scenario ids).
- In process, for the default variant and for the mapping variant (its FAISS index), each
  in a run of its own: that variant's adapted scenarios copied under 10,000 ids (the stored
  records as the adaptation wrote them; copying instead of adapting 10,000 times changes no
  sizes, and adaptation speed is benchmarks/adaptation_speed.py's), then the service, with
  room for all of them in its cache (S2META_CACHE_SCENARIOS), asked one recommend per
  scenario so it builds and holds each adapted recommender. Bytes per scenario = the growth
  of the API's RSS from the 1,000th to the 10,000th scenario held, over 9,000 (the first
  thousand also pay one-off allocations). Peak RSS = VmHWM of the API process at the end.

Prints a table and writes benchmarks/results/memory.json (--name). Not part of the test run.
Run: python -m benchmarks.memory [--scenarios 10000]
"""

import argparse
import asyncio
import json
import secrets
import statistics
import sys
import tempfile
from pathlib import Path

import httpx
import redis

from benchmarks.harness import (
    NAMESPACE,
    POOL_RANGE,
    Stack,
    copy_scenarios,
    register,
    rss_bytes,
    start_lastfm_stack,
)
from benchmarks.report import write_report

VARIANTS = ("interaction", "mapping", "hybrid")
MIB, GIB = 2**20, 2**30
FIRST_HELD = 1000


def api_rss(pid: int) -> int:
    rss = rss_bytes(pid)
    if rss is None:
        raise RuntimeError(f"the API (pid {pid}) is gone")
    return rss


def peak_rss(pid: int) -> int:
    """VmHWM, read from /proc: psutil has no peak resident size of another process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/{pid}/status has no VmHWM")


def redis_bytes(client: redis.Redis, scenario_id: str) -> int:
    keys = (f"{NAMESPACE}:scenario:{scenario_id}", f"{NAMESPACE}:revision:{scenario_id}")
    return sum(int(client.memory_usage(key, samples=0) or 0) for key in keys)


async def hold_all(base_url: str, targets: list[tuple[str, str]], pid: int) -> dict[int, int]:
    """One recommend per (scenario, user), 4 at a time, in order; the API's RSS in bytes after
    FIRST_HELD and after all of them."""
    rss: dict[int, int] = {}
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        for start in range(0, len(targets), 4):
            chunk = targets[start : start + 4]
            responses = await asyncio.gather(
                *(client.get("/recommend", params={"user": u, "scenario": s}) for s, u in chunk)
            )
            for response in responses:
                response.raise_for_status()
            held = start + len(chunk)
            if held in (FIRST_HELD, len(targets)):
                rss[held] = api_rss(pid)
    return rss


def hold_in_process(
    stack: Stack, client: redis.Redis, sources: list[str], users: dict[str, str], count: int
) -> dict[str, object]:
    """Copy `sources` to `count` stored scenarios, start the API with room for all of them,
    have it build and hold each; Redis growth and the API's RSS figures."""
    before = int(client.info("memory")["used_memory"])
    print(f"memory: copying {sources[0].split('-')[0]} scenarios to {count:,} ...")
    copies = asyncio.run(copy_scenarios(stack.redis_url, sources, count))
    redis_growth = (int(client.info("memory")["used_memory"]) - before) / count
    stack.start_api({"S2META_CACHE_SCENARIOS": str(count + 100)})
    assert stack.api is not None
    pid = stack.api.pid
    ready = api_rss(pid)
    print(f"memory: one recommend per scenario, {count:,} ...")
    rss = asyncio.run(hold_all(stack.base_url, [(c, users[source]) for c, source in copies], pid))
    peak = peak_rss(pid)
    stack.stop_api()
    in_process = (rss[count] - rss[FIRST_HELD]) / (count - FIRST_HELD)
    return {
        "redis_growth_per_scenario": redis_growth,
        "process_bytes_per_scenario": in_process,
        "process_scenarios_per_gib": GIB / in_process,
        "api_rss_mib": {
            "ready": ready / MIB,
            f"holding {FIRST_HELD}": rss[FIRST_HELD] / MIB,
            f"holding {count}": rss[count] / MIB,
            "peak": peak / MIB,
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scenarios", type=int, default=10_000)
    parser.add_argument("--name", default="memory", help="results file name")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="s2meta-memory-") as scratch:
        stack = Stack(Path(scratch), secrets.token_hex(16))
        try:
            scenarios = start_lastfm_stack(stack, "memory")
            users = {}
            for variant in VARIANTS:
                ids = register(stack, scenarios, variant)
                users |= {name: s.users[0] for name, s in zip(ids, scenarios, strict=True)}
            config = json.loads((stack.artifact / "config.json").read_text())
            default_variant = config["default_variant"]
            stack.stop_api()

            client = redis.Redis(port=stack.redis_port)
            per_variant = {
                variant: statistics.median(
                    redis_bytes(client, f"{variant}-{s.scenario_id}") for s in scenarios
                )
                for variant in VARIANTS
            }
            pools = [len(s.body["candidates"]) for s in scenarios]
            held = {}
            for variant in dict.fromkeys((default_variant, "mapping")):
                sources = [f"{variant}-{s.scenario_id}" for s in scenarios]
                held[variant] = hold_in_process(stack, client, sources, users, args.scenarios)
            client.close()
        finally:
            stack.close()

    report = {
        "scenarios": len(scenarios),
        "pool_median": statistics.median(pools),
        "pool_range": POOL_RANGE,
        "default_variant": default_variant,
        "redis_bytes_per_scenario": per_variant,
        "redis_scenarios_per_gib": {v: GIB / b for v, b in per_variant.items()},
        "held": args.scenarios,
        "in_process": held,
    }
    print(
        f"{len(scenarios)} LastFM scenarios, pools {POOL_RANGE[0]}-{POOL_RANGE[1]} "
        f"(median {report['pool_median']:.0f}); default variant {default_variant}"
    )
    rows = [(f"Redis, {variant}", size) for variant, size in per_variant.items()]
    for variant, figures in held.items():
        rows.append((f"Redis used_memory growth, {variant}", figures["redis_growth_per_scenario"]))
        rows.append((f"API process, {variant}", figures["process_bytes_per_scenario"]))
    print(f"{'where':<40}{'KiB/scenario':>14}{'scenarios/GiB':>15}")
    for where, size in rows:
        print(f"{where:<40}{size / 1024:>14.1f}{GIB / size:>15,.0f}")
    for variant, figures in held.items():
        rss = ", ".join(f"{label} {mib:,.0f}" for label, mib in figures["api_rss_mib"].items())
        print(f"API RSS in MiB, {variant}: {rss}")
    write_report(args.name, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
