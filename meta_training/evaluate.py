"""Evaluate methods on the meta-test scenarios of one or more seeds and write the table."""

import json
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np

from meta_training.methods import METHODS
from meta_training.metrics import METRICS, mean_and_ci, scenario_metrics
from meta_training.prepare import Prepared
from meta_training.protocol import Benchmark, EvaluationTask

# One bootstrap seed for every method, so their intervals resample the same scenarios.
BOOTSTRAP_SEED = 20190804


def ground_truth(benchmark: Benchmark, task: EvaluationTask) -> tuple[np.ndarray, np.ndarray]:
    """The evaluation users [U] and their ground truth over the pool [U, P] (bool)."""
    data = benchmark.data
    position = np.full(data.num_items, -1, dtype=np.int64)
    position[task.pool] = np.arange(len(task.pool))
    users, user_rows = np.unique(data.users[task.eval_rows], return_inverse=True)
    truth = np.zeros((len(users), len(task.pool)), dtype=bool)
    truth[user_rows, position[data.items[task.eval_rows]]] = True
    return users, truth


def method_rng(seed: int, method: str, scenario_id: str) -> np.random.Generator:
    return np.random.default_rng(
        [seed, zlib.crc32(method.encode()), zlib.crc32(scenario_id.encode())]
    )


def evaluate(
    prepared: list[Prepared],
    methods: list[str],
    advance: Callable[[str], None] = lambda label: None,
    split: Literal["valid", "test"] = "test",
) -> dict[str, object]:
    """Results shaped as README 'results.json'; `advance` is called after each (seed, method).

    `split="valid"` scores the meta-valid scenarios instead, for model selection.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {sorted(METHODS)}")
    per_scenario: dict[str, dict[str, list[np.ndarray]]] = {
        method: {metric: [] for metric in METRICS} for method in methods
    }
    for run in prepared:
        benchmark = run.benchmark
        tasks = getattr(benchmark, split)
        truths = [ground_truth(benchmark, task) for task in tasks]
        for method in methods:
            scorer = METHODS[method](benchmark, run.embeddings)
            rows = []
            for task, (users, truth) in zip(tasks, truths, strict=True):
                rng = method_rng(benchmark.seed, method, task.scenario_id)
                scores = np.asarray(scorer(task, users, rng))
                rows.append(scenario_metrics(scores, truth, rng))
            for metric in METRICS:
                per_scenario[method][metric].append(np.array([row[metric] for row in rows]))
            advance(f"seed {benchmark.seed}: {method}")

    tasks_per_seed = [getattr(run.benchmark, split) for run in prepared]
    all_tasks = [task for tasks in tasks_per_seed for task in tasks]
    eval_users = sum(
        len(np.unique(run.benchmark.data.users[task.eval_rows]))
        for run, tasks in zip(prepared, tasks_per_seed, strict=True)
        for task in tasks
    )
    return {
        "dataset": prepared[0].benchmark.data.name,
        "seeds": [run.benchmark.seed for run in prepared],
        "split": split,
        "counts": {
            "scenarios_per_seed": [len(tasks) for tasks in tasks_per_seed],
            "scenarios": len(all_tasks),
            "eval_users": eval_users,
            "eval_interactions": sum(len(task.eval_rows) for task in all_tasks),
            "support_interactions_per_scenario": float(
                np.mean([len(task.support_rows) for task in all_tasks])
            ),
        },
        "methods": {
            method: {
                metric: mean_and_ci(values, np.random.default_rng(BOOTSTRAP_SEED))
                for metric, values in metrics.items()
            }
            for method, metrics in per_scenario.items()
        },
    }


def results_markdown(results: dict[str, object]) -> str:
    counts = results["counts"]
    lines = [
        f"### {results['dataset']}",
        "",
        f"Seeds {', '.join(map(str, results['seeds']))}; {counts['scenarios']} "
        f"meta-{results['split']} scenarios in all, {counts['eval_users']:,} evaluation users, "
        f"{counts['support_interactions_per_scenario']:.0f} support interactions each. "
        "Mean over seeds, [95% bootstrap interval over scenarios].",
        "",
        "| method | " + " | ".join(METRICS) + " |",
        "|---" * (len(METRICS) + 1) + "|",
    ]
    for method, metrics in results["methods"].items():
        cells = [
            f"{m['mean']:.4f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]"
            for m in (metrics[name] for name in METRICS)
        ]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(results: dict[str, object], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "results.md").write_text(results_markdown(results))
