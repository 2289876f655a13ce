"""Server-side adaptation speed: the milliseconds per step the service's POST
/scenarios/{id}/adapt spends adapting, against the library's one-scenario figure measured in
the same run (issue 24: the service took ~4.3 ms per step where the library takes 1.4).

The stack as deployed (Redis, `s2meta serve`), a meta learner trained on LastFM with a tiny
budget (64-dim embeddings), the interaction variant. Once the API is ready the script waits
(--compiled-timeout, or not at all with --no-wait-compiled) until its
s2meta_adaptation_compiled{variant="interaction"} gauge is 1, i.e. the service adapts with the
compiled step; a service without that gauge is measured as it is, with a note. Then the LastFM
meta-test scenarios with pools of 300 to 1,000 candidates are posted one at a time, each
--repeats times under distinct scenario ids (so none is answered `reused`), after one
discarded warm-up post. From each answer, the server-side `duration_ms` and `steps`: reported
are the median and p90 of duration_ms / steps over the posts, the total (the sum of
duration_ms over the sum of steps), the median steps and the median duration. With the API
and Redis stopped (the cores quiet), the library's figure: one scenario, fused cell and
compiled step, one thread, 20 steps without an early stop (benchmarks/adaptation_speed.py);
then the ratio service / library (of the medians) and whether the issue's targets
(TARGET_*) are met.

Prints a table and writes benchmarks/results/service_adapt.json (--name). Not part of the test
run. Run: python -m benchmarks.service_adapt [--repeats 5] [--no-wait-compiled]
[--compiled-timeout 600]
"""

import argparse
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.adaptation_speed import one_scenario_timing
from benchmarks.harness import Scenario, Stack, percentile, start_lastfm_stack
from benchmarks.report import write_report

VARIANT = "interaction"
COMPILED_GAUGE = "s2meta_adaptation_compiled"
# The issue's targets: the service's server-side ms per step at most this share of the
# library's one-thread figure, and at most this many ms.
TARGET_RATIO = 1.2
TARGET_MS_PER_STEP = 1.5


def compiled_gauge(base_url: str, variant: str) -> float | None:
    """The API's compiled-step gauge for the variant: None where /metrics has no such gauge,
    0 while no sample for the variant is there yet (warming up). The least over samples,
    so with several workers it is 1 only once every one adapts compiled."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    if COMPILED_GAUGE not in text:
        return None
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(f"{COMPILED_GAUGE}{{") and f'variant="{variant}"' in line
    ]
    return min(values, default=0.0)


def wait_for_compiled(stack: Stack, timeout_s: float) -> tuple[float | None, float]:
    """Wait until the API adapts the variant with the compiled step (or the timeout passes);
    the gauge's last value and the seconds waited."""
    start = time.perf_counter()
    while True:
        value = compiled_gauge(stack.base_url, VARIANT)
        waited = time.perf_counter() - start
        if value is None:
            return value, waited
        if value >= 1:
            print(f"the compiled step is in use after {waited:.0f} s", flush=True)
            return value, waited
        if waited > timeout_s:
            print(f"warning: {COMPILED_GAUGE} still {value:g} after {timeout_s:.0f} s; going on")
            return value, waited
        time.sleep(1)


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
    stack: Stack, scenarios: list[Scenario], repeats: int
) -> list[dict[str, object]]:
    """Every scenario posted `repeats` times, one post at a time; per post its id, steps
    and server-side duration."""
    post_adapt(stack, f"warmup-{scenarios[0].scenario_id}", scenarios[0])
    posts = []
    for repeat in range(repeats):
        for scenario in scenarios:
            # A new id is a new scenario (and new seeded draws): never a reused answer.
            scenario_id = f"r{repeat}-{scenario.scenario_id}"
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


def print_table(
    service: dict[str, float | None],
    library: dict[str, object],
    ratio: float,
    gauge: float | None,
) -> None:
    met = {True: "met", False: "not met"}
    state = "absent" if gauge is None else f"{gauge:g}"
    print(f"server-side adaptation ({VARIANT}), {service['posts']} posts, compiled gauge {state}")
    print(f"{'':28}{'ms/step':>9}")
    print(f"{'service, median':28}{service['ms_per_step_median']:>9.2f}")
    print(f"{'service, p90':28}{service['ms_per_step_p90']:>9.2f}")
    print(f"{'service, total':28}{service['ms_per_step_total']:>9.2f}")
    print(f"{'library, one thread':28}{library['ms_per_step']:>9.2f}")
    print(
        f"median steps {service['steps_median']:g}, median duration "
        f"{service['duration_ms_median']:.1f} ms; library {library['median_ms']:.1f} ms per "
        f"{library['steps']} steps"
    )
    ratio_met = met[ratio <= TARGET_RATIO]
    step_met = met[service["ms_per_step_median"] <= TARGET_MS_PER_STEP]
    print(f"ratio service / library {ratio:.2f} (target <= {TARGET_RATIO}): {ratio_met}")
    print(
        f"service ms per step {service['ms_per_step_median']:.2f} "
        f"(target <= {TARGET_MS_PER_STEP}): {step_met}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5, help="posts per scenario")
    parser.add_argument("--no-wait-compiled", action="store_true", help="measure at once")
    parser.add_argument("--compiled-timeout", type=float, default=600, help="seconds")
    parser.add_argument("--library-repeats", type=int, default=40)
    parser.add_argument("--name", default="service_adapt", help="results file name")
    args = parser.parse_args()
    gauge: dict[str, float | None] = {"before": None, "after": None, "waited_s": 0.0}
    with tempfile.TemporaryDirectory(prefix="s2meta-service-adapt-") as scratch:
        stack = Stack(Path(scratch), secrets.token_hex(16))
        try:
            scenarios = start_lastfm_stack(stack, "service_adapt")
            if args.no_wait_compiled:
                gauge["before"] = compiled_gauge(stack.base_url, VARIANT)
            else:
                gauge["before"], gauge["waited_s"] = wait_for_compiled(stack, args.compiled_timeout)
            if gauge["before"] is None:
                print(f"note: /metrics has no {COMPILED_GAUGE}; measuring the service as it is")
            print(f"posting {len(scenarios)} scenarios x {args.repeats} ...", flush=True)
            posts = time_adaptations(stack, scenarios, args.repeats)
            gauge["after"] = compiled_gauge(stack.base_url, VARIANT)
        finally:
            stack.close()
    print("the library's figure (fused cell, compiled step, one thread) ...", flush=True)
    timing = one_scenario_timing(repeats=args.library_repeats)
    library = {
        "median_ms": timing.median_ms,
        "p90_ms": timing.p90_ms,
        "ms_per_step": timing.ms_per_step,
        "steps": timing.steps,
        "compiled": timing.compiled,
        "update_cell": timing.update_cell,
        "threads": timing.threads,
    }
    service = summarise(posts)
    ratio = service["ms_per_step_median"] / timing.ms_per_step
    print_table(service, library, ratio, gauge["after"])
    write_report(
        args.name,
        {
            "variant": VARIANT,
            "scenarios": len(scenarios),
            "repeats": args.repeats,
            "compiled_gauge": gauge,
            "service": service,
            "library": library,
            "ratio": ratio,
            "ratio_total": service["ms_per_step_total"] / timing.ms_per_step,
            "targets": {
                "ratio_max": TARGET_RATIO,
                "ms_per_step_max": TARGET_MS_PER_STEP,
                "ratio_met": ratio <= TARGET_RATIO,
                "ms_per_step_met": service["ms_per_step_median"] <= TARGET_MS_PER_STEP,
            },
            "posts": posts,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
