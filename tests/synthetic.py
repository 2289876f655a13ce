"""A serving world built with model/ alone: random embedding tables under string ids, a meta
learner of every recommender variant from the model's own initialiser, and scenarios drawn
over them. The service tests run on it, so they need neither the data nor the training
stack; its sizes follow a LastFM meta-test scenario (64 interactions of about a dozen users,
a pool of some 500 items, a few items seen more than once)."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model.artifact import Artifact, MetaLearner, save_artifact
from model.inner_loss import Tables
from model.learner import init_meta_params
from model.learner_config import LearnerConfig
from model.recommender import VARIANTS, RecommenderSpec

USERS, ITEMS, DIM = 400, 1200, 16
SUPPORT, SUPPORT_USERS, POOL = 64, 12, 480
# The default variant, as training would have chosen it on meta-valid.
DEFAULT_VARIANT = "hybrid"


@dataclass(frozen=True)
class ScenarioIds:
    """A scenario in the API's terms: its interactions, candidates, and a user outside its
    interactions who has an embedding."""

    scenario_id: str
    interactions: list[dict[str, str]]
    candidates: list[str]
    eval_user: str

    def body(self, **extra: object) -> dict[str, object]:
        return {"interactions": self.interactions, "candidates": self.candidates, **extra}


def user_id(row: int) -> str:
    return f"user-{row:04d}"


def item_id(row: int) -> str:
    return f"item:{row:05d}"


def synthetic_artifact(seed: int = 0) -> Artifact:
    """Every variant's omega fresh from `init_meta_params`: untrained, but the same shapes,
    files and code paths as a trained one."""
    generator = torch.Generator().manual_seed(seed)
    tables = Tables(
        torch.randn(USERS, DIM, generator=generator) / DIM**0.5,
        torch.randn(ITEMS, DIM, generator=generator) / DIM**0.5,
    )
    learners = {}
    for variant in VARIANTS:
        config = LearnerConfig(recommender=RecommenderSpec(variant, DIM))
        learners[variant] = MetaLearner(init_meta_params(config, generator), config)
    return Artifact(
        learners=learners,
        default_variant=DEFAULT_VARIANT,
        tables=tables,
        user_ids=[user_id(k) for k in range(USERS)],
        item_ids=[item_id(k) for k in range(ITEMS)],
        metrics={"dataset": "synthetic", "seed": seed, "variant": DEFAULT_VARIANT},
    )


def save_synthetic_artifact(directory: Path, seed: int = 0) -> Path:
    save_artifact(synthetic_artifact(seed), directory)
    return directory


def synthetic_scenario(scenario_id: str, seed: int) -> ScenarioIds:
    """SUPPORT distinct (user, item) interactions of SUPPORT_USERS users, the items drawn
    from the pool with popularity falling off (so some repeat), and a pool of POOL items."""
    rng = np.random.default_rng(seed)
    users = rng.choice(USERS, size=SUPPORT_USERS + 1, replace=False)
    support_users, eval_user = users[:-1], users[-1]
    pool = np.sort(rng.choice(ITEMS, size=POOL, replace=False))
    weights = 1.0 / np.arange(1, POOL + 1)
    pairs: list[tuple[int, int]] = []
    while len(pairs) < SUPPORT:
        # Three interactions for each support user first, then users at random.
        k = len(pairs)
        user = int(support_users[k // 3] if k < 3 * SUPPORT_USERS else rng.choice(support_users))
        item = int(pool[rng.choice(POOL, p=weights / weights.sum())])
        if (user, item) not in pairs:
            pairs.append((user, item))
    return ScenarioIds(
        scenario_id=scenario_id,
        interactions=[{"user": user_id(u), "item": item_id(i)} for u, i in pairs],
        candidates=[item_id(int(i)) for i in pool],
        eval_user=user_id(int(eval_user)),
    )


def default_scenario() -> ScenarioIds:
    """The scenario the service tests adapt (conftest's `scenario`)."""
    return synthetic_scenario("world.1", seed=1)
