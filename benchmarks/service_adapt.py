"""Server-side adaptation speed: the milliseconds per step the service's POST
/scenarios/{id}/adapt spends adapting, against the library's one-scenario figure measured in
the same run (issue 24: the service took ~4.3 ms per step where the library takes 1.4).

The stack as deployed (Redis, `s2meta serve`), a meta learner trained on LastFM with a tiny
budget (64-dim embeddings), the interaction variant. For each --adapt-threads value the API
is (re)started with that S2META_ADAPT_THREADS, and the script waits until its background
compile of the adaptation step is over (--no-compile: the service adapts eagerly). Then
the LastFM meta-test scenarios with pools of 300 to 1,000 candidates are posted one at a
time, each --repeats times under distinct scenario ids (so none is answered `reused`), after
one discarded warm-up post. From each answer, the server-side `duration_ms` and `steps`:
reported are the median and p90 of duration_ms / steps over the posts, the total (the sum of
duration_ms over the sum of steps), the median steps and the median duration. With the API
and Redis stopped (the cores quiet), the library's figure: one scenario, fused cell and
compiled step, one thread, 20 steps without an early stop (benchmarks/adaptation_speed.py),
measured before the stack starts and after it stops, the faster kept; then the ratio
service / library (of the medians) and whether the issue's targets (TARGET_*) are met.

Prints a table and writes benchmarks/results/service_adapt.json (--name). Not part of the test
run. Run: python -m benchmarks.service_adapt [--repeats 5] [--adapt-threads 1,0]
[--no-compile]
"""

import argparse
import secrets
import statistics
import sys
import tempfile
from pathlib import Path

import httpx

from benchmarks.adaptation_speed import one_scenario_timing
from benchmarks.harness import Scenario, Stack, percentile, start_lastfm_stack
from benchmarks.report import write_report

VARIANT = "interaction"
# The targets: the service's server-side ms per step at most this share of the
# library's one-thread figure, and at most this many ms.
TARGET_RATIO = 1.2
TARGET_MS_PER_STEP = 1.5


def post_adapt(stack: Stack, scenario_id: str, scenario: Scenario) -> dict[str, object]:
    """Adapt one scenario through the API; its answer (an error if it was not adapted)."""
    answer = httpx.post(
        f"{stack.base_url}/scenarios/{scenario_id}/adapt",
        json={**scenario.body, "variant": VARIANT},
        headers={"Authorization": f"Bearer {stack.admin_token}"},
        timeout=300,
    )
    answer.raise_for_status()
    body = answer.json()
    if body["reused"]:
        raise RuntimeError(f"{scenario_id} was answered reused: nothing was adapted")
    return body


def time_adaptations(
    stack: Stack, scenarios: list[Scenario], repeats: int, prefix: str
) -> list[dict[str, object]]:
    """Every scenario posted `repeats` times, one post at a time; per post its id, steps
    and server-side duration."""
    post_adapt(stack, f"{prefix}warmup-{scenarios[0].scenario_id}", scenarios[0])
    posts = []
    for repeat in range(repeats):
        for scenario in scenarios:
            # A new id is a new scenario (and new seeded draws): never a reused answer.
            scenario_id = f"{prefix}r{repeat}-{scenario.scenario_id}"
            body = post_adapt(stack, scenario_id, scenario)
            steps, duration_ms = int(body["steps"]), float(body["duration_ms"])
            posts.append(
                {
                    "scenario": scenario_id,
                    "candidates": len(scenario.body["candidates"]),
                    "steps": steps,
                    "duration_ms": duration_ms,
                    "ms_per_step": duration_ms / steps,
                }
            )
        print(f"  repeat {repeat + 1}/{repeats} posted", flush=True)
    return posts


def summarise(posts: list[dict[str, object]]) -> dict[str, float | None]:
    per_step = [float(post["ms_per_step"]) for post in posts]
    durations = [float(post["duration_ms"]) for post in posts]
    steps = [int(post["steps"]) for post in posts]
    return {
        "posts": len(posts),
        "ms_per_step_median": statistics.median(per_step),
        "ms_per_step_p90": percentile(per_step, 90),
        "ms_per_step_total": sum(durations) / sum(steps),
        "steps_median": statistics.median(steps),
        "duration_ms_median": statistics.median(durations),
    }


def print_table(runs: list[dict[str, object]], library: dict[str, object]) -> None:
    met = {True: "met", False: "not met"}
    print(f"server-side adaptation ({VARIANT}), ms per step")
    print(f"{'':30}{'median':>8}{'p90':>8}{'total':>8}{'ratio':>7}  targets")
    for run in runs:
        service = run["service"]
        label = f"service, adapt threads {run['adapt_threads']}"
        targets = run["targets"]
        print(
            f"{label:30}{service['ms_per_step_median']:>8.2f}{service['ms_per_step_p90']:>8.2f}"
            f"{service['ms_per_step_total']:>8.2f}{run['ratio']:>7.2f}  ratio "
            f"{met[targets['ratio_met']]}, ms {met[targets['ms_per_step_met']]}"
        )
        print(
            f"{'':30}median {service['steps_median']:g} steps, "
            f"{service['duration_ms_median']:.1f} ms; compiled after {run['compiled_after_s']}"
        )
    print(f"{'library, one thread':30}{library['ms_per_step']:>8.2f}")
    print(f"targets: ratio <= {TARGET_RATIO} and <= {TARGET_MS_PER_STEP} ms per step")


def measure_service(
    stack: Stack, scenarios: list[Scenario], threads: int, repeats: int, compile_step: bool
) -> dict[str, object]:
    """The API (re)started with S2META_ADAPT_THREADS=threads, its compile over (or off), and
    the scenarios posted."""
    compile_setting = {} if compile_step else {"S2META_ADAPT_COMPILE": "false"}
    stack.start_api({"S2META_ADAPT_THREADS": str(threads), **compile_setting})
    waited = stack.compiled_after_s
    try:
        print(f"adapt threads {threads}: posting {len(scenarios)} x {repeats} ...", flush=True)
        posts = time_adaptations(stack, scenarios, repeats, f"t{threads}-")
    finally:
        stack.stop_api()
    return {"adapt_threads": threads, "compiled_after_s": waited, "posts": posts}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5, help="posts per scenario")
    parser.add_argument(
        "--adapt-threads", default="1,0", help="S2META_ADAPT_THREADS values (0: one per core)"
    )
    parser.add_argument(
        "--no-compile",
        dest="compile",
        action="store_false",
        help="the service adapts eagerly (S2META_ADAPT_COMPILE=false)",
    )
    parser.add_argument("--library-repeats", type=int, default=40)
    parser.add_argument("--name", default="service_adapt", help="results file name")
    args = parser.parse_args()
    # The library before and after the service, the faster of the two kept: the machine's
    # speed moves during a run, and the ratio then errs against the service.
    print("the library's figure (fused cell, compiled step, one thread) ...", flush=True)
    timings = [one_scenario_timing(repeats=args.library_repeats)]
    runs = []
    with tempfile.TemporaryDirectory(prefix="s2meta-service-adapt-") as scratch:
        stack = Stack(Path(scratch), secrets.token_hex(16))
        try:
            scenarios = start_lastfm_stack(stack, "service_adapt")
            stack.stop_api()
            for threads in (int(value) for value in args.adapt_threads.split(",")):
                runs.append(measure_service(stack, scenarios, threads, args.repeats, args.compile))
        finally:
            stack.close()
    print("the library's figure again ...", flush=True)
    timings.append(one_scenario_timing(repeats=args.library_repeats))
    timing = min(timings, key=lambda t: t.ms_per_step)
    library = {
        "ms_per_step_before_and_after": [t.ms_per_step for t in timings],
        "median_ms": timing.median_ms,
        "p90_ms": timing.p90_ms,
        "ms_per_step": timing.ms_per_step,
        "steps": timing.steps,
        "compiled": timing.compiled,
        "update_cell": timing.update_cell,
        "threads": timing.threads,
    }
    for run in runs:
        service = summarise(run["posts"])
        ratio = service["ms_per_step_median"] / timing.ms_per_step
        run |= {
            "service": service,
            "ratio": ratio,
            "ratio_total": service["ms_per_step_total"] / timing.ms_per_step,
            "targets": {
                "ratio_met": ratio <= TARGET_RATIO,
                "ms_per_step_met": service["ms_per_step_median"] <= TARGET_MS_PER_STEP,
            },
        }
    print_table(runs, library)
    write_report(
        args.name,
        {
            "variant": VARIANT,
            "scenarios": len(scenarios),
            "repeats": args.repeats,
            "library": library,
            "targets": {"ratio_max": TARGET_RATIO, "ms_per_step_max": TARGET_MS_PER_STEP},
            "runs": runs,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
