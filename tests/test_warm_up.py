"""Warming up the compiled adaptation step (model/warm_up.py): after it, adaptations of the
warmed batch sizes compile nothing more, on the full tables or on local tables of any size
(folded-in scenarios), and give the eager step's results to float rounding."""

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from model.inner_loss import Tables
from model.learner import init_meta_params
from model.learner_config import LearnerConfig
from model.recommender import RecommenderSpec
from model.scenario import ScenarioInput, adapt_scenarios
from model.warm_up import warm_up_adaptation

USERS, ITEMS, DIM = 300, 700, 16


def scenarios(count: int, tables: Tables, rng: np.random.Generator) -> list[ScenarioInput]:
    made = []
    for k in range(count):
        pool = np.sort(rng.choice(len(tables.item), size=60, replace=False))
        made.append(
            ScenarioInput(
                scenario_id=f"s{k}",
                users=rng.integers(0, len(tables.user), size=24),
                items=pool[rng.integers(0, len(pool), size=24)],
                pool=pool,
            )
        )
    return made


def graphs_compiled() -> int:
    return counters["stats"]["unique_graphs"]


def test_after_warm_up_no_adaptation_compiles():
    generator = torch.Generator().manual_seed(3)
    # An embedding size of its own, so no other test's graphs are found in the cache.
    config = LearnerConfig(RecommenderSpec("interaction", DIM + 4))
    meta = init_meta_params(config, generator)
    tables = Tables(torch.randn(USERS, DIM + 4, generator=generator), torch.randn(ITEMS, DIM + 4))
    before = graphs_compiled()
    warm_up_adaptation(meta, config, tables, [1, 2])
    assert graphs_compiled() > before  # it did compile
    warm = graphs_compiled()

    rng = np.random.default_rng(0)
    local = Tables(tables.user[:123].clone(), tables.item[:456].clone())
    for on, count in [(tables, 1), (tables, 2), (local, 1), (local, 2)]:
        batch = scenarios(count, on, rng)
        compiled = adapt_scenarios(meta, config, on, batch, seed=5, compiled=True)
        eager = adapt_scenarios(meta, config, on, batch, seed=5)
        assert graphs_compiled() == warm, (count, len(on.user))
        assert torch.equal(compiled.steps, eager.steps)
        torch.testing.assert_close(compiled.theta, eager.theta, rtol=1e-4, atol=1e-5)


def test_warm_up_refuses_tables_too_small():
    config = LearnerConfig(RecommenderSpec("interaction", DIM))
    meta = init_meta_params(config, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="too small"):
        warm_up_adaptation(meta, config, Tables(torch.randn(5, DIM), torch.randn(5, DIM)), [1])
