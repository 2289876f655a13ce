"""Configuration of the offline job: one settings class read from the environment, and
plain pydantic models for the protocol and the embeddings (saved with what they produce)."""

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.learner_config import LearnerOptions
from model.recommender import Variant


class ScenarioSelection(BaseModel):
    """Which scenarios (attributes) of a dataset enter the benchmark."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_pool_items: int = Field(100, ge=2)
    max_pool_items: int = Field(1000, ge=2)
    min_interactions: int = Field(500, ge=1)

    @model_validator(mode="after")
    def _pool_range(self) -> "ScenarioSelection":
        if self.min_pool_items > self.max_pool_items:
            raise ValueError("min_pool_items must not exceed max_pool_items")
        return self


class ProtocolConfig(BaseModel):
    """The evaluation protocol, or the serving one (`s2meta train`); see docs/protocol.md."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # "evaluation": meta-train/valid/test, hidden rows as in docs/protocol.md. "serving": every
    # scenario but a meta-valid slice meta-trains, and only that slice's rows are hidden.
    kind: Literal["evaluation", "serving"] = "evaluation"
    selection: ScenarioSelection = ScenarioSelection()
    train_share: float = Field(0.7, gt=0, lt=1)
    valid_share: float = Field(0.1, gt=0, lt=1)
    # Few-shot size of a new scenario (the paper's 64 interactions).
    support_size: int = Field(64, ge=1)
    # A shared user has at least this many interactions outside the scenario.
    min_outside_interactions: int = Field(3, ge=1)
    # Share of the remaining shared users of a meta-valid/meta-test scenario that is evaluated.
    eval_user_share: float = Field(0.2, gt=0, le=1)
    # Meta-train episode interactions hidden from pretraining, as a share of all interactions.
    episode_share: float = Field(0.1, ge=0, lt=1)
    # Serving: the validation slice's scenarios are claimed until the rows they hide reach
    # this share of all interactions (at least one scenario); train_share, valid_share and
    # episode_share do not apply.
    validation_share: float = Field(0.05, gt=0, lt=1)

    @model_validator(mode="after")
    def _shares(self) -> "ProtocolConfig":
        if self.train_share + self.valid_share >= 1:
            raise ValueError("train_share + valid_share must leave a meta-test share")
        return self


class EmbeddingConfig(BaseModel):
    """Matrix factorisation (implicit's ALS) of the interactions the protocol leaves visible."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dim: int = Field(64, ge=1)
    # Chosen on meta-valid Recall@20 of mf_dot (benchmarks/tune_embeddings.py).
    regularization: float = Field(0.01, ge=0)
    alpha: float = Field(20.0, gt=0)
    iterations: int = Field(30, ge=1)


class SuppliedEmbeddings(BaseModel):
    """User and item vectors from the caller's own model, read from `path` instead of
    pretraining (s2meta train --embeddings; layout in meta_training/supplied_embeddings.py)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: Path


class Settings(BaseSettings):
    """Environment settings of the offline job (prefix S2META_)."""

    model_config = SettingsConfigDict(env_prefix="S2META_", extra="ignore")

    cache_dir: Path = Path.home() / ".cache" / "s2meta"


class MetaTrainConfig(BaseModel):
    """Meta-training (the paper's Algorithm 1) and the learner options it trains with."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    variant: Variant = "hybrid"
    learner: LearnerOptions = LearnerOptions()
    iterations: int = Field(600, ge=1)
    meta_batch: int = Field(8, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    # Episodes: training-set size (the few-shot size) and held-out test triples.
    support_size: int = Field(64, ge=1)
    test_size: int = Field(256, ge=1)
    valid_every: int = Field(100, ge=1)
    # RandInit ablation when False; the other ablations are learner options (FixedLr:
    # update_rule "sgd", FixedStep: stop_rule "max_steps", MAML-style: both).
    learn_init: bool = True
    # REINFORCE baseline: exponential moving average of the reward.
    baseline_decay: float = Field(0.9, ge=0, lt=1)
    compiled: bool = False

    def with_changes(
        self, learner: dict[str, object] | None = None, **changes: object
    ) -> "MetaTrainConfig":
        """A validated copy with top-level fields and learner options changed."""
        dumped = self.model_dump()
        dumped["learner"] |= learner or {}
        return MetaTrainConfig.model_validate(dumped | changes)
