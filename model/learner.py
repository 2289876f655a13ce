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
from typing import Literal

import torch
from torch import Tensor
from torch.func import grad_and_value, vmap

from model.controllers import (
    init_stop_controller,
    init_update_controller,
    stop_probability,
    update_gates,
)
from model.fused_cell import fused_update_gates
from model.params import ParamLayout, Params
from model.recommender import RecommenderSpec, hinge_loss, init_params

UpdateRule = Literal["learned", "sgd"]
StopRule = Literal["learned", "max_steps"]


@dataclass(frozen=True)
class LearnerConfig:
    recommender: RecommenderSpec
    controller_hidden: int = 16
    stop_hidden: int = 16
    batch_size: int = 128
    min_steps: int = 4
    max_steps: int = 20
    # Ablations: "sgd" is a fixed learning rate (FixedLr), "max_steps" never stops early
    # (FixedStep).
    update_rule: UpdateRule = "learned"
    sgd_lr: float = 0.01
    stop_rule: StopRule = "learned"


@dataclass(frozen=True)
class Tables:
    """The fixed pretrained embeddings, [U, D] and [I, D]."""

    user: Tensor
    item: Tensor


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
    alpha_mean: Tensor  # [S, T', K] mean input gate per parameter tensor
    beta_mean: Tensor  # [S, T', K] mean forget gate per parameter tensor
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
    hidden = theta.new_zeros(num_scenarios, n, config.controller_hidden)
    cell = torch.zeros_like(hidden)
    stop_hidden = theta.new_zeros(num_scenarios, config.stop_hidden)
    stop_cell = torch.zeros_like(stop_hidden)
    active = torch.ones(num_scenarios, dtype=torch.bool, device=theta.device)
    steps = torch.zeros(num_scenarios, dtype=torch.long, device=theta.device)
    fused_gates = (
        fused_update_gates(meta, sizes, config.controller_hidden)
        if fused and config.update_rule == "learned"
        else None
    )
    gates_fn = fused_gates or (_compiled_update_gates() if compiled else update_gates)
    loss_and_grad, batched_loss = _recommender_losses(config.recommender, compiled)

    test_losses: list[Tensor] = []
    records: list[dict[str, Tensor]] = []
    if thetas is not None:
        thetas.append(theta.detach().clone())
    for t in range(config.max_steps):
        triples = {name: value[:, t] for name, value in train.items()}
        with torch.no_grad():  # first-order: the recommender's loss and gradient are constants
            if test is not None:
                test_losses.append(batched_loss(theta.detach(), test, tables.user, tables.item))
            grad, loss = loss_and_grad(theta.detach(), triples, tables.user, tables.item)
        norms = torch.stack([part.norm(dim=1) for part in torch.split(grad, sizes, dim=1)], 1)
        if config.stop_rule == "learned":
            p_stop, new_stop_hidden, new_stop_cell = stop_probability(
                meta, loss, norms, stop_hidden, stop_cell
            )
        else:
            p_stop = torch.zeros_like(loss)
            new_stop_hidden, new_stop_cell = stop_hidden, stop_cell
        decided = active & (t >= config.min_steps) & (config.stop_rule == "learned")
        stop_now = decided & (uniforms[:, t] < p_stop)
        if config.update_rule == "learned":
            alpha, beta, new_hidden, new_cell = gates_fn(
                meta, sizes, grad, theta.detach(), loss, hidden, cell
            )
        else:
            alpha = torch.full_like(grad, config.sgd_lr)
            beta = torch.ones_like(grad)
            new_hidden, new_cell = hidden, cell
        keep = active & ~stop_now
        theta = torch.where(keep[:, None], beta * theta - alpha * grad, theta)
        # Recurrent states carry no gradient from step to step (first-order). While every
        # scenario still learns (the common case) the masked copy of the large states is
        # skipped.
        if bool(keep.all()):
            hidden, cell = new_hidden.detach(), new_cell.detach()
        else:
            hidden = torch.where(keep[:, None, None], new_hidden.detach(), hidden)
            cell = torch.where(keep[:, None, None], new_cell.detach(), cell)
        stop_hidden = torch.where(keep[:, None], new_stop_hidden.detach(), stop_hidden)
        stop_cell = torch.where(keep[:, None], new_stop_cell.detach(), stop_cell)
        log_prob = torch.where(stop_now, torch.log(p_stop), torch.log1p(-p_stop))
        records.append(
            {
                "train_loss": torch.where(active, loss, torch.nan),
                "stop_probability": torch.where(active, p_stop, torch.nan),
                "decision_log_prob": torch.where(decided, log_prob, 0.0),
                "decided": decided,
                "stopped": stop_now,
                "alpha_mean": _segment_means(alpha, layout),
                "beta_mean": _segment_means(beta, layout),
            }
        )
        steps = steps + keep.long()
        active = keep
        if thetas is not None:
            thetas.append(theta.detach().clone())
        if not bool(active.any()):
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


def _segment_means(values: Tensor, layout: ParamLayout) -> Tensor:
    """[S, K] mean of [S, n] over each parameter tensor's segment."""
    return values @ _segment_averaging(layout, values.dtype, values.device)


@functools.cache
def _segment_averaging(layout: ParamLayout, dtype: torch.dtype, device: torch.device) -> Tensor:
    """[n, K]: column k averages segment k (one matmul instead of K reductions)."""
    one_hot = torch.nn.functional.one_hot(layout.segment_ids(), len(layout.names)).to(dtype)
    return (one_hot / torch.tensor(layout.sizes, dtype=dtype)).to(device)


@functools.cache
def _recommender_losses(
    spec: RecommenderSpec, compiled: bool
) -> tuple[
    Callable[[Tensor, dict[str, Tensor], Tensor, Tensor], tuple[Tensor, Tensor]],
    Callable[[Tensor, dict[str, Tensor], Tensor, Tensor], Tensor],
]:
    """(grad [S, n], loss [S]) and loss [S] of S scenarios' hinge losses, each at its own flat
    parameters [S, n] on its own triples: vmap over the scenarios, the embedding tables
    (user, item) shared. Both are constants to the meta-gradient (first-order)."""
    # One pair per recommender (not per learner config, so ablations share the compiled
    # graphs), each its own function; `adapt` calls them without autograd's grad mode
    # (torch.func.grad differentiates regardless, and dynamo guards on the mode), so
    # torch.compile compiles each once per recommender and batch shape, within its recompile
    # limit.
    layout = ParamLayout.of(init_params(spec, torch.Generator().manual_seed(0)))

    def loss_at(flat: Tensor, triples: dict[str, Tensor], user: Tensor, item: Tensor) -> Tensor:
        return triples_loss(spec, layout, Tables(user, item), flat, triples)

    in_dims = (0, 0, None, None)
    with_grad = vmap(grad_and_value(loss_at), in_dims=in_dims)
    loss_only = vmap(loss_at, in_dims=in_dims)

    def grad_and_loss(
        flat: Tensor, triples: dict[str, Tensor], user: Tensor, item: Tensor
    ) -> tuple[Tensor, Tensor]:
        return with_grad(flat, triples, user, item)

    def loss(flat: Tensor, triples: dict[str, Tensor], user: Tensor, item: Tensor) -> Tensor:
        return loss_only(flat, triples, user, item)

    if compiled:
        # Dynamic shapes: the batch of scenarios changes (meta-batch, validation, serving).
        return torch.compile(grad_and_loss, dynamic=True), torch.compile(loss, dynamic=True)
    return grad_and_loss, loss


@functools.cache
def _compiled_update_gates() -> Callable[..., tuple[Tensor, Tensor, Tensor, Tensor]]:
    return torch.compile(update_gates)


def triples_loss(
    spec: RecommenderSpec,
    layout: ParamLayout,
    tables: Tables,
    flat: Tensor,
    triples: dict[str, Tensor],
) -> Tensor:
    """Hinge loss of one scenario's flat parameters [n] on its triples [M]."""
    return hinge_loss(
        spec,
        layout.unflatten(flat),
        tables.user[triples["users"]],
        tables.item[triples["positives"]],
        tables.item[triples["negatives"]],
        triples["positive_pop"],
        triples["negative_pop"],
    )
