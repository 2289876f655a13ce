"""The recommender's hinge loss inside adaptation: per scenario at its own flat parameters,
vmapped over scenarios that share the embedding tables, eager or through torch.compile."""

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import grad_and_value, vmap

from model.params import ParamLayout
from model.recommender import RecommenderSpec, hinge_loss, init_params

LossAndGrad = Callable[[Tensor, dict[str, Tensor], Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]
Loss = Callable[[Tensor, dict[str, Tensor], Tensor, Tensor], Tensor]

RECOMPILE_LIMIT = 64


@dataclass(frozen=True)
class Tables:
    """The fixed pretrained embeddings, [U, D] and [I, D]."""

    user: Tensor
    item: Tensor


def compile_fn(fn: Callable[..., Any]) -> Callable[..., Any]:
    """torch.compile, with room for every graph a run needs: one per recommender variant,
    autograd mode (meta-training, evaluation), batch shape and torch thread count, a dozen
    or more per function where dynamo's default limit of 8 sends the rest to eager. Dynamo's
    settings are per thread, so the limit is raised in whichever thread calls."""
    compiled = torch.compile(fn)

    def call(*args: Any, **kwargs: Any) -> Any:
        if torch._dynamo.config.recompile_limit < RECOMPILE_LIMIT:
            torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
        return compiled(*args, **kwargs)

    return call


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


@functools.cache
def recommender_losses(spec: RecommenderSpec, compiled: bool) -> tuple[LossAndGrad, Loss]:
    """(grad [S, n], loss [S], the gradient's norm per parameter tensor [S, K]) and loss [S]
    of S scenarios' hinge losses, each at its own flat parameters [S, n] on its own triples:
    vmap over the scenarios, the embedding tables (user, item) shared. All are constants to
    the meta-gradient (first-order)."""
    # Cached per recommender, not per learner config, so ablations share compiled graphs;
    # callers run them outside grad mode, since dynamo guards on it (docs/performance.md).
    layout = ParamLayout.of(init_params(spec, torch.Generator().manual_seed(0)))

    def loss_at(flat: Tensor, triples: dict[str, Tensor], user: Tensor, item: Tensor) -> Tensor:
        return triples_loss(spec, layout, Tables(user, item), flat, triples)

    in_dims = (0, 0, None, None)
    with_grad = vmap(grad_and_value(loss_at), in_dims=in_dims)
    loss_only = vmap(loss_at, in_dims=in_dims)

    def grad_and_loss(
        flat: Tensor, triples: dict[str, Tensor], user: Tensor, item: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        grad, loss = with_grad(flat, triples, user, item)
        norms = torch.stack([part.norm(dim=1) for part in grad.split(layout.sizes, dim=1)], 1)
        return grad, loss, norms

    def loss(flat: Tensor, triples: dict[str, Tensor], user: Tensor, item: Tensor) -> Tensor:
        return loss_only(flat, triples, user, item)

    if compiled:
        # Shapes stay specialised until a call differs (the scenario batch), so the layout's
        # sizes stay constants rather than guarded symbols (docs/performance.md); the tables'
        # rows are dynamic from the first call, since local tables (folded-in scenarios) have
        # a size of their own each.
        return _rows_dynamic(compile_fn(grad_and_loss)), _rows_dynamic(compile_fn(loss))
    return grad_and_loss, loss


def _rows_dynamic(compiled: Callable[..., Any]) -> Callable[..., Any]:
    """`compiled` with the embedding tables' row counts marked dynamic on every call."""

    def call(flat: Tensor, triples: dict[str, Tensor], user: Tensor, item: Tensor) -> Any:
        torch._dynamo.maybe_mark_dynamic(user, 0)
        torch._dynamo.maybe_mark_dynamic(item, 0)
        return compiled(flat, triples, user, item)

    return call
