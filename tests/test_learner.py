"""The meta learner: one code path for one or many scenarios, the stop rules, the update
rule, and where the meta-gradient flows."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from model.controllers import preprocess, update_gates
from model.inner_loss import Tables, triples_loss
from model.learner import adapt, init_meta_params, layout_of
from model.learner_config import LearnerConfig
from model.recommender import RecommenderSpec
from model.sampling import sample_triples

D = 16


def make_config(variant="interaction", **changes) -> LearnerConfig:
    return dataclasses.replace(LearnerConfig(RecommenderSpec(variant, D)), **changes)


@pytest.fixture(scope="module")
def tables() -> Tables:
    generator = torch.Generator().manual_seed(1)
    return Tables(torch.randn(60, D, generator=generator), torch.randn(300, D, generator=generator))


def scenario_batches(config: LearnerConfig, count: int, seed: int = 0, test_size: int = 0):
    rng = np.random.default_rng(seed)
    train, test = [], []
    for _ in range(count):
        pool = np.sort(rng.choice(300, size=80, replace=False))
        users = rng.integers(0, 60, size=64)
        items = pool[rng.integers(0, 80, size=64)]
        train.append(
            sample_triples(users, items, pool, (config.max_steps, config.batch_size), rng).as_dict()
        )
        if test_size:
            test.append(sample_triples(users, items, pool, (test_size,), rng).as_dict())
    stack = lambda parts: {k: torch.stack([p[k] for p in parts]) for k in parts[0]}  # noqa: E731
    return stack(train), (stack(test) if test_size else None)


def test_preprocess_matches_its_definition():
    x = torch.tensor([2.0, -0.5, 1e-6, -1e-6, 0.0])
    expected = []
    for value in x.tolist():
        if abs(value) >= math.exp(-10):
            expected.append([math.log(abs(value)) / 10, math.copysign(1.0, value)])
        else:
            expected.append([-1.0, math.exp(10) * value])
    torch.testing.assert_close(preprocess(x), torch.tensor(expected))


@pytest.mark.parametrize("variant", ["interaction", "mapping", "hybrid"])
def test_a_batch_of_scenarios_equals_each_scenario_alone(tables, variant):
    config = make_config(variant)
    meta = init_meta_params(config, torch.Generator().manual_seed(0))
    train, _ = scenario_batches(config, 3)
    uniforms = torch.rand(3, config.max_steps, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        together = adapt(meta, config, tables, train, uniforms)
        for s in range(3):
            alone = adapt(
                meta,
                config,
                tables,
                {k: v[s : s + 1] for k, v in train.items()},
                uniforms[s : s + 1],
            )
            torch.testing.assert_close(alone.theta[0], together.theta[s], rtol=1e-5, atol=1e-6)
            assert alone.steps[0] == together.steps[s]
            steps = alone.train_loss.shape[1]
            torch.testing.assert_close(alone.train_loss[0], together.train_loss[s, :steps])


def test_stop_rules(tables):
    config = make_config()
    meta = init_meta_params(config, torch.Generator().manual_seed(0))
    train, _ = scenario_batches(config, 2)
    with torch.no_grad():
        eager = adapt(meta, config, tables, train, torch.zeros(2, config.max_steps))
        never = adapt(meta, config, tables, train, torch.ones(2, config.max_steps))
        fixed = adapt(
            meta,
            make_config(stop_rule="max_steps"),
            tables,
            train,
            torch.zeros(2, config.max_steps),
        )
    # A draw of 0 stops at the first chance, which is after min_steps updates.
    assert eager.steps.tolist() == [config.min_steps] * 2
    assert eager.stopped_by_controller.all()
    assert not eager.decided[:, : config.min_steps].any()
    assert never.steps.tolist() == [config.max_steps] * 2
    assert not never.stopped_by_controller.any()
    assert fixed.steps.tolist() == [config.max_steps] * 2 and not fixed.decided.any()


def test_gates_are_computed_only_for_the_updates_made(tables, monkeypatch):
    config = make_config()
    meta = init_meta_params(config, torch.Generator().manual_seed(0))
    train, _ = scenario_batches(config, 2)
    calls = []

    def counted_gates(*args):
        calls.append(args[2].shape[0])  # the scenarios in the call
        return update_gates(*args)

    monkeypatch.setattr("model.learner.update_gates", counted_gates)
    # The first scenario stops at its first chance; the second never does.
    uniforms = torch.stack([torch.zeros(config.max_steps), torch.ones(config.max_steps)])
    with torch.no_grad():
        both = adapt(meta, config, tables, train, uniforms, fused=False)
        calls_both = len(calls)
        first = {k: v[:1] for k, v in train.items()}
        alone = adapt(meta, config, tables, first, uniforms[:1], fused=False)
    assert both.steps.tolist() == [config.min_steps, config.max_steps]
    assert calls_both == config.max_steps
    # Alone, the step at which it stops (its loss recorded, its stop drawn) has no gates.
    assert len(calls) - calls_both == config.min_steps
    assert alone.train_loss.shape[1] == config.min_steps + 1 and alone.stopped_by_controller[0]
    torch.testing.assert_close(alone.theta[0], both.theta[0], rtol=1e-5, atol=1e-6)
    for result in (both, alone):
        made = torch.arange(result.alpha_mean.shape[1])[None, :] < result.steps[:, None]
        assert torch.equal(result.alpha_mean.isfinite().all(dim=2), made)
        assert torch.equal(result.beta_mean.isfinite().all(dim=2), made)


def test_fixed_learning_rate_is_plain_sgd(tables):
    config = make_config(update_rule="sgd", stop_rule="max_steps", max_steps=5)
    meta = init_meta_params(config, torch.Generator().manual_seed(0))
    train, _ = scenario_batches(config, 1)
    with torch.no_grad():
        result = adapt(meta, config, tables, train, torch.ones(1, 5))
    layout = layout_of(config)
    theta = meta["init"].clone()
    for t in range(5):
        flat = theta.clone().requires_grad_(True)
        loss = triples_loss(
            config.recommender, layout, tables, flat, {k: v[0, t] for k, v in train.items()}
        )
        (grad,) = torch.autograd.grad(loss, flat)
        theta = theta - config.sgd_lr * grad
    torch.testing.assert_close(result.theta[0], theta, rtol=1e-5, atol=1e-6)


def test_learned_update_applies_the_gates(tables):
    config = make_config(stop_rule="max_steps", max_steps=1)
    meta = init_meta_params(config, torch.Generator().manual_seed(0))
    train, _ = scenario_batches(config, 1)
    with torch.no_grad():
        result = adapt(meta, config, tables, train, torch.ones(1, 1))
    layout = layout_of(config)
    flat = meta["init"].clone().requires_grad_(True)
    loss = triples_loss(
        config.recommender, layout, tables, flat, {k: v[0, 0] for k, v in train.items()}
    )
    (grad,) = torch.autograd.grad(loss, flat)
    n, h = flat.shape[0], config.controller_hidden
    alpha, beta, _, _ = update_gates(
        meta,
        layout.sizes,
        grad[None],
        meta["init"][None],
        loss.detach()[None],
        torch.zeros(1, n, h),
        torch.zeros(1, n, h),
    )
    expected = beta[0] * meta["init"] - alpha[0] * grad
    torch.testing.assert_close(result.theta[0], expected, rtol=1e-5, atol=1e-6)
    # The initial gates are close to a small SGD step that keeps the parameters.
    assert 0.005 < alpha.mean() < 0.02 and beta.mean() > 0.99


def test_meta_gradient_reaches_init_and_both_controllers(tables):
    config = make_config()
    meta = {
        k: v.clone().requires_grad_(True)
        for k, v in init_meta_params(config, torch.Generator().manual_seed(0)).items()
    }
    train, test = scenario_batches(config, 2, test_size=64)
    uniforms = torch.rand(2, config.max_steps, generator=torch.Generator().manual_seed(3))
    result = adapt(meta, config, tables, train, uniforms, test)
    layout = layout_of(config)
    final = torch.stack(
        [
            triples_loss(
                config.recommender,
                layout,
                tables,
                result.theta[s],
                {k: v[s] for k, v in test.items()},
            )
            for s in range(2)
        ]
    )
    (final.mean() - result.decision_log_prob.sum()).backward()
    assert meta["init"].grad.abs().sum() > 0
    assert meta["update.0.weight"].grad.abs().sum() > 0
    assert meta["update.0.out_bias"].grad.abs().sum() > 0
    assert meta["stop.weight"].grad.abs().sum() > 0
    # Test losses are recorded at theta_0 .. theta_T for the REINFORCE reward.
    assert result.test_loss.shape[1] == result.train_loss.shape[1] + 1


def test_compiled_learner_gives_the_same_adaptation(tables):
    config = make_config(max_steps=6)
    meta = init_meta_params(config, torch.Generator().manual_seed(0))
    train, _ = scenario_batches(config, 2)
    uniforms = torch.rand(2, 6, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        eager = adapt(meta, config, tables, train, uniforms, fused=False)
        fast = adapt(meta, config, tables, train, uniforms, compiled=True, fused=False)
    torch.testing.assert_close(fast.theta, eager.theta, rtol=1e-4, atol=1e-5)
    assert fast.steps.tolist() == eager.steps.tolist()
