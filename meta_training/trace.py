"""`s2meta trace`: the paper's Figure 2 for one scenario. An artifact adapts a meta-valid or
meta-test scenario from its support set; per step we plot the training loss, the stop
probability, the evaluation users' Recall@20 at theta_t, and the mean input and forget
gates of each layer's weights."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt
import numpy as np

from meta_training.episodes import support_input
from meta_training.errors import SettingsError
from meta_training.metrics import scenario_metrics
from meta_training.prepare import prepare_for_artifact
from meta_training.protocol import ground_truth
from model.artifact import load_artifact
from model.learner import layout_of
from model.scenario import adapt_scenarios, score_scenario


def trace_scenario(
    artifact_dir: Path, data_path: Path, scenario_id: str, out: Path, cache_dir: Path
) -> dict[str, list[float]]:
    artifact = load_artifact(artifact_dir)
    metrics = artifact.metrics
    prepared = prepare_for_artifact(metrics, data_path, cache_dir)
    benchmark = prepared.benchmark
    tasks = {task.scenario_id: task for task in [*benchmark.valid, *benchmark.test]}
    if scenario_id not in tasks:
        known = ", ".join(sorted(tasks)[:20])
        raise SettingsError(
            f"--scenario {scenario_id!r}: not a meta-valid or meta-test scenario of "
            f"{benchmark.data.name} (seed {benchmark.seed}); some that are: {known}"
        )
    task = tasks[scenario_id]
    scenario = support_input(benchmark, task)
    thetas: list = []
    result = adapt_scenarios(
        artifact.meta,
        artifact.learner,
        artifact.tables,
        [scenario],
        benchmark.seed,
        thetas=thetas,
    )
    users, truth = ground_truth(benchmark, task)
    recalls = []
    for theta in thetas:
        scores = score_scenario(artifact.learner, theta[0], artifact.tables, scenario, users)
        rng = np.random.default_rng(0)
        recalls.append(scenario_metrics(scores.cpu().numpy(), truth, rng)["recall@20"])
    steps = int(result.steps[0])
    record = {
        "train_loss": result.train_loss[0].tolist(),
        "stop_probability": result.stop_probability[0].tolist(),
        "recall@20": recalls,
        "steps": [steps],
    }
    _plot(record, result, layout_of(artifact.learner).names, scenario_id, out)
    return record


def _plot(
    record: dict, result: object, names: tuple[str, ...], scenario_id: str, out: Path
) -> None:
    figure, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    steps = np.arange(1, len(record["train_loss"]) + 1)
    axes[0].plot(steps, record["train_loss"], marker="o")
    axes[0].set(title="training loss", xlabel="step")
    axes[1].plot(steps, record["stop_probability"], marker="o", color="tab:red")
    axes[1].set(title="stop probability", xlabel="step", ylim=(0, 1))
    axes[2].plot(
        np.arange(len(record["recall@20"])), record["recall@20"], marker="o", color="tab:green"
    )
    axes[2].set(title="test Recall@20", xlabel="step")
    weights = [k for k, name in enumerate(names) if name.endswith(".weight")]
    for k in weights:
        axes[3].plot(steps, result.alpha_mean[0, :, k].numpy(), label=f"input {names[k]}")
        axes[3].plot(
            steps, result.beta_mean[0, :, k].numpy(), linestyle="--", label=f"forget {names[k]}"
        )
    axes[3].set(title="mean gates per layer", xlabel="step", yscale="log")
    axes[3].legend(fontsize=6)
    figure.suptitle(f"scenario {scenario_id}: stopped after {record['steps'][0]} steps")
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)
