"""Request and response models at the API's edge."""

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints

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


MAX_USERS_PER_CALL = 1000  # users of one batch recommendation
MAX_EXCLUDED = 1000  # item ids one recommendation may exclude

# Eight: S2META_MIN_INTERACTIONS by default, so that the example is a valid request.
INTERACTIONS_EXAMPLE = [
    {"user": user, "item": f"sku-{k}"} for user in ("u17", "u42") for k in range(1, 5)
]


def _integral(value: object) -> object:
    """A float with no fraction as the int it is; anything else as it came."""
    return int(value) if type(value) is float and value.is_integer() else value


class AdaptRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "interactions": INTERACTIONS_EXAMPLE,
                    "candidates": [f"sku-{k}" for k in range(1, 7)],
                    "variant": None,
                    "seed": 7,
                }
            ]
        },
    )
    interactions: list[Interaction] = Field(
        min_length=1, description="the scenario's few known (user, item) interactions"
    )
    candidates: list[EntityId] = Field(
        min_length=2,
        description="the scenario's item pool: what is ranked, and where negatives come from",
    )
    variant: Variant | None = Field(
        None, description="recommender variant; null: the meta learner's default"
    )
    # Strict: JSON `true` or "7" are not seeds (lax mode would take them as 1 and 7); 7.0 is,
    # as JSON Schema's "integer" counts it.
    seed: Annotated[int | None, BeforeValidator(_integral)] = Field(
        None,
        ge=0,
        le=2**32 - 1,
        strict=True,
        description="seed of the learning's draws; null: the default",
    )
    meta_learner: str | None = Field(
        None,
        pattern=r"^v[0-9]{4,9}$",
        description="pin the scenario to this published version (a canary): adapted with it "
        "and kept on it through promotions until re-posted without one; null: the current one",
    )


class AppendRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"interactions": INTERACTIONS_EXAMPLE}]}
    )
    interactions: list[Interaction] = Field(
        min_length=1,
        description="interactions to add to the scenario's (already registered ones count once); "
        "each item must be in the scenario's pool",
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
    pinned: bool = Field(
        False, description="kept on its meta learner through promotions (adapted with one named)"
    )
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
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "scenario": "promo-2026-12",
                    "revision": 3,
                    "meta_learner": "v0002",
                    "variant": "hybrid",
                    "steps": 6,
                    "stopped_by": "stop_controller",
                    "train_loss": [0.99, 0.97, 0.96, 0.95, 0.95, 0.94],
                    "stop_probability": [0.1, 0.2, 0.2, 0.4, 0.5, 0.7],
                    "used_interactions": 8,
                    "ignored": {"unknown_users": [], "unknown_items": []},
                    "folded_in": {"users": [], "items": ["sku-6"]},
                    "num_candidates": 6,
                    "duration_ms": 41.5,
                    "reused": False,
                }
            ]
        }
    )
    scenario: str
    revision: int
    meta_learner: str
    variant: Variant
    used_interactions: int
    ignored: Ignored
    folded_in: FoldedIn = Field(default_factory=FoldedIn)
    num_candidates: int
    duration_ms: float
    pinned: bool = Field(False, description="kept on its meta learner through promotions")
    reused: bool = Field(
        False,
        description="true: the request changed nothing (the same registration and meta "
        "learner), so the stored revision is returned without adapting again",
    )


class RecommendQuery(BaseModel):
    """GET /recommend's query parameters (unknown ones are ignored, as FastAPI does)."""

    user: EntityId
    scenario: Annotated[str, StringConstraints(pattern=SCENARIO_ID_PATTERN)]
    n: int = Field(10, ge=1, le=1000, description="how many items")
    exclude_seen: bool = Field(
        True, description="leave out the items the user interacted with in the scenario"
    )
    exclude: list[EntityId] = Field(
        default_factory=list,
        max_length=MAX_EXCLUDED,
        description="item ids to leave out (out of stock, say); repeat the parameter for "
        "several; ids outside the pool change nothing",
    )


class RecommendManyRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"users": ["u17", "u42"], "n": 5, "exclude": ["sku-3"]}]},
    )
    users: list[EntityId] = Field(
        min_length=1, max_length=MAX_USERS_PER_CALL, description="ranked in one pass, in order"
    )
    n: int = Field(10, ge=1, le=1000, description="how many items per user")
    exclude_seen: bool = Field(
        True, description="leave out the items each user interacted with in the scenario"
    )
    exclude: list[EntityId] = Field(
        default_factory=list,
        max_length=MAX_EXCLUDED,
        description="item ids to leave out for every user",
    )


class ScoredItem(BaseModel):
    item: str
    score: float


class RecommendResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "user": "u17",
                    "scenario": "promo-2026-12",
                    "revision": 3,
                    "meta_learner": "v0002",
                    "source": "adapted",
                    "items": [{"item": "sku-5", "score": 0.82}, {"item": "sku-6", "score": 0.61}],
                }
            ]
        }
    )
    user: str
    scenario: str
    revision: int
    meta_learner: str
    source: Literal["adapted", "popular"] = Field(
        description="popular: the user has no embedding and none was folded in from the "
        "scenario's interactions, so the scenario's popular items"
    )
    items: list[ScoredItem]


class UserRecommendations(BaseModel):
    user: str
    source: Literal["adapted", "popular"]
    items: list[ScoredItem]


class RecommendManyResponse(BaseModel):
    scenario: str
    revision: int
    meta_learner: str
    results: list[UserRecommendations] = Field(description="one per requested user, in order")


class Readiness(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"status": "ready", "meta_learner": "v0002", "causes": []},
                {
                    "status": "degraded",
                    "meta_learner": "v0002",
                    "causes": ["scenario store unavailable: redis: Connection refused"],
                },
            ]
        }
    )
    status: Literal["ready", "degraded"] = Field(
        description="degraded: serving, but a shared dependency is unreachable (see causes); "
        "requests that need it answer 503"
    )
    meta_learner: str
    causes: list[str] = Field(description="what is degraded; empty when ready")


class ScenarioPage(BaseModel):
    scenarios: list[ScenarioSummary]
    next: str | None = Field(description="pass as `after` for the next page; null at the end")
