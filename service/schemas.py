"""Request and response models at the API's edge."""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from model.recommender import Variant

SCENARIO_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
# User and item ids are the dataset's ids as strings: anything printable, 1 to 256 chars.
EntityId = Annotated[
    str, StringConstraints(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]+$")
]


class Interaction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user: EntityId
    item: EntityId


class AdaptRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    interactions: list[Interaction] = Field(
        description="the scenario's few known (user, item) interactions"
    )
    candidates: list[EntityId] = Field(
        description="the scenario's item pool: what is ranked, and where negatives come from"
    )
    variant: Variant | None = Field(
        None, description="recommender variant; null: the meta learner's default"
    )
    # Strict: JSON `true` or "7" are not seeds (lax mode would take them as 1 and 7).
    seed: int | None = Field(
        None,
        ge=0,
        le=2**32 - 1,
        strict=True,
        description="seed of the learning's draws; null: the default",
    )


class Ignored(BaseModel):
    unknown_users: list[str] = Field(
        description="users the meta learner lacks whose items give nothing to fold in from"
    )
    unknown_items: list[str] = Field(
        description="always empty: an unknown candidate is folded in; kept so that clients "
        "reading it still parse"
    )


class FoldedIn(BaseModel):
    """Ids the meta learner lacks (or holds a zero vector for), given vectors from the
    scenario's interactions (docs/http-api.md#fold-in)."""

    users: list[str] = Field(default_factory=list, description="users, by their items")
    items: list[str] = Field(
        default_factory=list,
        description="candidates, by their users; one no known user touched gets the zero vector",
    )


class Counts(BaseModel):
    registered_interactions: int
    registered_candidates: int
    users: int


class ScenarioSummary(BaseModel):
    scenario: str
    revision: int
    status: Literal["ready", "readapting"] = Field(
        description="readapting: adapted by an older meta learner; re-adaptation is pending"
    )
    meta_learner: str
    variant: Variant
    created_at: float = Field(description="seconds since the epoch")
    used_interactions: int
    num_candidates: int
    counts: Counts


class LearningTrace(BaseModel):
    steps: int
    stopped_by: Literal["stop_controller", "max_steps"]
    train_loss: list[float] = Field(description="loss before each step's update")
    stop_probability: list[float] = Field(description="the stop controller's p_t per step")


class ScenarioDetail(ScenarioSummary, LearningTrace):
    seed: int
    ignored: Ignored
    folded_in: FoldedIn = Field(default_factory=FoldedIn)
    duration_ms: float


class AdaptResponse(LearningTrace):
    scenario: str
    revision: int
    meta_learner: str
    variant: Variant
    used_interactions: int
    ignored: Ignored
    folded_in: FoldedIn = Field(default_factory=FoldedIn)
    num_candidates: int
    duration_ms: float


class RecommendQuery(BaseModel):
    """GET /recommend's query parameters (unknown ones are ignored, as FastAPI does)."""

    user: EntityId
    scenario: Annotated[str, StringConstraints(pattern=SCENARIO_ID_PATTERN)]
    n: int = Field(10, ge=1, le=1000, description="how many items")
    exclude_seen: bool = Field(
        True, description="leave out the items the user interacted with in the scenario"
    )


class ScoredItem(BaseModel):
    item: str
    score: float


class RecommendResponse(BaseModel):
    user: str
    scenario: str
    revision: int
    meta_learner: str
    source: Literal["adapted", "popular"] = Field(
        description="popular: the user has no embedding and none was folded in from the "
        "scenario's interactions, so the scenario's popular items"
    )
    items: list[ScoredItem]


class ScenarioPage(BaseModel):
    scenarios: list[ScenarioSummary]
    next: str | None = Field(description="pass as `after` for the next page; null at the end")


class Problem(BaseModel):
    detail: str


class FieldError(BaseModel):
    """One of FastAPI's request-validation errors."""

    loc: list[str | int]
    msg: str
    type: str


class InvalidInput(BaseModel):
    """A 422: the request's field errors, or one reason the scenario cannot be adapted."""

    detail: str | list[FieldError]
