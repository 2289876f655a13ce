"""Adapting real scenarios: from a scenario's few interactions to adapted parameters and
scores over its pool. Shared by evaluation and the service, so both adapt identically.

Randomness (the triples and the stop draws) comes from a generator seeded by (seed,
scenario id), so a scenario's adaptation does not depend on what else is in the batch.
"""

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from model.inner_loss import Tables
from model.learner import AdaptResult, adapt, layout_of
from model.learner_config import LearnerConfig
from model.params import Params
from model.recommender import score_pool
from model.sampling import Triples, pool_popularity, sample_triples


@dataclass(frozen=True)
class ScenarioInput:
    """Embedding-table rows: the scenario's interactions (users, items) and its pool."""

    scenario_id: str
    users: np.ndarray  # [m]
    items: np.ndarray  # [m], each in pool
    pool: np.ndarray  # [P] sorted unique


def scenario_rng(seed: int, scenario_id: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(scenario_id.encode())])


def stack_triples(
    parts: Sequence[Triples], device: torch.device | None = None
) -> dict[str, Tensor]:
    """Triples of S scenarios stacked along a new first dimension, on `device`."""
    return {
        name: torch.stack([getattr(p, name) for p in parts]).to(device)
        for name in parts[0].as_dict()
    }


def learning_draws(
    config: LearnerConfig, scenario: ScenarioInput, rng: np.random.Generator
) -> tuple[Triples, Tensor]:
    """A scenario's randomness for one adaptation: training triples [T, N] and the stop
    decisions' uniform draws [T]."""
    triples = sample_triples(
        scenario.users, scenario.items, scenario.pool, (config.max_steps, config.batch_size), rng
    )
    return triples, torch.as_tensor(rng.random(config.max_steps), dtype=torch.float32)


def adapt_scenarios(
    meta: Params,
    config: LearnerConfig,
    tables: Tables,
    scenarios: Sequence[ScenarioInput],
    seed: int,
    *,
    compiled: bool = False,
    thetas: list[Tensor] | None = None,
) -> AdaptResult:
    """Adapt every scenario at once (one vmapped batch); `thetas` as in `adapt`."""
    draws = [
        learning_draws(config, scenario, scenario_rng(seed, scenario.scenario_id))
        for scenario in scenarios
    ]
    train = [triples for triples, _ in draws]
    uniforms = [uniform for _, uniform in draws]
    with torch.no_grad():
        device = tables.user.device
        return adapt(
            meta,
            config,
            tables,
            stack_triples(train, device),
            torch.stack(uniforms).to(device),
            compiled=compiled,
            thetas=thetas,
        )


def score_scenario(
    config: LearnerConfig,
    theta: Tensor,
    tables: Tables,
    scenario: ScenarioInput,
    users: np.ndarray,
    chunk: int = 256,
) -> Tensor:
    """[U, P] scores (on the tables' device) of users (table rows) over the scenario's pool,
    theta [n] adapted."""
    params = layout_of(config).unflatten(theta)
    device = tables.user.device
    pool = torch.as_tensor(scenario.pool, dtype=torch.long, device=device)
    pool_pop = torch.as_tensor(pool_popularity(scenario.items, scenario.pool), device=device)
    rows = torch.as_tensor(users, dtype=torch.long, device=device)
    with torch.no_grad():
        return torch.cat(
            [
                score_pool(
                    config.recommender, params, tables.user[part], tables.item[pool], pool_pop
                )
                for part in torch.split(rows, chunk)
            ]
        )
