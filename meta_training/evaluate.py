"""Evaluate methods on the meta-test scenarios of one or more seeds and write the table."""

import json
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np

from meta_training.config import MetaTrainConfig
from meta_training.methods import MethodContext
from meta_training.metrics import METRICS, mean_and_ci, scenario_metrics
from meta_training.prepare import Prepared
from meta_training.protocol import ground_truth
from meta_training.registry import METHODS

# One bootstrap seed for every method, so their intervals resample the same scenarios.
BOOTSTRAP_SEED = 20190804


def method_rng(seed: int, method: str, scenario_id: str) -> np.random.Generator:
    return np.random.default_rng(
        [seed, zlib.crc32(method.encode()), zlib.crc32(scenario_id.encode())]
    )


def evaluate(
    prepared: list[Prepared],
    methods: list[str],
    advance: Callable[[str], None] = lambda label: None,
    split: Literal["valid", "test"] = "test",
    training: MetaTrainConfig | None = None,
) -> dict[str, object]:
    """Results shaped as in docs/protocol.md; `advance` is called after each (seed, method).

    `split="valid"` scores the meta-valid scenarios instead, for model selection.
    `training` configures the meta-trained methods (their variant and ablation settings are
    set per method on top of it).
    """
    training = training or MetaTrainConfig()
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {sorted(METHODS)}")
    per_scenario: dict[str, dict[str, list[np.ndarray]]] = {
        method: {metric: [] for metric in METRICS} for method in methods
    }
    for run in prepared:
        benchmark = run.benchmark
        context = MethodContext(benchmark, run.embeddings, training)
        tasks = getattr(benchmark, split)
        truths = [ground_truth(benchmark, task) for task in tasks]
        for method in methods:
            scorer = METHODS[method](context)
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
