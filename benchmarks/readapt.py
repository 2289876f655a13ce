"""Re-adaptation after a hot reload: how many stored scenarios per second the service
re-adapts with a newly published meta learner, in batches (S2META_READAPT_BATCH, one vmapped
batch on the device) against one at a time.

The stack as deployed (Redis, `s2meta serve`), a meta learner trained on LastFM with a tiny
budget (64-dim embeddings). The 9 LastFM meta-test scenarios with pools of 300 to 1,000
candidates are adapted through the API, then their stored records copied under --scenarios
ids. Per batch size: the API (re)started with that S2META_READAPT_BATCH, the same artifact
published again as a new version with a Redis notification, and the time from the publish
until the API's s2meta_readaptations_total has counted every scenario; scenarios/s = the
scenarios over that time (it includes loading the new version). The device is what
S2META_DEVICE names (auto: CUDA when there is one).

Prints a table and writes benchmarks/results/readapt.json (--name). Not part of the test
run. Run: python -m benchmarks.readapt [--scenarios 512] [--batches 1,64]
"""

import argparse
import asyncio
import secrets
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.harness import Stack, copy_scenarios, register, run, start_lastfm_stack
from benchmarks.report import write_report


def readaptations(base_url: str) -> float:
    """Scenarios moved to the current meta learner, adapted or reused."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    return sum(
        float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("s2meta_readaptations_total{")
    )


def time_readaptation(stack: Stack, count: int, timeout_s: float) -> float:
    """Publish the artifact again (notified) and wait until `count` scenarios are
    re-adapted; the seconds it took."""
    start = time.perf_counter()
    run(stack.publish_command(notify=True))
    while readaptations(stack.base_url) < count:
        if time.perf_counter() - start > timeout_s:
            raise RuntimeError(f"re-adaptation not done in {timeout_s} s:\n{stack.log_tail()}")
        time.sleep(0.1)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scenarios", type=int, default=512)
    parser.add_argument("--batches", default="1,64", help="S2META_READAPT_BATCH values")
    parser.add_argument("--name", default="readapt", help="results file name")
    args = parser.parse_args()
    batches = [int(size) for size in args.batches.split(",")]
    runs = []
    with tempfile.TemporaryDirectory(prefix="s2meta-readapt-") as scratch:
        stack = Stack(Path(scratch), secrets.token_hex(16))
        try:
            scenarios = start_lastfm_stack(stack, "readapt")
            register(stack, scenarios)
            sources = [s.scenario_id for s in scenarios]
            copies = args.scenarios - len(sources)
            asyncio.run(copy_scenarios(stack.redis_url, sources, copies))
            stack.stop_api()
            for size in batches:
                stack.start_api({"S2META_READAPT_BATCH": str(size)})
                seconds = time_readaptation(stack, args.scenarios, timeout_s=1800)
                stack.stop_api()
                runs.append(
                    {
                        "readapt_batch": size,
                        "seconds": seconds,
                        "scenarios_per_s": args.scenarios / seconds,
                    }
                )
                print(f"  batch {size}: {seconds:.1f} s", flush=True)
        finally:
            stack.close()
    print(f"re-adapting {args.scenarios} scenarios after a hot reload")
    print(f"{'batch':>6}{'seconds':>10}{'scenarios/s':>13}")
    for row in runs:
        print(f"{row['readapt_batch']:>6}{row['seconds']:>10.1f}{row['scenarios_per_s']:>13.1f}")
    write_report(args.name, {"scenarios": args.scenarios, "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
