"""Meta-training: the paper's Algorithm 1 with a meta-batch of scenarios per step.

Per step: draw fresh episodes from meta-train scenarios, adapt (recording the test loss at
every theta_t), then
- omega_R and omega_u descend the test loss at the final theta_T by the first-order
  meta-gradient (the recommender's gradients are constants inside the unrolled updates);
- omega_s ascends REINFORCE: sum_t (Q_t - b) log pi(a_t), Q_t = L_test(theta_{t-1}) -
  L_test(theta_T), over the steps where a stop decision was drawn; b is a moving average.
Adam with the configured learning rate and weight decay. Every `valid_every` steps the meta
learner is scored on the meta-valid scenarios (Recall@20) and the best is kept: model
selection never sees a meta-test scenario.
"""

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.func import vmap

from meta_training.config import MetaTrainConfig
from meta_training.embeddings import Embeddings
from meta_training.episodes import episode_batch, support_input, usable_episode_tasks
from meta_training.errors import SettingsError
from meta_training.metrics import scenario_metrics
from meta_training.protocol import Benchmark, EvaluationTask, ground_truth
from model.learner import LearnerConfig, Tables, adapt, init_meta_params, layout_of, triples_loss
from model.params import Params
from model.recommender import RecommenderSpec
from model.scenario import adapt_scenarios, score_scenario

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainedLearner:
    meta: Params
    learner: LearnerConfig
    config: MetaTrainConfig
    best_step: int
    best_valid_recall: float
    history: list[dict[str, float]] = field(default_factory=list)


def learner_config(config: MetaTrainConfig, embedding_dim: int) -> LearnerConfig:
    return LearnerConfig(
        recommender=RecommenderSpec(config.variant, embedding_dim),
        controller_hidden=config.controller_hidden,
        batch_size=config.batch_size,
        min_steps=config.min_steps,
        max_steps=config.max_steps,
        update_rule=config.update_rule,
        sgd_lr=config.sgd_lr,
        stop_rule=config.stop_rule,
    )


def tables_of(embeddings: Embeddings, device: torch.device | str = "cpu") -> Tables:
    return Tables(
        torch.from_numpy(embeddings.user).to(device), torch.from_numpy(embeddings.item).to(device)
    )


def trainable_names(meta: Params, config: MetaTrainConfig) -> list[str]:
    """What each ablation learns: the init unless RandInit, each controller unless fixed."""
    names = []
    for name in meta:
        if name == "init" and not config.learn_init:
            continue
        if name.startswith("update.") and config.update_rule != "learned":
            continue
        if name.startswith("stop.") and config.stop_rule != "learned":
            continue
        names.append(name)
    return names


def meta_train(
    benchmark: Benchmark,
    embeddings: Embeddings,
    config: MetaTrainConfig,
    seed: int,
    checkpoint_dir: Path | None = None,
    progress: Callable[[int, dict[str, float]], None] = lambda step, stats: None,
    device: torch.device | str = "cpu",
) -> TrainedLearner:
    learner = learner_config(config, embeddings.user.shape[1])
    tables = tables_of(embeddings, device)
    tasks = usable_episode_tasks(benchmark)
    if not tasks:
        raise SettingsError(
            f"{benchmark.data.name}: no meta-train scenario has two episode users "
            "(setting episode_share)"
        )
    torch.manual_seed(seed)  # entry point: nothing below draws from the global generator
    meta = {
        name: value.to(device).requires_grad_(True)
        for name, value in init_meta_params(learner, torch.Generator().manual_seed(seed)).items()
    }
    names = trainable_names(meta, config)
    optimizer = torch.optim.Adam(
        [meta[name] for name in names],
        lr=config.learning_rate,
        weight_decay=config.weight_decay,
    )
    state = {"step": 0, "baseline": 0.0, "best_score": -1.0, "best_step": 0, "history": []}
    best = {name: value.detach().clone() for name, value in meta.items()}
    checkpoint = checkpoint_dir / CHECKPOINT if checkpoint_dir is not None else None
    if checkpoint is not None and checkpoint.is_file():
        saved = torch.load(checkpoint, weights_only=False, map_location=device)
        if saved["config"] == config.model_dump() and saved["seed"] == seed:
            with torch.no_grad():
                for name, value in saved["meta"].items():
                    meta[name].copy_(value)
            optimizer.load_state_dict(saved["optimizer"])
            best, state = saved["best"], saved["state"]

    layout = layout_of(learner)
    final_loss = vmap(lambda flat, triples: triples_loss(learner, layout, tables, flat, triples))
    while state["step"] < config.iterations:
        step = state["step"]
        # Episodes depend on (seed, step) only, so a resumed run draws the same ones.
        rng = np.random.default_rng([seed, step])
        chosen = [tasks[i] for i in rng.choice(len(tasks), size=config.meta_batch)]
        batch = episode_batch(
            benchmark, chosen, learner, config.support_size, config.test_size, rng, device
        )
        result = adapt(
            meta,
            learner,
            tables,
            batch.train,
            batch.uniforms,
            batch.test,
            compiled=config.compiled,
        )
        test_loss = final_loss(result.theta, batch.test)  # [S], with the meta-gradient
        loss = test_loss.mean()
        stats = {"test_loss": loss.item(), "steps": result.steps.float().mean().item()}
        if config.stop_rule == "learned":
            reward = _rewards(result.test_loss)  # [S, T']
            decided = result.decided
            advantage = (reward - state["baseline"]) * decided
            loss = loss - (advantage * result.decision_log_prob).sum(1).mean()
            if decided.any():
                mean_reward = float(reward[decided].mean())
                state["baseline"] = (
                    config.baseline_decay * state["baseline"]
                    + (1 - config.baseline_decay) * mean_reward
                )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        state["step"] = step + 1
        progress(state["step"], stats)

        if state["step"] % config.valid_every == 0 or state["step"] == config.iterations:
            detached = {name: value.detach() for name, value in meta.items()}
            score = valid_recall(detached, learner, benchmark, tables, seed, config.compiled)
            state["history"].append({"step": state["step"], "valid_recall@20": score, **stats})
            if score > state["best_score"]:
                state["best_score"], state["best_step"] = score, state["step"]
                best = {name: value.clone() for name, value in detached.items()}
            if checkpoint is not None:
                _save_checkpoint(checkpoint, config, seed, meta, optimizer, best, state)

    best = {name: value.cpu() for name, value in best.items()}
    return TrainedLearner(
        best, learner, config, state["best_step"], state["best_score"], state["history"]
    )


def _rewards(test_losses: Tensor) -> Tensor:
    """Q_t = L_test(theta_{t-1}) - L_test(theta_T) for each step t: [S, T'] from [S, T'+1]."""
    return test_losses[:, :-1] - test_losses[:, -1:]


def valid_recall(
    meta: Params,
    learner: LearnerConfig,
    benchmark: Benchmark,
    tables: Tables,
    seed: int,
    compiled: bool = False,
    tasks: list[EvaluationTask] | None = None,
) -> float:
    """Mean Recall@20 over meta-valid scenarios (or the given tasks)."""
    tasks = benchmark.valid if tasks is None else tasks
    scenarios = [support_input(benchmark, task) for task in tasks]
    result = adapt_scenarios(meta, learner, tables, scenarios, seed, compiled=compiled)
    recalls = []
    for index, (task, scenario) in enumerate(zip(tasks, scenarios, strict=True)):
        users, truth = ground_truth(benchmark, task)
        scores = score_scenario(learner, result.theta[index], tables, scenario, users)
        scores = scores.cpu().numpy()
        rng = np.random.default_rng([seed, index])
        recalls.append(scenario_metrics(scores, truth, rng)["recall@20"])
    return float(np.mean(recalls))


def _save_checkpoint(
    path: Path,
    config: MetaTrainConfig,
    seed: int,
    meta: Params,
    optimizer: torch.optim.Optimizer,
    best: Params,
    state: dict[str, object],
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".tmp")
    torch.save(
        {
            "config": config.model_dump(),
            "seed": seed,
            "meta": {name: value.detach() for name, value in meta.items()},
            "optimizer": optimizer.state_dict(),
            "best": best,
            "state": copy.deepcopy(state),
        },
        staging,
    )
    staging.replace(path)
