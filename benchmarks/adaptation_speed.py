"""Speed of scenario-specific learning and of meta-training, on the reference config:
interaction variant, 64-dim embeddings (10,881 adapted parameters), update-controller LSTM
hidden 16, batch 128, 20 steps (the stop draws are set so no scenario stops early).

Prints and writes benchmarks/results/adaptation_speed_<device>.json:
- one scenario on one CPU thread: median and p90 ms for the reference (eager, unfused), the
  fused update cell with the eager recommender gradient, and the fused cell with the compiled
  gradient (what evaluation and serving run), beside the FLOP floor (the step's FLOPs at this
  machine's measured one-thread matmul rate) and the official implementation's figures for
  this machine, held as constants (128 ms per scenario, 233 ms per meta-training task). Each
  setting records the update cell that actually ran (`update_cell`): the fused cell is a CPU
  kernel, so on CUDA the "fused" settings run the reference cell and say so;
- a batch of 64 scenarios: scenarios per second;
- meta-training: tasks per second (meta-batch 8, compiled, the differentiable controller);
the last two on one thread and on all of the machine's cores.
`one_scenario_timing` measures one of those settings alone, for other benchmarks to quote
the library's figure in their own run (benchmarks/service_adapt.py).
Run: python -m benchmarks.adaptation_speed [--device cpu|cuda] [--repeats 40]
"""

import argparse
import itertools
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from benchmarks.report import write_report
from model.fused_cell import fused_update_gates
from model.inner_loss import Tables
from model.learner import adapt, init_meta_params, layout_of
from model.learner_config import LearnerConfig
from model.params import Params
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


def synchronize() -> None:
    """Wait for queued CUDA work, so a timer measures the work and not its launch."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_calls(fn: Callable[[], object], repeats: int) -> list[float]:
    fn()  # warm-up (and compilation)
    synchronize()  # the warm-up's queued kernels must not land in the first timing
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append((time.perf_counter() - start) * 1000)
    return times


@dataclass(frozen=True)
class Reference:
    """The reference learner on `device`: its config, meta parameters and synthetic tables."""

    config: LearnerConfig
    meta: Params
    tables: Tables

    @classmethod
    def on(cls, device: torch.device) -> "Reference":
        config = LearnerConfig(RecommenderSpec("interaction", D))
        generator = torch.Generator().manual_seed(0)
        meta = {k: v.to(device) for k, v in init_meta_params(config, generator).items()}
        user, item = torch.randn(USERS, D, device=device), torch.randn(ITEMS, D, device=device)
        return cls(config, meta, Tables(user, item))

    def update_cell(self, fused: bool) -> str:
        """The update cell `adapt(..., fused=fused)` runs here: "fused" only where the fused
        cell applies (CPU float32 weights, a built kernel), else "reference"."""
        config = self.config
        if not fused or config.update_rule != "learned":
            return "reference"
        gates = fused_update_gates(self.meta, layout_of(config).sizes, config.controller_hidden)
        return "reference" if gates is None else "fused"


@dataclass(frozen=True)
class OneScenarioTiming:
    """One scenario adapted for `steps` steps (no early stop): median and p90 over the timed
    calls."""

    median_ms: float
    p90_ms: float
    steps: int
    compiled: bool
    update_cell: str  # "fused" or "reference": what ran, not what was asked for
    threads: int | None  # CPU threads; None on an accelerator

    @property
    def ms_per_step(self) -> float:
        return self.median_ms / self.steps


def time_one_scenario(
    reference: Reference, compiled: bool, fused: bool, repeats: int
) -> OneScenarioTiming:
    """Time one scenario's adaptation in the current thread setting."""
    config, meta, tables = reference.config, reference.meta, reference.tables
    device = tables.user.device
    one, one_uniforms = synthetic_batch(config, 1, 0, device)
    with torch.no_grad():
        times = time_calls(
            lambda: adapt(meta, config, tables, one, one_uniforms, compiled=compiled, fused=fused),
            repeats,
        )
    return OneScenarioTiming(
        median_ms=statistics.median(times),
        p90_ms=float(np.percentile(times, 90)),
        steps=config.max_steps,
        compiled=compiled,
        update_cell=reference.update_cell(fused),
        threads=torch.get_num_threads() if device.type == "cpu" else None,
    )


def one_scenario_timing(
    repeats: int = 40, device: str = "cpu", compiled: bool = True, fused: bool = True
) -> OneScenarioTiming:
    """The library's one-scenario figure (by default the fused cell and the compiled step,
    what evaluation and serving run), on one thread on the CPU; the caller's thread count is
    restored afterwards."""
    where = torch.device(device)
    threads = torch.get_num_threads()
    if where.type == "cpu":
        torch.set_num_threads(1)
    try:
        return time_one_scenario(Reference.on(where), compiled, fused, repeats)
    finally:
        torch.set_num_threads(threads)


def batched_per_s(reference: Reference, scenarios: int) -> float:
    """Scenarios per second adapting `scenarios` at once (compiled, 20 steps each), on the
    caller's torch threads."""
    many, uniforms = synthetic_batch(reference.config, scenarios, 1, reference.tables.user.device)
    with torch.no_grad():
        times = time_calls(
            lambda: adapt(
                reference.meta, reference.config, reference.tables, many, uniforms, compiled=True
            ),
            3,
        )
    return scenarios / (statistics.median(times) / 1000)


def batched_scenarios_per_s(
    scenarios: int = 64, threads: int | None = None, device: str = "cpu"
) -> float:
    """The library's batched figure (`batched_per_s`) on `threads` threads on the CPU
    (default: one per core); the caller's thread count is restored afterwards."""
    where = torch.device(device)
    before = torch.get_num_threads()
    if where.type == "cpu":
        torch.set_num_threads(threads or os.cpu_count() or 1)
    try:
        return batched_per_s(Reference.on(where), scenarios)
    finally:
        torch.set_num_threads(before)


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
    reference = Reference.on(device)
    config, meta, tables = reference.config, reference.meta, reference.tables
    figures: dict[str, object] = {"device": str(device), "parameters": layout_of(config).numel}

    # Keys name the setting asked for; `update_cell` says which cell ran (on CUDA the fused
    # cell does not apply, and adapt runs the reference cell instead).
    settings = {"reference": (False, False), "fused": (False, True), "fused_compiled": (True, True)}
    for label, (compiled, fused) in settings.items():
        timing = time_one_scenario(reference, compiled, fused, args.repeats)
        figures[f"one_scenario_{label}_ms"] = {
            "median": timing.median_ms,
            "p90": timing.p90_ms,
            "speedup_over_official": OFFICIAL_MS_PER_SCENARIO / timing.median_ms,
            "ms_per_step": timing.ms_per_step,
            "steps": timing.steps,
            "compiled": timing.compiled,
            "update_cell": timing.update_cell,
        }
    figures["fused_cell_applies"] = reference.update_cell(fused=True) == "fused"
    if device.type == "cpu":
        rate = matmul_gflops()
        flops = step_flops(config) * config.max_steps
        figures["flop_floor"] = {
            "mflop_per_adaptation": flops / 1e6,
            "matmul_gflops_one_thread": rate,
            "floor_ms": flops / (rate * 1e9) * 1000,
        }

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
        per_s = batched_per_s(reference, args.batch_scenarios)
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
