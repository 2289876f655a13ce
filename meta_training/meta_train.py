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

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import vmap

from meta_training.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from meta_training.config import MetaTrainConfig
from meta_training.embeddings import Embeddings
from meta_training.episodes import (
    EpisodeBatch,
    episode_batch,
    support_input,
    usable_episode_tasks,
)
from meta_training.errors import SettingsError
from meta_training.methods import mean_recall_at_20
from meta_training.protocol import Benchmark, EvaluationTask
from model.inner_loss import Tables, triples_loss
from model.learner import adapt, init_meta_params, layout_of
from model.learner_config import LearnerConfig
from model.params import Params
from model.recommender import RecommenderSpec
from model.scenario import adapt_scenarios, score_scenario


@dataclass
class TrainedLearner:
    meta: Params
    learner: LearnerConfig
    config: MetaTrainConfig
    best_step: int
    best_valid_recall: float
    history: list[dict[str, float]] = field(default_factory=list)


def learner_config(config: MetaTrainConfig, embedding_dim: int) -> LearnerConfig:
    return LearnerConfig.of(RecommenderSpec(config.variant, embedding_dim), config.learner)


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
        if name.startswith("update.") and config.learner.update_rule != "learned":
            continue
        if name.startswith("stop.") and config.learner.stop_rule != "learned":
            continue
        names.append(name)
    return names


class MetaObjective(nn.Module):
    """omega as module parameters, so DistributedDataParallel can average their gradients;
    `forward` runs one meta-batch and returns the loss to minimise and summed statistics."""

    def __init__(
        self,
        meta: Params,
        trainable: list[str],
        learner: LearnerConfig,
        tables: Tables,
        config: MetaTrainConfig,
    ) -> None:
        super().__init__()
        # Module names may not contain dots.
        self.weights = nn.ParameterDict(
            {
                name.replace(".", "__"): nn.Parameter(value, requires_grad=name in trainable)
                for name, value in meta.items()
            }
        )
        self.learner, self.tables, self.config = learner, tables, config
        layout = layout_of(learner)
        self.final_loss = vmap(
            lambda flat, triples: triples_loss(learner.recommender, layout, tables, flat, triples)
        )

    def meta(self) -> Params:
        return {key.replace("__", "."): value for key, value in self.weights.items()}

    def forward(self, batch: EpisodeBatch, baseline: float) -> tuple[Tensor, Tensor]:
        """Loss (mean over this process's tasks) and [test-loss sum, steps sum, reward sum,
        decisions] over them."""
        result = adapt(
            self.meta(),
            self.learner,
            self.tables,
            batch.train,
            batch.uniforms,
            batch.test,
            compiled=self.config.compiled,
        )
        test_loss = self.final_loss(result.theta, batch.test)  # [S], with the meta-gradient
        loss = test_loss.mean()
        reward = _rewards(result.test_loss)  # [S, T']
        decided = result.decided
        if self.learner.stop_rule == "learned":
            advantage = (reward - baseline) * decided
            loss = loss - (advantage * result.decision_log_prob).sum(1).mean()
        sums = torch.stack(
            [
                test_loss.detach().sum(),
                result.steps.sum().to(test_loss.dtype),
                (reward * decided).sum(),
                decided.sum().to(test_loss.dtype),
            ]
        )
        return loss, sums


def meta_train(
    benchmark: Benchmark,
    embeddings: Embeddings,
    config: MetaTrainConfig,
    seed: int,
    checkpoint_dir: Path | None = None,
    progress: Callable[[int, dict[str, float]], None] = lambda step, stats: None,
    device: torch.device | str = "cpu",
) -> TrainedLearner:
    """Meta-train; under torch.distributed each process takes an equal share of every
    meta-batch and DistributedDataParallel averages the gradients, which equals one
    process with the same global batch."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if config.meta_batch % world:
        raise SettingsError(
            f"meta_batch {config.meta_batch} is not divisible by the {world} processes"
        )
    learner = learner_config(config, embeddings.user.shape[1])
    tables = tables_of(embeddings, device)
    tasks = usable_episode_tasks(benchmark)
    if not tasks:
        raise SettingsError(
            f"{benchmark.data.name}: no meta-train scenario has two episode users "
            "(setting episode_share)"
        )
    torch.manual_seed(seed)  # entry point: nothing below draws from the global generator
    initial = init_meta_params(learner, torch.Generator().manual_seed(seed))
    objective = MetaObjective(
        {name: value.to(device) for name, value in initial.items()},
        trainable_names(initial, config),
        learner,
        tables,
        config,
    )
    model = (
        nn.parallel.DistributedDataParallel(objective, find_unused_parameters=True)
        if world > 1
        else objective
    )
    optimizer = torch.optim.Adam(
        [p for p in objective.parameters() if p.requires_grad],
        lr=config.learning_rate,
        weight_decay=config.weight_decay,
    )
    state = {"step": 0, "baseline": 0.0, "best_score": -1.0, "best_step": 0, "history": []}
    best = {name: value.detach().clone() for name, value in objective.meta().items()}
    checkpoint = checkpoint_dir / CHECKPOINT if checkpoint_dir is not None else None
    saved = load_checkpoint(checkpoint, device) if checkpoint is not None else None
    if (
        saved is not None
        and saved["config"] == config.model_dump(mode="json")
        and saved["seed"] == seed
    ):
        with torch.no_grad():
            for name, value in objective.meta().items():
                value.copy_(saved["meta"][name])
        optimizer.load_state_dict(saved["optimizer"])
        best, state = saved["best"], saved["state"]

    share = range(rank * config.meta_batch // world, (rank + 1) * config.meta_batch // world)
    while state["step"] < config.iterations:
        step = state["step"]
        # Episodes depend on (seed, step, position in the meta-batch) only: a resumed or
        # distributed run draws the same ones.
        chosen = np.random.default_rng([seed, step]).choice(len(tasks), size=config.meta_batch)
        batch = episode_batch(
            benchmark,
            [tasks[chosen[p]] for p in share],
            learner,
            config.support_size,
            config.test_size,
            [np.random.default_rng([seed, step, p]) for p in share],
            device,
        )
        loss, sums = model(batch, state["baseline"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if world > 1:
            dist.all_reduce(sums)
        test_loss_sum, steps_sum, reward_sum, decisions = sums.tolist()
        stats = {
            "test_loss": test_loss_sum / config.meta_batch,
            "steps": steps_sum / config.meta_batch,
        }
        if decisions > 0:
            state["baseline"] = config.baseline_decay * state["baseline"] + (
                1 - config.baseline_decay
            ) * (reward_sum / decisions)
        state["step"] = step + 1
        progress(state["step"], stats)

        if state["step"] % config.valid_every == 0 or state["step"] == config.iterations:
            detached = {name: value.detach() for name, value in objective.meta().items()}
            score = valid_recall(detached, learner, benchmark, tables, seed, config.compiled)
            state["history"].append({"step": state["step"], "valid_recall@20": score, **stats})
            if score > state["best_score"]:
                state["best_score"], state["best_step"] = score, state["step"]
                best = {name: value.clone() for name, value in detached.items()}
            if checkpoint is not None and rank == 0:
                save_checkpoint(checkpoint, config, seed, objective.meta(), optimizer, best, state)

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
    # Adapt every scenario in one batch, then score them one by one.
    result = adapt_scenarios(meta, learner, tables, scenarios, seed, compiled=compiled)
    theta_of = {task.scenario_id: result.theta[i] for i, task in enumerate(tasks)}
    scenario_of = {
        task.scenario_id: scenario for task, scenario in zip(tasks, scenarios, strict=True)
    }

    def score(task: EvaluationTask, users: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        theta, scenario = theta_of[task.scenario_id], scenario_of[task.scenario_id]
        return score_scenario(learner, theta, tables, scenario, users).cpu().numpy()

    return mean_recall_at_20(benchmark, tasks, score, seed)
