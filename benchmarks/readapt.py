"""Re-adaptation after a hot reload: how many stored scenarios per second the service
re-adapts with a newly published meta learner, in batches (S2META_READAPT_BATCH, one vmapped
batch on the device) against one at a time.

The stack as deployed (Redis, `s2meta serve`), a meta learner trained on LastFM with a tiny
budget (64-dim embeddings). The 9 LastFM meta-test scenarios with pools of 300 to 1,000
candidates are adapted through the API, then their stored records copied under --scenarios
ids. Per batch size: the API (re)started with that S2META_READAPT_BATCH, the same artifact
published again as a new version with a Redis notification, and the time from the publish
until the API's s2meta_readaptations_total has counted every scenario; scenarios/s = the
scenarios over that time (it includes the publish command's start-up and loading the new
version), and over the time from the API serving the new version (/readyz) on. Each API
start waits for its background compile of the adaptation step to be over before the publish
(the same configuration then re-adapts compiled at once); --no-compile runs the service
eagerly. The device is what S2META_DEVICE names (auto: CUDA when there is one).

In the same run, the rate re-adaptation is held to: the library adapting the same
registrations in this process (compiled, batches of the largest --batches, every core), and
adaptation_speed's reference batch (64-dim interaction, 20 steps each) on every core, before
the stack starts and after it stops, the faster kept.

Prints a table and writes benchmarks/results/readapt.json (--name). Not part of the test
run. Run: python -m benchmarks.readapt [--scenarios 512] [--batches 1,64] [--no-compile]
"""

import argparse
import asyncio
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from benchmarks.adaptation_speed import batched_scenarios_per_s
from benchmarks.harness import (
    Scenario,
    Stack,
    copy_scenarios,
    register,
    run,
    start_lastfm_stack,
)
from benchmarks.report import write_report
from model.fold_in import local_tables
from model.scenario import adapt_scenarios
from service.adaptation import ResolvedScenario, registration, resolve
from service.learners import MetaLearners


def readaptations(base_url: str) -> float:
    """Scenarios moved to the current meta learner, adapted or reused."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    return sum(
        float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("s2meta_readaptations_total{")
    )


def serving_version(base_url: str) -> str | None:
    return httpx.get(f"{base_url}/readyz", timeout=10).json().get("meta_learner")


def time_readaptation(stack: Stack, count: int, timeout_s: float) -> tuple[float, float]:
    """Publish the artifact again (notified) and wait until `count` scenarios are
    re-adapted; the seconds from the publish, and from the API serving the new version
    (without the publish command's own start-up and the load; from the poll before the one
    that saw the switch, or the publish command's end, so never shorter than it was)."""
    before = serving_version(stack.base_url)
    start = time.perf_counter()
    run(stack.publish_command(notify=True))
    switched = None
    polled = time.perf_counter()  # the publish command is done
    while readaptations(stack.base_url) < count:
        if switched is None and serving_version(stack.base_url) != before:
            switched = polled  # it switched after the poll before: the longer time, kept
        polled = time.perf_counter()
        if time.perf_counter() - start > timeout_s:
            raise RuntimeError(f"re-adaptation not done in {timeout_s} s:\n{stack.log_tail()}")
        # Polled twice a second: each poll is server CPU taken from the re-adaptation.
        time.sleep(0.5)
    end = time.perf_counter()
    return end - start, end - (switched or start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scenarios", type=int, default=512)
    parser.add_argument("--batches", default="1,64", help="S2META_READAPT_BATCH values")
    parser.add_argument("--name", default="readapt", help="results file name")
    parser.add_argument(
        "--no-compile",
        dest="compile",
        action="store_false",
        help="the service adapts eagerly (S2META_ADAPT_COMPILE=false)",
    )
    args = parser.parse_args()
    compile_setting = {"S2META_ADAPT_COMPILE": str(args.compile).lower()}
    batches = [int(size) for size in args.batches.split(",")]
    # The reference batch before and after the service, the faster kept (the machine's
    # speed moves during a run; the comparison then errs against the service).
    top = max(batches)
    reference = [batched_scenarios_per_s(top)]
    runs = []
    with tempfile.TemporaryDirectory(prefix="s2meta-readapt-") as scratch:
        stack = Stack(Path(scratch), secrets.token_hex(16))
        try:
            scenarios = start_lastfm_stack(stack, "readapt", compile_setting)
            register(stack, scenarios)
            sources = [s.scenario_id for s in scenarios]
            copies = args.scenarios - len(sources)
            asyncio.run(copy_scenarios(stack.redis_url, sources, copies))
            stack.stop_api()
            for size in batches:
                stack.start_api({"S2META_READAPT_BATCH": str(size), **compile_setting})
                compiled_after = stack.compiled_after_s  # waited out: the cores are quiet
                seconds, after_switch = time_readaptation(stack, args.scenarios, timeout_s=1800)
                stack.stop_api()
                runs.append(
                    {
                        "readapt_batch": size,
                        "compiled_after_s": compiled_after,
                        "seconds": seconds,
                        "scenarios_per_s": args.scenarios / seconds,
                        "seconds_after_switch": after_switch,
                        "scenarios_per_s_after_switch": args.scenarios / after_switch,
                    }
                )
                print(f"  batch {size}: {seconds:.1f} s", flush=True)
            print(f"the library on the same scenarios (batches of {top}) ...", flush=True)
            library = library_rate(stack, scenarios, args.scenarios, top)
        finally:
            stack.close()
    reference.append(batched_scenarios_per_s(top))
    library["synthetic_batched_per_s"] = max(reference)
    library["synthetic_batched_per_s_before_and_after"] = reference
    print(f"re-adapting {args.scenarios} scenarios after a hot reload")
    print(f"{'batch':>6}{'seconds':>10}{'scenarios/s':>13}{'after the switch':>18}")
    for row in runs:
        print(
            f"{row['readapt_batch']:>6}{row['seconds']:>10.1f}{row['scenarios_per_s']:>13.1f}"
            f"{row['scenarios_per_s_after_switch']:>18.1f}"
        )
    print(
        f"the library, {library['threads']} threads, batches of {top}: "
        f"{library['same_scenarios_per_s']:.1f} scenarios/s on these scenarios, "
        f"{library['synthetic_batched_per_s']:.1f} on adaptation_speed's reference batch"
    )
    report = {"scenarios": args.scenarios, "compiled": args.compile, "runs": runs}
    write_report(args.name, report | {"library": library})
    return 0


def library_rate(
    stack: Stack, scenarios: list[Scenario], count: int, batch: int
) -> dict[str, float | int]:
    """The library adapting the same registrations (`count` of them, as the copies are) in
    batches of `batch` with the compiled step on every core, in this process: the rate
    re-adaptation is held to. The service's own id resolution (service/adaptation.py) gives
    the table rows, outside the timing."""
    learners = MetaLearners(stack.registry, torch.device("cpu"))
    learners.refresh()
    loaded = learners.current
    learner = loaded.learner(None)
    resolved = []
    for k in range(count):
        scenario = scenarios[k % len(scenarios)]
        interactions = [(i["user"], i["item"]) for i in scenario.body["interactions"]]
        registered = registration(interactions, scenario.body["candidates"], None, 0)
        resolved.append(resolve(loaded, f"copy-{k}", registered, 1))
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)

    def adapt_batch(part: list[ResolvedScenario]) -> None:
        # The folded users and items are rows of local tables (model/fold_in.py).
        tables, inputs = local_tables(
            loaded.tables,
            [r.scenario for r in part],
            [r.folded.user_vectors for r in part],
            [r.folded.item_vectors for r in part],
        )
        adapt_scenarios(learner.meta, learner.config, tables, inputs, 0, compiled=True)

    adapt_batch(resolved[:batch])  # compiles
    start = time.perf_counter()
    for first in range(0, count, batch):
        adapt_batch(resolved[first : first + batch])
    seconds = time.perf_counter() - start
    return {"threads": threads, "batch": batch, "same_scenarios_per_s": count / seconds}


if __name__ == "__main__":
    sys.exit(main())
