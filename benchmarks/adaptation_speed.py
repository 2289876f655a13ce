"""Speed of scenario-specific learning and of meta-training, on the reference config:
interaction variant, 64-dim embeddings (10,881 adapted parameters), update-controller LSTM
hidden 16, batch 128, 20 steps (the stop draws are set so no scenario stops early).

Prints and writes benchmarks/results/adaptation_speed_<device>.json:
- one scenario on one CPU thread: median and p90 ms for the reference (eager, unfused), the
  fused update cell with the eager recommender gradient, and the fused cell with the compiled
  gradient (what evaluation and serving run), beside the FLOP floor (the step's FLOPs at this
  machine's measured one-thread matmul rate) and the official implementation's figures for
  this machine, held as constants (128 ms per scenario, 233 ms per meta-training task);
- a batch of 64 scenarios: scenarios per second;
- meta-training: tasks per second (meta-batch 8, compiled, the differentiable controller);
the last two on one thread and on all of the machine's cores.
Run: python -m benchmarks.adaptation_speed [--device cpu|cuda] [--repeats 40]
"""

import argparse
import itertools
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from benchmarks.report import write_report
from model.inner_loss import Tables
from model.learner import adapt, init_meta_params, layout_of
from model.learner_config import LearnerConfig
from model.recommender import RecommenderSpec
from model.sampling import sample_triples
from model.scenario import stack_triples

D, USERS, ITEMS, POOL, SUPPORT = 64, 2000, 5000, 500, 64
OFFICIAL_MS_PER_SCENARIO, OFFICIAL_MS_PER_TASK = 128.0, 233.0


def synthetic_batch(
    config: LearnerConfig, scenarios: int, seed: int, device: torch.device
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    rng = np.random.default_rng(seed)
    parts = []
    for _ in range(scenarios):
        pool = np.sort(rng.choice(ITEMS, size=POOL, replace=False))
        users = rng.integers(0, USERS, size=SUPPORT)
        items = pool[rng.integers(0, POOL, size=SUPPORT)]
        parts.append(sample_triples(users, items, pool, (config.max_steps, config.batch_size), rng))
    uniforms = torch.ones(scenarios, config.max_steps, device=device)  # never stop early
    return stack_triples(parts, device), uniforms


def time_calls(fn: Callable[[], object], repeats: int) -> list[float]:
    fn()  # warm-up (and compilation)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    return times


def step_flops(config: LearnerConfig) -> float:
    """FLOPs of one adaptation step at the least the computation needs: the recommender's
    forward and backward (~2x) on N triples (the user's half of the first layer once per
    triple, the rest for the positive and the negative pair), and the update controller over
    every parameter element (its gate matmul over the gradient, parameter and hidden inputs:
    the loss's share is one row per tensor; the gates' nonlinear work at ~30 FLOPs each)."""
    widths = config.recommender.mlp_widths()
    d = config.recommender.embedding_dim
    first_layer = 3 * 2 * d * widths[1]  # user half once, item half twice
    rest = 2 * sum(2 * a * b for a, b in itertools.pairwise(widths[1:]))
    recommender = 3 * (first_layer + rest) * config.batch_size
    n = layout_of(config).numel
    h = config.controller_hidden
    controller = n * (2 * (4 + h) * 4 * h + 2 * h * 2 + 30 * 4 * h)
    return recommender + controller


def matmul_gflops() -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    times = time_calls(lambda: a @ b, 5)
    return 2 * 2048**3 / (statistics.median(times) / 1000) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--batch-scenarios", type=int, default=64)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    config = LearnerConfig(RecommenderSpec("interaction", D))
    generator = torch.Generator().manual_seed(0)
    meta = {k: v.to(device) for k, v in init_meta_params(config, generator).items()}
    tables = Tables(torch.randn(USERS, D, device=device), torch.randn(ITEMS, D, device=device))
    figures: dict[str, object] = {"device": str(device), "parameters": layout_of(config).numel}

    one, one_uniforms = synthetic_batch(config, 1, 0, device)
    settings = {"reference": (False, False), "fused": (False, True), "fused_compiled": (True, True)}
    for label, (compiled, fused) in settings.items():
        with torch.no_grad():
            times = time_calls(
                lambda c=compiled, f=fused: adapt(
                    meta, config, tables, one, one_uniforms, compiled=c, fused=f
                ),
                args.repeats,
            )
        figures[f"one_scenario_{label}_ms"] = {
            "median": statistics.median(times),
            "p90": float(np.percentile(times, 90)),
            "speedup_over_official": OFFICIAL_MS_PER_SCENARIO / statistics.median(times),
        }
    if device.type == "cpu":
        rate = matmul_gflops()
        flops = step_flops(config) * config.max_steps
        figures["flop_floor"] = {
            "mflop_per_adaptation": flops / 1e6,
            "matmul_gflops_one_thread": rate,
            "floor_ms": flops / (rate * 1e9) * 1000,
        }

    many, many_uniforms = synthetic_batch(config, args.batch_scenarios, 1, device)
    trainable = {k: v.clone().requires_grad_(True) for k, v in meta.items()}
    train8, uniforms8 = synthetic_batch(config, 8, 2, device)
    test8 = {k: v[:, 0] for k, v in train8.items()}

    def meta_step() -> None:
        result = adapt(trainable, config, tables, train8, uniforms8, test8, compiled=True)
        result.theta.sum().backward()

    # Throughput on one thread and on every core (how the jobs run): the official figures
    # name a thread count only for one scenario.
    thread_counts = [1, os.cpu_count() or 1] if device.type == "cpu" else [None]
    for threads in dict.fromkeys(thread_counts):
        if threads is not None:
            torch.set_num_threads(threads)
        label = f"{threads}_threads" if threads is not None else "device"
        with torch.no_grad():
            times = time_calls(
                lambda: adapt(meta, config, tables, many, many_uniforms, compiled=True), 3
            )
        per_s = args.batch_scenarios / (statistics.median(times) / 1000)
        figures[f"batched_scenarios_per_s_{label}"] = {
            "scenarios": args.batch_scenarios,
            "per_s": per_s,
            "times_official_one_at_a_time": per_s * OFFICIAL_MS_PER_SCENARIO / 1000,
        }
        times = time_calls(meta_step, 5)
        tasks_per_s = 8 / (statistics.median(times) / 1000)
        figures[f"meta_training_tasks_per_s_{label}"] = {
            "per_s": tasks_per_s,
            "times_official": tasks_per_s * OFFICIAL_MS_PER_TASK / 1000,
        }

    for name, value in figures.items():
        print(f"{name}: {value}")
    write_report(f"adaptation_speed_{device.type}", figures)


if __name__ == "__main__":
    main()
