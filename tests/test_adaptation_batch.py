"""Adapting many scenarios at once (re-adaptation after a hot reload): one vmapped batch per
(variant, seed), each scenario getting what it would get alone; a scenario that cannot be
adapted gets its reason, the others their records."""

import torch
from safetensors.torch import load
from synthetic import synthetic_scenario

from service import adaptation
from service.adaptation import (
    adapt_registration,
    adapt_registrations,
    registration,
)
from service.errors import AdaptationInputError
from service.learners import MetaLearners

MIN_INTERACTIONS = 8


def test_a_batch_adapts_each_scenario_as_alone(registry, monkeypatch):
    learners = MetaLearners(registry, torch.device("cpu"))
    learners.refresh()
    loaded = learners.current
    registrations = []
    for k in range(3):
        scenario = synthetic_scenario(f"batch.{k}", seed=10 + k)
        interactions = [(i["user"], i["item"]) for i in scenario.interactions]
        seed = 0 if k < 2 else 1
        registered = registration(interactions, scenario.candidates, None, seed)
        registrations.append((scenario.scenario_id, registered))
    first = registrations[0][1]
    too_few = registration(first.interactions[:2], first.candidates, None, 0)
    batch_sizes = []
    real = adaptation.adapt_scenarios

    def counted(*args, **kwargs):
        batch_sizes.append(len(args[3]))
        return real(*args, **kwargs)

    monkeypatch.setattr(adaptation, "adapt_scenarios", counted)
    asked = [*registrations[:2], ("too-few", too_few), registrations[2]]
    outcomes = adapt_registrations(loaded, asked, MIN_INTERACTIONS)
    monkeypatch.undo()

    assert sorted(batch_sizes) == [1, 2]  # the two with seed 0 together, seed 1 apart
    assert isinstance(outcomes[2], AdaptationInputError)
    assert "usable interaction" in str(outcomes[2])
    for (scenario_id, registered), outcome in zip(
        asked[:2] + asked[3:], outcomes[:2] + outcomes[3:], strict=True
    ):
        alone = adapt_registration(loaded, scenario_id, registered, MIN_INTERACTIONS)
        assert not isinstance(outcome, AdaptationInputError)
        for key in ("steps", "stopped_by", "seed", "variant", "used_interactions"):
            assert outcome.meta[key] == alone.meta[key]
        torch.testing.assert_close(
            load(outcome.params)["theta"], load(alone.params)["theta"], rtol=1e-4, atol=1e-5
        )
        assert outcome.popularity == alone.popularity
