"""The recommender variants and triple sampling."""

import numpy as np
import pytest
import torch

from model.params import ParamLayout
from model.recommender import (
    RecommenderSpec,
    hinge_loss,
    init_params,
    pool_first_layer,
    score,
    score_pool,
)
from model.sampling import pool_popularity, sample_triples


def test_interaction_variant_has_the_reference_parameter_count():
    params = init_params(RecommenderSpec("interaction", 64), torch.Generator().manual_seed(0))
    assert ParamLayout.of(params).numel == 10_881  # 128 -> 64 -> 32 -> 16 -> 1


@pytest.mark.parametrize("variant", ["mapping", "hybrid"])
def test_mapping_and_hybrid_start_as_the_dot_product(variant):
    spec = RecommenderSpec(variant, 8)
    params = init_params(spec, torch.Generator().manual_seed(0))
    users, items = torch.randn(5, 8), torch.randn(5, 8)
    dot = (users * items).sum(-1)
    torch.testing.assert_close(
        score(spec, params, users, items, torch.zeros(5)), dot, atol=0.05, rtol=0.0
    )


def test_hybrid_uses_popularity_through_its_weight():
    spec = RecommenderSpec("hybrid", 8)
    params = init_params(spec, torch.Generator().manual_seed(0))
    users, items, pop = torch.randn(4, 8), torch.randn(4, 8), torch.tensor([0.0, 1.0, 2.0, 3.0])
    base = score(spec, params, users, items, pop)
    params["pop_weight"] = torch.tensor(0.5)
    torch.testing.assert_close(score(spec, params, users, items, pop) - base, 0.5 * pop)


@pytest.mark.parametrize("variant", ["interaction", "mapping", "hybrid"])
def test_score_pool_equals_pairwise_scores(variant):
    spec = RecommenderSpec(variant, 8)
    generator = torch.Generator().manual_seed(0)
    # Every parameter away from its initial value, so each term of the score counts (the
    # hybrid starts with no popularity weight, the towers with zero last layers).
    params = {
        name: value + 0.3 * torch.randn(value.shape, generator=generator)
        for name, value in init_params(spec, generator).items()
    }
    users, pool, pop = torch.randn(3, 8), torch.randn(7, 8), torch.rand(7)
    with torch.no_grad():
        matrices = [score_pool(spec, params, users, pool, pop)]
        if variant != "mapping":
            pool_half = pool_first_layer(params, pool)
            matrices.append(score_pool(spec, params, users, pool, pop, pool_half))
    for matrix in matrices:
        for u in range(3):
            expected = score(spec, params, users[u].expand(7, 8), pool, pop)
            torch.testing.assert_close(matrix[u], expected, rtol=1e-5, atol=1e-5)


def test_triples_negatives_come_from_the_pool_and_are_not_positives():
    rng = np.random.default_rng(0)
    pool = np.arange(10, 30)
    users = np.array([0, 0, 0, 1, 1, 2])
    items = np.array([10, 11, 12, 10, 13, 29])
    triples = sample_triples(users, items, pool, (50, 16), rng)
    assert triples.users.shape == (50, 16)
    positives = set(zip(users.tolist(), items.tolist(), strict=True))
    for u, pos, neg in zip(
        triples.users.flatten().tolist(),
        triples.positives.flatten().tolist(),
        triples.negatives.flatten().tolist(),
        strict=True,
    ):
        assert (u, pos) in positives
        assert neg in set(pool.tolist()) and (u, neg) not in positives


def reference_triples(users, items, pool, shape, rng, popularity_items=None):
    """sample_triples as defined, plainly: the draws (and so every published result) must
    not change with its implementation."""
    picks = rng.integers(0, len(users), size=shape)
    triple_users, positives = users[picks], items[picks]
    negatives = pool[rng.integers(0, len(pool), size=shape)]
    known = {(int(u), int(i)) for u, i in zip(users, items, strict=True)}
    for _ in range(20):
        clash = np.array(
            [
                (int(u), int(n)) in known
                for u, n in zip(triple_users.flat, negatives.flat, strict=True)
            ]
        ).reshape(shape)
        if not clash.any():
            break
        negatives[clash] = pool[rng.integers(0, len(pool), size=int(clash.sum()))]
    counted = items if popularity_items is None else popularity_items
    counts = {int(i): float((counted == i).sum()) for i in pool}
    own = 1.0 if popularity_items is None else 0.0
    positive_pop = np.log1p([counts[int(i)] - own for i in positives.flat]).reshape(shape)
    negative_pop = np.log1p([counts[int(i)] for i in negatives.flat]).reshape(shape)
    return triple_users, positives, negatives, positive_pop, negative_pop


NAMES = ("users", "positives", "negatives", "positive_pop", "negative_pop")


@pytest.mark.parametrize("case", range(12))
def test_triples_are_drawn_as_defined(case):
    setup = np.random.default_rng(case)
    pool = np.sort(setup.choice(200, size=int(setup.integers(2, 40)), replace=False))
    users = setup.integers(0, 6, size=int(setup.integers(1, 30)))  # few users: many clashes
    items = pool[setup.integers(0, len(pool), size=len(users))]
    popularity_items = items[: max(1, len(items) // 2)] if case % 3 == 0 else None
    drawn = sample_triples(
        users, items, pool, (5, 17), np.random.default_rng(case), popularity_items
    )
    expected = reference_triples(
        users, items, pool, (5, 17), np.random.default_rng(case), popularity_items
    )
    got = (drawn.users, drawn.positives, drawn.negatives, drawn.positive_pop, drawn.negative_pop)
    for name, value, want in zip(NAMES, got, expected, strict=True):
        np.testing.assert_allclose(value.numpy(), want, rtol=1e-6, err_msg=name)


def test_popularity_leaves_the_positive_itself_out():
    rng = np.random.default_rng(0)
    pool = np.arange(5)
    users = np.array([0, 1, 2, 3])
    items = np.array([0, 0, 0, 1])  # item 0 three times, item 1 once
    triples = sample_triples(users, items, pool, (200,), rng)
    expected = {0: np.log1p(2.0), 1: 0.0}
    for pos, pop in zip(triples.positives.tolist(), triples.positive_pop.tolist(), strict=True):
        assert pop == pytest.approx(expected[pos])
    np.testing.assert_allclose(pool_popularity(items, pool), np.log1p([3, 1, 0, 0, 0]))


def test_training_items_outside_the_pool_are_refused():
    with pytest.raises(ValueError, match="pool"):
        sample_triples(np.array([0]), np.array([99]), np.arange(5), (4,), np.random.default_rng(0))


@pytest.mark.parametrize("variant", ["interaction", "hybrid"])
def test_scores_and_hinge_loss_follow_the_concatenated_definition(variant):
    """The first layer runs as a user half and an item half: the scores still equal the MLP
    on [e_u, e_i], and the hinge loss the mean of max(0, 1 - f(u, i) + f(u, i-))."""
    spec = RecommenderSpec(variant, 8)
    generator = torch.Generator().manual_seed(1)
    params = {
        name: value + torch.randn(value.shape, generator=generator) * 0.1
        for name, value in init_params(spec, generator).items()
    }
    user, positive, negative = (torch.randn(5, 8, generator=generator) for _ in range(3))
    positive_pop, negative_pop = torch.rand(5, generator=generator), torch.rand(5)

    def by_definition(item: torch.Tensor, pop: torch.Tensor) -> torch.Tensor:
        x = torch.cat([user, item], dim=-1)
        layers = len(spec.mlp_widths()) - 1
        for layer in range(layers):
            x = x @ params[f"mlp.{layer}.weight"] + params[f"mlp.{layer}.bias"]
            x = torch.relu(x) if layer < layers - 1 else x
        mlp = x.squeeze(-1)
        if variant == "interaction":
            return mlp
        return params["dot_scale"] * (user * item).sum(-1) + params["pop_weight"] * pop + mlp

    want_positive = by_definition(positive, positive_pop)
    torch.testing.assert_close(score(spec, params, user, positive, positive_pop), want_positive)
    want_loss = torch.relu(1 - want_positive + by_definition(negative, negative_pop)).mean()
    loss = hinge_loss(spec, params, user, positive, negative, positive_pop, negative_pop)
    assert want_loss > 0
    torch.testing.assert_close(loss, want_loss)
