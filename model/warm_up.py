"""Compiling the adaptation step ahead of the first real adaptation.

`adapt(..., compiled=True)` compiles on its first call and again whenever a call's shapes
differ from every graph it holds: the scenario batch, and the embedding tables' row count
(a scenario with folded-in users or items adapts over local tables of its own size), or
torch's thread count in the calling thread differs. The tables' rows are marked dynamic
(model/inner_loss.py), but a graph stays specialised to its scenario batch (torch's vmap
fixes it) and its thread count: after one call per batch size, on the thread count the
adaptations will run with, every later such call finds a graph whatever its tables, and no
adaptation waits for a compile (tests/test_warm_up.py checks this).
"""

from collections.abc import Sequence

import numpy as np

from model.inner_loss import Tables
from model.learner_config import LearnerConfig
from model.params import Params
from model.scenario import ScenarioInput, adapt_scenarios

INTERACTIONS, POOL = 16, 8  # per warm-up scenario: shapes do not depend on them


def warm_up_adaptation(
    meta: Params, config: LearnerConfig, tables: Tables, batch_sizes: Sequence[int]
) -> None:
    """Compile the adaptation of batches of `batch_sizes` scenarios on `tables`' device, at
    the calling thread's torch thread count, with synthetic scenarios (nothing learned is
    changed). Seeded, so it does the same work every time."""
    rng = np.random.default_rng(0)
    if len(tables.item) < POOL:
        raise ValueError(f"an item table of {len(tables.item)} rows is too small to warm up on")
    for count in batch_sizes:
        scenarios = [_synthetic_scenario(f"warm-up-{k}", tables, rng) for k in range(count)]
        adapt_scenarios(meta, config, tables, scenarios, seed=0, compiled=True)


def _synthetic_scenario(
    scenario_id: str, tables: Tables, rng: np.random.Generator
) -> ScenarioInput:
    pool = np.sort(rng.choice(len(tables.item), size=POOL, replace=False))
    return ScenarioInput(
        scenario_id=scenario_id,
        users=rng.integers(0, len(tables.user), size=INTERACTIONS),
        items=pool[rng.integers(0, POOL, size=INTERACTIONS)],
        pool=pool,
    )
