"""The recommender f_c: scores (user, item) pairs from fixed pretrained embeddings e_u, e_i;
only its own layers are adapted per scenario.

Variants:
- interaction: [e_u, e_i] -> 3 hidden ReLU layers, each half the width of the one before
  (128 -> 64 -> 32 -> 16 for 64-dim embeddings) -> linear score (the paper's f_c).
- mapping: residual user and item towers e + MLP(e), the MLPs' last layers starting at zero,
  and the dot product of the two: starts as the plain dot product, stays searchable (item
  vectors can be indexed, the user vector is the query).
- hybrid: scale * <e_u, e_i> + w_pop * pop_i + MLP([e_u, e_i]) with the MLP's last layer
  starting near zero, where pop_i = log(1 + the item's count in the scenario's training
  interactions). The popularity term is ours, beyond the paper: with 64 interactions a
  scenario's popularity is its strongest signal, and an MLP fed two embeddings does not
  recover their dot product.
"""

import itertools
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from model.params import Params

Variant = Literal["interaction", "mapping", "hybrid"]
VARIANTS: tuple[Variant, ...] = ("interaction", "mapping", "hybrid")


@dataclass(frozen=True)
class RecommenderSpec:
    variant: Variant
    embedding_dim: int

    def mlp_widths(self) -> list[int]:
        """Interaction/hybrid MLP: 2D -> D -> D/2 -> D/4 -> 1."""
        d = self.embedding_dim
        return [2 * d, d, max(d // 2, 1), max(d // 4, 1), 1]

    def tower_widths(self) -> list[int]:
        d = self.embedding_dim
        return [d, d, d]


def init_params(spec: RecommenderSpec, generator: torch.Generator) -> Params:
    """Fresh parameters; the shared initialisation omega_R starts from these."""
    params: Params = {}
    if spec.variant in ("interaction", "hybrid"):
        params |= _mlp("mlp", spec.mlp_widths(), generator)
        if spec.variant == "hybrid":
            # The residual starts near zero so the hybrid starts as the scaled dot product.
            last = f"mlp.{len(spec.mlp_widths()) - 2}"
            params[f"{last}.weight"] = params[f"{last}.weight"] * 1e-3
            params["dot_scale"] = torch.ones(())
            params["pop_weight"] = torch.zeros(())
    else:
        for side in ("user", "item"):
            tower = _mlp(f"{side}_tower", spec.tower_widths(), generator)
            tower[f"{side}_tower.1.weight"] = torch.zeros_like(tower[f"{side}_tower.1.weight"])
            params |= tower
    return params


def _mlp(prefix: str, widths: list[int], generator: torch.Generator) -> Params:
    params: Params = {}
    for layer, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        bound = math.sqrt(6.0 / fan_in)  # He (Kaiming) uniform, for ReLU layers
        weight = (torch.rand(fan_in, fan_out, generator=generator) * 2 - 1) * bound
        params[f"{prefix}.{layer}.weight"] = weight
        params[f"{prefix}.{layer}.bias"] = torch.zeros(fan_out)
    return params


def _apply_mlp(params: Params, prefix: str, x: Tensor, layers: int) -> Tensor:
    for layer in range(layers):
        x = x @ params[f"{prefix}.{layer}.weight"] + params[f"{prefix}.{layer}.bias"]
        if layer < layers - 1:
            x = torch.relu(x)
    return x


def user_vector(spec: RecommenderSpec, params: Params, user: Tensor) -> Tensor:
    """Mapping variant: the user tower's output [..., D], the retrieval query."""
    return user + _apply_mlp(params, "user_tower", user, len(spec.tower_widths()) - 1)


def item_vector(spec: RecommenderSpec, params: Params, item: Tensor) -> Tensor:
    """Mapping variant: the item tower's output [..., D], what the index stores."""
    return item + _apply_mlp(params, "item_tower", item, len(spec.tower_widths()) - 1)


def pool_first_layer(params: Params, pool: Tensor) -> Tensor:
    """Interaction and hybrid variants: the pool's half of the MLP's first layer, [P, D] from
    pool [P, D]. It does not depend on the user, so serving computes it once per adapted
    scenario rather than per request."""
    return pool @ params["mlp.0.weight"][pool.shape[-1] :]


def _first_layer_halves(params: Params, user: Tensor, item: Tensor) -> tuple[Tensor, Tensor]:
    """The MLP's first layer on [e_u, e_i] split into its user and item halves,
    [e_u, e_i] @ W + b = (e_u @ W_u + b) + e_i @ W_i: a user's half is computed once for all
    the items it meets (both items of a triple, a whole pool), and the first layer is three
    quarters of the MLP's work."""
    user_half = user @ params["mlp.0.weight"][: user.shape[-1]] + params["mlp.0.bias"]
    return user_half, pool_first_layer(params, item)


def _mlp_variant_scores(
    spec: RecommenderSpec, params: Params, first: Tensor, dot: Tensor, item_pop: Tensor
) -> Tensor:
    """Interaction and hybrid scores from the first layer's output (before its ReLU) and,
    for the hybrid, the embeddings' dot product and the items' log-counts."""
    x = first
    for layer in range(1, len(spec.mlp_widths()) - 1):
        x = torch.relu(x) @ params[f"mlp.{layer}.weight"] + params[f"mlp.{layer}.bias"]
    mlp = x.squeeze(-1)
    if spec.variant == "interaction":
        return mlp
    return params["dot_scale"] * dot + params["pop_weight"] * item_pop + mlp


def score(
    spec: RecommenderSpec, params: Params, user: Tensor, item: Tensor, item_pop: Tensor
) -> Tensor:
    """Scores [...] of pairs: user, item [..., D] embeddings, item_pop [...] log-counts."""
    if spec.variant == "mapping":
        return (user_vector(spec, params, user) * item_vector(spec, params, item)).sum(-1)
    user_half, item_half = _first_layer_halves(params, user, item)
    dot = (user * item).sum(-1)
    return _mlp_variant_scores(spec, params, user_half + item_half, dot, item_pop)


def hinge_loss(
    spec: RecommenderSpec,
    params: Params,
    user: Tensor,
    positive: Tensor,
    negative: Tensor,
    positive_pop: Tensor,
    negative_pop: Tensor,
) -> Tensor:
    """mean over the batch of max(0, 1 - f(u, i) + f(u, i-)); inputs [N, D] and [N]."""
    if spec.variant == "mapping":
        margin = score(spec, params, user, positive, positive_pop) - score(
            spec, params, user, negative, negative_pop
        )
    else:
        # The user's half of the first layer once for both items of the triple.
        user_half, positive_half = _first_layer_halves(params, user, positive)
        negative_half = negative @ params["mlp.0.weight"][user.shape[-1] :]
        margin = _mlp_variant_scores(
            spec, params, user_half + positive_half, (user * positive).sum(-1), positive_pop
        ) - _mlp_variant_scores(
            spec, params, user_half + negative_half, (user * negative).sum(-1), negative_pop
        )
    return torch.relu(1.0 - margin).mean()


def score_pool(
    spec: RecommenderSpec,
    params: Params,
    users: Tensor,
    pool: Tensor,
    pool_pop: Tensor,
    pool_half: Tensor | None = None,
) -> Tensor:
    """Scores [U, P] of every user against every pool item: users [U, D], pool [P, D],
    pool_pop [P]; pool_half: pool_first_layer(params, pool) when computed before.

    For inference only (call it without gradients): the same function as `score`, but with
    activations in place and biases fused into the matrix products, since ranking a pool is
    the service's hot path (and evaluation's); tests/test_recommender.py holds the two equal.
    """
    if spec.variant == "mapping":
        return user_vector(spec, params, users) @ item_vector(spec, params, pool).T
    if pool_half is None:
        pool_half = pool_first_layer(params, pool)
    weight = params["mlp.0.weight"]
    user_half = torch.addmm(params["mlp.0.bias"], users, weight[: users.shape[-1]])
    x = (user_half[:, None, :] + pool_half[None, :, :]).flatten(0, 1).relu_()  # [U * P, D]
    layers = len(spec.mlp_widths()) - 1
    for layer in range(1, layers):
        x = torch.addmm(params[f"mlp.{layer}.bias"], x, params[f"mlp.{layer}.weight"])
        if layer < layers - 1:
            x = x.relu_()
    scores = x.view(users.shape[0], pool.shape[0])
    if spec.variant == "interaction":
        return scores
    # scale * <e_u, e_i> + w_pop * pop_i, added into the MLP's scores.
    scores.addmm_(users * params["dot_scale"], pool.T)
    return scores.add_(params["pop_weight"] * pool_pop)
