"""Scenario-specific learning for a registered scenario: from string ids to the meta
learner's adaptation and the record the store keeps. Blocking tensor work: the service runs
it in its adaptation workers, never on the event loop."""

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from safetensors.torch import save

from model.learner import AdaptResult
from model.scenario import ScenarioInput, adapt_scenarios
from service.errors import AdaptationInputError
from service.learners import LoadedVersion
from service.store import ScenarioState


@dataclass(frozen=True)
class Registration:
    """What a client registered for a scenario, deduplicated in order."""

    interactions: list[tuple[str, str]]
    candidates: list[str]
    variant: str | None
    seed: int


def registration(
    interactions: list[tuple[str, str]], candidates: list[str], variant: str | None, seed: int
) -> Registration:
    """Deduplicate (a repeated interaction or candidate counts once) and check that every
    interaction's item is a candidate."""
    pool = list(dict.fromkeys(candidates))
    in_pool = set(pool)
    outside = sorted({item for _, item in interactions if item not in in_pool})
    if outside:
        raise AdaptationInputError(
            f"{len(outside)} interaction item(s) are not among the candidates, e.g. "
            f"{outside[:5]}: the candidates are the scenario's item pool"
        )
    return Registration(list(dict.fromkeys(interactions)), pool, variant, seed)


@dataclass(frozen=True)
class ResolvedScenario:
    """A registration in one published version's table rows."""

    scenario: ScenarioInput
    pool_ids: list[str]  # by table row, as in scenario.pool
    unknown_users: list[str]
    unknown_items: list[str]
    used: list[tuple[str, str]]


def resolve(
    loaded: LoadedVersion, scenario_id: str, registration: Registration, min_interactions: int
) -> ResolvedScenario:
    """Drop ids the version does not know (a user without an embedding, an item not in its
    tables) and check that enough is left to learn from."""
    item_rows = loaded.item_rows
    known_pool = [item for item in registration.candidates if item in item_rows]
    unknown_items = [item for item in registration.candidates if item not in item_rows]
    if len(known_pool) < 2:
        raise AdaptationInputError(
            f"{len(known_pool)} known candidate(s) after dropping {len(unknown_items)} unknown: "
            "a pool needs at least 2 items"
        )
    unknown_users = sorted(
        {user for user, _ in registration.interactions if not loaded.has_embedding(user)}
    )
    used = [
        (user, item)
        for user, item in registration.interactions
        if loaded.has_embedding(user) and item in item_rows
    ]
    if len(used) < min_interactions:
        raise AdaptationInputError(
            f"{len(used)} usable interaction(s) after dropping unknown users and items, "
            f"at least {min_interactions} needed"
        )
    pool_rows = np.array(sorted(item_rows[item] for item in known_pool), dtype=np.int64)
    scenario = ScenarioInput(
        scenario_id=scenario_id,
        users=np.array([loaded.user_rows[user] for user, _ in used], dtype=np.int64),
        items=np.array([item_rows[item] for _, item in used], dtype=np.int64),
        pool=pool_rows,
    )
    item_ids = loaded.artifact.item_ids
    return ResolvedScenario(
        scenario=scenario,
        pool_ids=[item_ids[row] for row in pool_rows],
        unknown_users=unknown_users,
        unknown_items=unknown_items,
        used=used,
    )


def adapt_registration(
    loaded: LoadedVersion, scenario_id: str, registration: Registration, min_interactions: int
) -> ScenarioState:
    """Adapt a recommender for the scenario with `loaded`'s meta learner; the record to store.
    Seeded by the registration's seed and the scenario id, so it is reproducible."""
    (outcome,) = adapt_registrations(loaded, [(scenario_id, registration)], min_interactions)
    if isinstance(outcome, AdaptationInputError):
        raise outcome
    return outcome


def adapt_registrations(
    loaded: LoadedVersion,
    registrations: Sequence[tuple[str, Registration]],
    min_interactions: int,
) -> list[ScenarioState | AdaptationInputError]:
    """Adapt many scenarios at once (after a hot reload, say): those with the same variant and
    seed in one vmapped batch on the device. Each scenario's draws are seeded by its seed and
    id alone, so it gets the adaptation it would get alone (to float rounding). Outcomes in
    order: the record to store, or why the scenario cannot be adapted. A record's
    duration_ms is its batch's."""
    outcomes: dict[int, ScenarioState | AdaptationInputError] = {}
    batches: dict[tuple[str, int], list[tuple[int, ResolvedScenario]]] = {}
    for position, (scenario_id, registration) in enumerate(registrations):
        variant = registration.variant or loaded.artifact.default_variant
        try:
            if variant not in loaded.artifact.learners:
                raise AdaptationInputError(
                    f"variant {variant!r} is not in meta learner {loaded.version} "
                    f"(it has {sorted(loaded.artifact.learners)})"
                )
            resolved = resolve(loaded, scenario_id, registration, min_interactions)
        except AdaptationInputError as error:
            outcomes[position] = error
            continue
        batches.setdefault((variant, registration.seed), []).append((position, resolved))
    for (variant, seed), batch in batches.items():
        start = time.perf_counter()
        learner = loaded.learner(variant)
        result = adapt_scenarios(
            learner.meta,
            learner.config,
            loaded.tables,
            [resolved.scenario for _, resolved in batch],
            seed,
        )
        duration_ms = (time.perf_counter() - start) * 1000.0
        for k, (position, resolved) in enumerate(batch):
            registration = registrations[position][1]
            outcomes[position] = _record(
                loaded, variant, registration, resolved, result, k, duration_ms
            )
    return [outcomes[position] for position in range(len(registrations))]


def _record(
    loaded: LoadedVersion,
    variant: str,
    registration: Registration,
    resolved: ResolvedScenario,
    result: AdaptResult,
    k: int,
    duration_ms: float,
) -> ScenarioState:
    """The stored record of the k-th scenario of an adaptation batch."""
    popularity = Counter(item for _, item in resolved.used)
    meta: dict[str, object] = {
        "meta_learner": loaded.version,
        "variant": variant,
        "seed": registration.seed,
        "created_at": time.time(),
        "steps": int(result.steps[k]),
        "stopped_by": "stop_controller" if bool(result.stopped_by_controller[k]) else "max_steps",
        # The steps that ran: the loss at theta_{t-1} and p_t of step t.
        "train_loss": [float(x) for x in result.train_loss[k].cpu()],
        "stop_probability": [float(x) for x in result.stop_probability[k].cpu()],
        "used_interactions": len(resolved.used),
        "ignored": {
            "unknown_users": resolved.unknown_users,
            "unknown_items": resolved.unknown_items,
        },
        "num_candidates": len(resolved.pool_ids),
        "counts": {
            "registered_interactions": len(registration.interactions),
            "registered_candidates": len(registration.candidates),
            "users": len({user for user, _ in resolved.used}),
        },
        "duration_ms": duration_ms,
    }
    return ScenarioState(
        meta=meta,
        params=save({"theta": result.theta[k].detach().cpu().contiguous()}),
        candidates=registration.candidates,
        interactions=registration.interactions,
        popularity=sorted(popularity.items(), key=lambda pair: (-pair[1], pair[0])),
    )
