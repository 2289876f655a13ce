"""The learner's configuration: what it does independent of the data (`LearnerOptions`,
nested in meta-training's config), bound to the recommender it adapts (`LearnerConfig`,
saved in the artifact)."""

import dataclasses
from typing import Literal

from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass

from model.recommender import RecommenderSpec

# Ablations: "sgd" is a fixed learning rate (FixedLr), "max_steps" never stops early
# (FixedStep).
UpdateRule = Literal["learned", "sgd"]
StopRule = Literal["learned", "max_steps"]

STRICT = ConfigDict(extra="forbid")


# Every option is keyword-only, so LearnerConfig takes its recommender positionally.
@dataclass(frozen=True, config=STRICT)
class LearnerOptions:
    """Controller sizes, the N triples per step, the step bounds (min_steps before the first
    stop decision, at most max_steps updates), and the update and stop rules."""

    controller_hidden: int = Field(16, ge=1, kw_only=True)
    stop_hidden: int = Field(16, ge=1, kw_only=True)
    batch_size: int = Field(128, ge=1, kw_only=True)
    min_steps: int = Field(4, ge=0, kw_only=True)
    max_steps: int = Field(20, ge=1, kw_only=True)
    update_rule: UpdateRule = Field("learned", kw_only=True)
    sgd_lr: float = Field(0.01, gt=0, kw_only=True)
    stop_rule: StopRule = Field("learned", kw_only=True)


@dataclass(frozen=True, config=STRICT)
class LearnerConfig(LearnerOptions):
    """The options bound to a recommender: `LearnerConfig(spec, max_steps=8)`."""

    recommender: RecommenderSpec

    @classmethod
    def of(cls, recommender: RecommenderSpec, options: LearnerOptions) -> "LearnerConfig":
        return cls(recommender, **_option_values(options))


def _option_values(options: LearnerOptions) -> dict[str, object]:
    return {
        field.name: getattr(options, field.name) for field in dataclasses.fields(LearnerOptions)
    }
