"""Scenario-specific learning with the meta learner (s2Meta).

theta_0 = omega_R; at each step t a batch of N triples gives the hinge loss and its gradient;
the stop controller gives p_t and, from the minimum number of steps on, the learner stops with
probability p_t (a seeded uniform draw decides, so serving is reproducible); otherwise the
update controller's gates update theta_t = beta * theta_{t-1} - alpha * grad. After max_steps
updates it stops regardless.

One code path for one scenario (S = 1) or a batch: the recommender's loss and gradient are
`torch.func.vmap(grad_and_value(...))` over each scenario's own parameters; the controllers
work elementwise, so scenarios are simply more rows for them; a mask freezes the scenarios
that stopped.
Gradients of the recommender are constants (first-order): the inner gradient is taken at a
detached theta, and the controllers' inputs and recurrent states are detached, so the meta
gradient flows through theta's update chain into omega_R and through the gates into the
update controller. The stop controller learns by REINFORCE from the recorded log-probabilities.
"""

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from model.controllers import (
    init_stop_controller,
    init_update_controller,
    stop_probability,
    update_gates,
)
from model.fused_cell import fused_update_gates
from model.inner_loss import Tables, compile_fn, recommender_losses
from model.learner_config import LearnerConfig
from model.params import ParamLayout, Params
from model.recommender import init_params


@dataclass
class AdaptResult:
    """Per scenario (leading dim S); per-step records have T' <= max_steps columns."""

    theta: Tensor  # [S, n] flat adapted parameters
    steps: Tensor  # [S] updates applied
    stopped_by_controller: Tensor  # [S] bool
    train_loss: Tensor  # [S, T'] loss at theta_{t-1}
    stop_probability: Tensor  # [S, T']
    decision_log_prob: Tensor  # [S, T'] log-prob of the stop/continue decision, 0 if none
    decided: Tensor  # [S, T'] bool: a stop decision was drawn at this step
    alpha_mean: Tensor  # [S, T', K] mean input gate per parameter tensor, NaN if no update
    beta_mean: Tensor  # [S, T', K] mean forget gate per parameter tensor, NaN if no update
    test_loss: Tensor | None = None  # [S, T' + 1] at theta_0..theta_T' (detached), if asked


def init_meta_params(config: LearnerConfig, generator: torch.Generator) -> Params:
    """omega = {omega_R: "init", omega_u: "update.*", omega_s: "stop.*"}."""
    recommender = init_params(config.recommender, generator)
    layout = ParamLayout.of(recommender)
    return {
        "init": layout.flatten(recommender),
        **init_update_controller(len(layout.names), config.controller_hidden, generator),
        **init_stop_controller(len(layout.names), config.stop_hidden, generator),
    }


@functools.cache
def layout_of(config: LearnerConfig) -> ParamLayout:
    """The recommender's parameter layout (cached: adapt and scoring ask on every call)."""
    return ParamLayout.of(init_params(config.recommender, torch.Generator().manual_seed(0)))


def adapt(
    meta: Params,
    config: LearnerConfig,
    tables: Tables,
    train: dict[str, Tensor],
    uniforms: Tensor,
    test: dict[str, Tensor] | None = None,
    *,
    compiled: bool = False,
    fused: bool = True,
    thetas: list[Tensor] | None = None,
) -> AdaptResult:
    """Adapt S scenarios at once (S = 1 for one).

    train: triples as from `sample_triples(..., shape=(max_steps, N))`, stacked to [S, T, N].
    uniforms: [S, T] draws in [0, 1) for the stop decisions.
    test: optional triples [S, M] whose hinge loss is recorded at every theta_t (detached).
    compiled: run the recommender's gradient and the differentiable update controller through
    torch.compile (same numbers to float rounding, faster after a one-off compilation).
    fused: run the update controller as the fused CPU cell wherever it applies
    (model/fused_cell.py; same numbers to float rounding, differentiable in the controller's
    weights), else the reference `update_gates`.
    thetas: if given, theta_0, theta_1, ... [S, n] are appended to it (detached), for traces.
    """
    layout = layout_of(config)
    sizes = layout.sizes
    num_scenarios = uniforms.shape[0]
    # A contiguous copy (still differentiable into omega_R), so every step sees one layout.
    theta = meta["init"].unsqueeze(0).repeat(num_scenarios, 1)
    n = theta.shape[1]
    fused_gates = (
        fused_update_gates(meta, sizes, config.controller_hidden)
        if fused and config.update_rule == "learned"
        else None
    )
    if fused_gates is not None:
        hidden = fused_gates.zero_state(num_scenarios, theta)
    else:
        hidden = theta.new_zeros(num_scenarios, n, config.controller_hidden)
    cell = torch.zeros_like(hidden)
    stop_hidden = theta.new_zeros(num_scenarios, config.stop_hidden)
    stop_cell = torch.zeros_like(stop_hidden)
    active = torch.ones(num_scenarios, dtype=torch.bool, device=theta.device)
    steps = torch.zeros(num_scenarios, dtype=torch.long, device=theta.device)
    gates_fn = fused_gates or (_compiled_update_gates() if compiled else update_gates)
    loss_and_grad, batched_loss = recommender_losses(config.recommender, compiled)
    decide, update = _compiled_step_parts() if compiled else (_decide_stop, _apply_update)
    stop_weights = {name: value for name, value in meta.items() if name.startswith("stop.")}
    never = torch.zeros_like(active)

    test_losses: list[Tensor] = []
    records: list[dict[str, Tensor]] = []
    if thetas is not None:
        thetas.append(theta.detach().clone())
    for t in range(config.max_steps):
        triples = {name: value[:, t] for name, value in train.items()}
        with torch.no_grad():  # first-order: the recommender's loss and gradient are constants
            if test is not None:
                test_losses.append(batched_loss(theta.detach(), test, tables.user, tables.item))
            grad, loss, norms = loss_and_grad(theta.detach(), triples, tables.user, tables.item)
        if config.stop_rule == "learned":
            p_stop, new_stop_hidden, new_stop_cell, decided, stop_now, log_prob = decide(
                stop_weights,
                loss,
                norms,
                stop_hidden,
                stop_cell,
                active,
                uniforms[:, t],
                t >= config.min_steps,
            )
        else:
            p_stop, log_prob = torch.zeros_like(loss), torch.zeros_like(loss)
            new_stop_hidden, new_stop_cell, decided, stop_now = stop_hidden, stop_cell, never, never
        updating = active & ~stop_now
        # Where every scenario stops at this step there is no update to make, so its gates are
        # never computed (a scenario's last step would otherwise cost a whole step). The check
        # synchronises; none stops before min_steps, nor without the stop controller, so it
        # is made only from then on and with it.
        all_stop = (
            config.stop_rule == "learned" and t >= config.min_steps and not bool(updating.any())
        )
        if all_stop:  # the update masks every scenario out: zero gates stand in
            # Two tensors, as the gates are: an alias would be a new graph to compile.
            alpha, beta = torch.zeros_like(grad), torch.zeros_like(grad)
            new_hidden, new_cell = hidden, cell
        elif config.update_rule == "learned":
            # The fused cell computes only the updating scenarios' gates (a batch's stopped
            # ones cost nothing); the reference computes all, and the update masks the rest.
            only = (updating,) if fused_gates is not None else ()
            alpha, beta, new_hidden, new_cell = gates_fn(
                meta, sizes, grad, theta.detach(), loss, hidden, cell, *only
            )
        else:
            alpha = torch.full_like(grad, config.sgd_lr)
            beta = torch.ones_like(grad)
            new_hidden, new_cell = hidden, cell
        theta, keep, record = update(
            theta,
            alpha,
            beta,
            grad,
            active,
            decided,
            stop_now,
            loss,
            p_stop,
            log_prob,
            sizes,
        )
        # First-order, and a stopped scenario never reads its states again: replace unmasked.
        hidden, cell = new_hidden.detach(), new_cell.detach()
        stop_hidden, stop_cell = new_stop_hidden.detach(), new_stop_cell.detach()
        records.append(record)
        steps = steps + keep.long()
        active = keep
        if thetas is not None:
            thetas.append(theta.detach().clone())
        if all_stop:
            break
    if test is not None:
        with torch.no_grad():
            test_losses.append(batched_loss(theta.detach(), test, tables.user, tables.item))

    stacked = {name: torch.stack([r[name] for r in records], dim=1) for name in records[0]}
    return AdaptResult(
        theta=theta,
        steps=steps,
        stopped_by_controller=stacked["stopped"].any(dim=1),
        train_loss=stacked["train_loss"],
        stop_probability=stacked["stop_probability"],
        decision_log_prob=stacked["decision_log_prob"],
        decided=stacked["decided"],
        alpha_mean=stacked["alpha_mean"],
        beta_mean=stacked["beta_mean"],
        test_loss=torch.stack(test_losses, dim=1) if test is not None else None,
    )


def _decide_stop(
    stop_weights: Params,
    loss: Tensor,
    norms: Tensor,
    hidden: Tensor,
    cell: Tensor,
    active: Tensor,
    uniform: Tensor,
    may_stop: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One step of the stop controller over the loss [S] and the per-tensor gradient norms
    [S, K]: p_stop, its new states, whether a decision was drawn, whether to stop now, and
    the decision's log-probability (for REINFORCE); all [S]."""
    p_stop, hidden, cell = stop_probability(stop_weights, loss, norms, hidden, cell)
    decided = active & may_stop
    stop_now = decided & (uniform < p_stop)
    log_prob = torch.where(stop_now, torch.log(p_stop), torch.log1p(-p_stop))
    return p_stop, hidden, cell, decided, stop_now, log_prob


def _apply_update(
    theta: Tensor,
    alpha: Tensor,
    beta: Tensor,
    grad: Tensor,
    active: Tensor,
    decided: Tensor,
    stop_now: Tensor,
    loss: Tensor,
    p_stop: Tensor,
    log_prob: Tensor,
    sizes: list[int],
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """theta_t = beta * theta_{t-1} - alpha * grad where the scenario keeps learning; returns
    it, which scenarios kept learning, and the step's records."""
    keep = active & ~stop_now
    theta = torch.where(keep[:, None], beta * theta - alpha * grad, theta)
    return (
        theta,
        keep,
        {
            "train_loss": torch.where(active, loss, torch.nan),
            "stop_probability": torch.where(active, p_stop, torch.nan),
            "decision_log_prob": torch.where(decided, log_prob, 0.0),
            "decided": decided,
            "stopped": stop_now,
            # The gates' means where an update was made, NaN elsewhere.
            "alpha_mean": torch.where(keep[:, None], _segment_means(alpha, sizes), torch.nan),
            "beta_mean": torch.where(keep[:, None], _segment_means(beta, sizes), torch.nan),
        },
    )


@functools.cache
def _compiled_step_parts() -> tuple[Callable[..., Any], Callable[..., Any]]:
    """The stop decision and the update as compiled functions: at one scenario a step's
    small-tensor work is mostly per-operation overhead, which compiling fuses away."""
    return compile_fn(_decide_stop), compile_fn(_apply_update)


def _segment_means(values: Tensor, sizes: list[int]) -> Tensor:
    """[S, K]: the mean of [S, n] over each parameter tensor's segment."""
    return torch.stack([part.mean(dim=1) for part in values.split(sizes, dim=1)], dim=1)


@functools.cache
def _compiled_update_gates() -> Callable[..., tuple[Tensor, Tensor, Tensor, Tensor]]:
    return compile_fn(update_gates)
