"""Scenario-specific learning for a registered scenario: from string ids to the meta
learner's adaptation and the record the store keeps. Blocking tensor work: the service runs
it in its adaptation workers, never on the event loop."""

import hashlib
import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from safetensors.torch import save

from model.artifact import MetaLearner
from model.fold_in import local_tables
from model.learner import AdaptResult
from model.scenario import ScenarioInput, adapt_scenarios
from service.compilation import StepCompiler
from service.errors import AdaptationInputError
from service.folding import Folded, embedded_user_rows, fold_registration
from service.learners import LoadedVersion
from service.store import ScenarioState


@dataclass(frozen=True)
class Registration:
    """What a client registered for a scenario, deduplicated in order."""

    interactions: list[tuple[str, str]]
    candidates: list[str]
    variant: str | None
    seed: int
    pinned: bool = False  # kept on its meta learner through promotions (a canary)

    def fingerprint(self, loaded: LoadedVersion) -> str:
        """What makes an adaptation the same as another: the registration, the variant it
        resolves to in `loaded` and `loaded`'s version (an identical re-post is answered
        from the store)."""
        variant = self.variant or loaded.artifact.default_variant
        identity = [self.interactions, self.candidates, variant, self.seed, loaded.version]
        if self.pinned:  # so that a re-post without the pin is not the same
            identity.append("pinned")
        return hashlib.sha256(json.dumps(identity).encode()).hexdigest()


def registration(
    interactions: list[tuple[str, str]],
    candidates: list[str],
    variant: str | None,
    seed: int,
    pinned: bool = False,
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
    return Registration(list(dict.fromkeys(interactions)), pool, variant, seed, pinned)


@dataclass(frozen=True)
class ResolvedScenario:
    """A registration in one published version's table rows: a folded user or item is row
    len(table) + k, its k-th folded vector."""

    scenario: ScenarioInput
    pool_ids: list[str]  # by row, as in scenario.pool: the known items, then the folded
    folded: Folded
    unknown_users: list[str]
    used: list[tuple[str, str]]


def resolve(
    loaded: LoadedVersion, scenario_id: str, registration: Registration, min_interactions: int
) -> ResolvedScenario:
    """Fold in the ids the version does not know (service.folding), drop the users that
    cannot be, and check that enough is left to learn from."""
    if len(registration.candidates) < 2:
        raise AdaptationInputError(
            f"{len(registration.candidates)} candidate(s): a pool needs at least 2 items"
        )
    candidates = registration.candidates
    # One search over the tables for all candidates and users (pools run to thousands).
    candidate_rows = loaded.embedded_item_rows(candidates)
    known = np.flatnonzero(candidate_rows >= 0)
    known = known[np.argsort(candidate_rows[known], kind="stable")]  # the known pool by row
    known_rows = {candidates[k]: int(candidate_rows[k]) for k in known}
    users = list(dict.fromkeys(user for user, _ in registration.interactions))
    embedded = embedded_user_rows(loaded, users)
    folded = fold_registration(
        loaded, registration.interactions, candidates, candidate_rows, embedded, known_rows
    )
    num_users, num_items = len(loaded.artifact.user_ids), len(loaded.artifact.item_ids)
    user_rows = embedded | {user: num_users + k for k, user in enumerate(folded.users)}
    item_rows = known_rows | {item: num_items + k for k, item in enumerate(folded.items)}
    used = [(user, item) for user, item in registration.interactions if user in user_rows]
    if len(used) < min_interactions:
        raise AdaptationInputError(
            f"{len(used)} usable interaction(s) after dropping users that cannot be folded "
            f"in, at least {min_interactions} needed"
        )
    pool_ids = [candidates[k] for k in known] + folded.items
    scenario = ScenarioInput(
        scenario_id=scenario_id,
        users=np.array([user_rows[user] for user, _ in used], dtype=np.int64),
        items=np.array([item_rows[item] for _, item in used], dtype=np.int64),
        pool=np.concatenate(
            [candidate_rows[known], num_items + np.arange(len(folded.items), dtype=np.int64)]
        ),
    )
    return ResolvedScenario(scenario, pool_ids, folded, folded.unfoldable_users, used)


def adapt_registration(
    loaded: LoadedVersion,
    scenario_id: str,
    registration: Registration,
    min_interactions: int,
    compiler: StepCompiler | None = None,
) -> ScenarioState:
    """Adapt a recommender for the scenario with `loaded`'s meta learner; the record to store.
    Seeded by the registration's seed and the scenario id, so it is reproducible."""
    (outcome,) = adapt_registrations(
        loaded, [(scenario_id, registration)], min_interactions, compiler
    )
    if isinstance(outcome, AdaptationInputError):
        raise outcome
    return outcome


def adapt_registrations(
    loaded: LoadedVersion,
    registrations: Sequence[tuple[str, Registration]],
    min_interactions: int,
    compiler: StepCompiler | None = None,
) -> list[ScenarioState | AdaptationInputError]:
    """Adapt many scenarios at once (after a hot reload, say): those with the same variant and
    seed in vmapped batches on the device, the compiled step's batches where `compiler` has
    it warm, else one eager batch. Each scenario's draws are seeded by its seed and id alone,
    so it gets the adaptation it would get alone (to float rounding). Outcomes in order: the
    record to store, or why the scenario cannot be adapted. A record's duration_ms is its
    batch's."""
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
    for (variant, seed), group in batches.items():
        learner = loaded.learner(variant)
        chunks = compiler.chunks(learner.config, group) if compiler else [(False, group)]
        for compiled, batch in chunks:
            start = time.perf_counter()
            resolved_batch = [resolved for _, resolved in batch]
            result = _adapt_batch(loaded, learner, resolved_batch, seed, compiled)
            duration_ms = (time.perf_counter() - start) * 1000.0
            for k, (position, resolved) in enumerate(batch):
                if position not in outcomes:  # a padded batch repeats its last scenario
                    registration = registrations[position][1]
                    outcomes[position] = _record(
                        loaded, variant, registration, resolved, result, k, duration_ms
                    )
    return [outcomes[position] for position in range(len(registrations))]


def _adapt_batch(
    loaded: LoadedVersion,
    learner: MetaLearner,
    batch: list[ResolvedScenario],
    seed: int,
    compiled: bool,
) -> AdaptResult:
    tables, scenarios = loaded.tables, [resolved.scenario for resolved in batch]
    if any(resolved.folded.users or resolved.folded.items for resolved in batch):
        # Folded rows: the batch's rows gathered with them appended (model/fold_in.py).
        tables, scenarios = local_tables(
            tables,
            scenarios,
            [resolved.folded.user_vectors for resolved in batch],
            [resolved.folded.item_vectors for resolved in batch],
        )
    return adapt_scenarios(learner.meta, learner.config, tables, scenarios, seed, compiled=compiled)


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
        # Every candidate is in the pool: only users can be left out.
        "ignored": {"unknown_users": resolved.unknown_users, "unknown_items": []},
        "folded_in": {"users": resolved.folded.users, "items": resolved.folded.items},
        "num_candidates": len(resolved.pool_ids),
        "counts": {
            "registered_interactions": len(registration.interactions),
            "registered_candidates": len(registration.candidates),
            "users": len({user for user, _ in resolved.used}),
        },
        "duration_ms": duration_ms,
        "fingerprint": registration.fingerprint(loaded),
        "pinned": registration.pinned,
    }
    return ScenarioState(
        meta=meta,
        params=save(
            {"theta": result.theta[k].detach().cpu().contiguous(), **resolved.folded.tensors()}
        ),
        candidates=registration.candidates,
        interactions=registration.interactions,
        popularity=sorted(popularity.items(), key=lambda pair: (-pair[1], pair[0])),
    )
