"""Server-side adaptation speed: the milliseconds per step the service's POST
/scenarios/{id}/adapt spends adapting, against the library's one-scenario figure measured in
the same run (issue 24: the service took ~4.3 ms per step where the library takes 1.4).

The stack as deployed (Redis, `s2meta serve`), a meta learner trained on LastFM with a tiny
budget (64-dim embeddings), the interaction variant. For each --adapt-threads value the API
is (re)started with that S2META_ADAPT_THREADS, and the script waits until its background
compile of the adaptation step is over (--no-compile: the service adapts eagerly). Then
--rounds rounds, in each of which the LastFM meta-test scenarios with pools of 300 to 1,000
candidates are posted once each, one at a time, under new scenario ids (so none is answered
`reused`); one discarded warm-up post first. Right before each post, the library's figure
(one scenario, fused cell and compiled step, one thread, 20 steps without an early stop:
benchmarks/adaptation_speed.py; the median of --library-repeats calls in this process, the
API idle): the machine's speed moves by up to 1.7x within a run, so each post is compared
with a library figure taken at the same speed. From each answer, the server-side
`duration_ms` and `steps`: reported are the median and p90 of duration_ms / steps over the
posts, the total (the sum of duration_ms over the sum of steps), the median steps and
duration, the median over posts of each post's ms per step over its library figure (the
ratio; also per round), and whether the issue's targets (TARGET_*) are met.

The library's figure is taken warm, call after call; a post comes to an adaptation cold,
after the library's calls in this process had the cores and caches. So right after each
post, one library call of the post's number of steps, alone, is timed too (the cold
figure): a post's ms per step over it (the cold ratio) is the service's own overhead,
apart from the machine's cost of coming back to an adaptation. A least-squares line of
duration over steps, for the posts and for their cold calls, splits each into a cost per
adaptation and a cost per step.

Prints a table and writes benchmarks/results/service_adapt.json (--name). Not part of the test
run. Run: python -m benchmarks.service_adapt [--rounds 5] [--adapt-threads 1,0]
[--library-repeats 3] [--no-compile]
"""

import argparse
import dataclasses
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from benchmarks.adaptation_speed import Reference, one_scenario_timing, synthetic_batch
from benchmarks.harness import Scenario, Stack, percentile, start_lastfm_stack
from benchmarks.report import write_report
from model.learner import adapt

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


@dataclasses.dataclass(frozen=True)
class ColdLibrary:
    """The library's one-scenario adaptation (the reference of adaptation_speed, compiled,
    fused, one thread) as a single timed call, without the warm-up call before it."""

    reference: Reference
    triples: dict[str, torch.Tensor]
    uniforms: torch.Tensor

    @classmethod
    def build(cls) -> "ColdLibrary":
        reference = Reference.on(torch.device("cpu"))
        triples, uniforms = synthetic_batch(reference.config, 1, 0, torch.device("cpu"))
        return cls(reference, triples, uniforms)

    def ms_per_step(self, steps: int) -> float:
        """One call of `steps` steps (no early stop), its ms per step."""
        config = dataclasses.replace(self.reference.config, max_steps=steps)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.no_grad():
                start = time.perf_counter()
                adapt(
                    self.reference.meta,
                    config,
                    self.reference.tables,
                    self.triples,
                    self.uniforms,
                    compiled=True,
                )
                return (time.perf_counter() - start) * 1000 / steps
        finally:
            torch.set_num_threads(threads)


def post_round(
    stack: Stack,
    scenarios: list[Scenario],
    prefix: str,
    library_repeats: int,
    cold: ColdLibrary,
) -> list[dict[str, object]]:
    """Every scenario posted once, one post at a time, under new ids (new seeded draws,
    never a reused answer), each right after the library's figure (this process, the API
    idle) and followed by the library's cold call of as many steps; per post its id, steps,
    server-side duration and its ratios to those figures."""
    posts = []
    for scenario in scenarios:
        library = one_scenario_timing(repeats=library_repeats).ms_per_step
        scenario_id = f"{prefix}{scenario.scenario_id}"
        body = post_adapt(stack, scenario_id, scenario)
        steps, duration_ms = int(body["steps"]), float(body["duration_ms"])
        library_cold = cold.ms_per_step(steps)
        posts.append(
            {
                "scenario": scenario_id,
                "candidates": len(scenario.body["candidates"]),
                "steps": steps,
                "duration_ms": duration_ms,
                "ms_per_step": duration_ms / steps,
                "library_ms_per_step": library,
                "ratio": duration_ms / steps / library,
                "library_cold_ms_per_step": library_cold,
                "cold_ratio": duration_ms / steps / library_cold,
            }
        )
    return posts


def fixed_and_per_step(steps: list[int], ms: list[float]) -> dict[str, float]:
    """The least-squares line ms = fixed + per_step * steps over the posts: what an
    adaptation costs once and what each of its steps costs."""
    per_step, fixed = np.polyfit(np.asarray(steps, dtype=float), np.asarray(ms), 1)
    return {"fixed_ms": float(fixed), "per_step_ms": float(per_step)}


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


def print_table(runs: list[dict[str, object]]) -> None:
    met = {True: "met", False: "not met"}
    print(f"server-side adaptation ({VARIANT}), ms per step")
    print(f"{'':26}{'median':>8}{'p90':>8}{'library':>9}{'ratio':>7}  targets")
    for run in runs:
        service = run["service"]
        label = f"service, adapt threads {run['adapt_threads']}"
        targets = run["targets"]
        print(
            f"{label:26}{service['ms_per_step_median']:>8.2f}{service['ms_per_step_p90']:>8.2f}"
            f"{run['library_ms_per_step_median']:>9.2f}{run['ratio']:>7.2f}  ratio "
            f"{met[targets['ratio_met']]}, ms {met[targets['ms_per_step_met']]}"
        )
        print(
            f"{'':26}median {service['steps_median']:g} steps, "
            f"{service['duration_ms_median']:.1f} ms; round ratios "
            f"{', '.join(f'{r:.2f}' for r in run['round_ratios'])}"
        )
        print(
            f"{'':26}the library cold: {run['library_cold_ms_per_step_median']:.2f} ms per "
            f"step, the service {run['cold_ratio']:.2f}x it"
        )
        service_line, cold_line = run["service_line"], run["library_cold_line"]
        print(
            f"{'':26}ms = fixed + per step x steps: service {service_line['fixed_ms']:.2f} + "
            f"{service_line['per_step_ms']:.3f}, library cold {cold_line['fixed_ms']:.2f} + "
            f"{cold_line['per_step_ms']:.3f}"
        )
    print(f"targets: ratio <= {TARGET_RATIO} and <= {TARGET_MS_PER_STEP} ms per step")


def measure_service(
    stack: Stack,
    scenarios: list[Scenario],
    threads: int,
    rounds: int,
    compile_step: bool,
    library_repeats: int,
) -> dict[str, object]:
    """The API (re)started with S2META_ADAPT_THREADS=threads, its compile over (or off);
    then `rounds` rounds of every scenario posted once, each post paired with the library's
    figure taken right before it and its cold call right after (`post_round`)."""
    compile_setting = {} if compile_step else {"S2META_ADAPT_COMPILE": "false"}
    stack.start_api({"S2META_ADAPT_THREADS": str(threads), **compile_setting})
    waited = stack.compiled_after_s
    rounds_run = []
    cold = ColdLibrary.build()
    try:
        post_adapt(stack, f"t{threads}-warmup", scenarios[0])
        for k in range(rounds):
            posts = post_round(stack, scenarios, f"t{threads}-r{k}-", library_repeats, cold)
            rounds_run.append(posts)
            print(
                f"  adapt threads {threads}, round {k + 1}/{rounds}: service "
                f"{statistics.median(float(p['ms_per_step']) for p in posts):.2f}, library "
                f"{statistics.median(float(p['library_ms_per_step']) for p in posts):.2f} ms "
                f"per step, ratio {statistics.median(float(p['ratio']) for p in posts):.2f}",
                flush=True,
            )
    finally:
        stack.stop_api()
    posts = [post for run in rounds_run for post in run]
    service = summarise(posts)
    round_ratios = [statistics.median(float(p["ratio"]) for p in run) for run in rounds_run]
    ratio = statistics.median(float(p["ratio"]) for p in posts)
    return {
        "adapt_threads": threads,
        "compiled_after_s": waited,
        "service": service,
        "library_ms_per_step_median": statistics.median(
            float(p["library_ms_per_step"]) for p in posts
        ),
        "round_ratios": round_ratios,
        "ratio": ratio,
        "library_cold_ms_per_step_median": statistics.median(
            float(p["library_cold_ms_per_step"]) for p in posts
        ),
        # The posts' durations, and their cold library calls', over their steps.
        "service_line": fixed_and_per_step(
            [int(p["steps"]) for p in posts], [float(p["duration_ms"]) for p in posts]
        ),
        "library_cold_line": fixed_and_per_step(
            [int(p["steps"]) for p in posts],
            [float(p["library_cold_ms_per_step"]) * int(p["steps"]) for p in posts],
        ),
        "cold_ratio": statistics.median(float(p["cold_ratio"]) for p in posts),
        "targets": {
            "ratio_met": ratio <= TARGET_RATIO,
            "ms_per_step_met": service["ms_per_step_median"] <= TARGET_MS_PER_STEP,
        },
        "rounds": rounds_run,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5, help="rounds of library and posts")
    parser.add_argument(
        "--adapt-threads", default="1,0", help="S2META_ADAPT_THREADS values (0: one per core)"
    )
    parser.add_argument(
        "--no-compile",
        dest="compile",
        action="store_false",
        help="the service adapts eagerly (S2META_ADAPT_COMPILE=false)",
    )
    parser.add_argument(
        "--library-repeats", type=int, default=3, help="timed library calls before each post"
    )
    parser.add_argument("--name", default="service_adapt", help="results file name")
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory(prefix="s2meta-service-adapt-") as scratch:
        stack = Stack(Path(scratch), secrets.token_hex(16))
        try:
            scenarios = start_lastfm_stack(stack, "service_adapt")
            stack.stop_api()
            for threads in (int(value) for value in args.adapt_threads.split(",")):
                runs.append(
                    measure_service(
                        stack, scenarios, threads, args.rounds, args.compile, args.library_repeats
                    )
                )
        finally:
            stack.close()
    print_table(runs)
    write_report(
        args.name,
        {
            "variant": VARIANT,
            "scenarios": len(scenarios),
            "rounds": args.rounds,
            "library": "one scenario, fused cell, compiled step, one thread, 20 steps",
            "targets": {"ratio_max": TARGET_RATIO, "ms_per_step_max": TARGET_MS_PER_STEP},
            "runs": runs,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
