"""The compiled adaptation step in the service (service/compilation.py): compiled in the
background once a meta learner loads while the eager step serves, so no request waits for a
compile; a failed compile leaves the eager step serving; compiled adaptations come in the
batch sizes warmed and give the eager step's records; re-adaptation after a hot reload waits
for the compile, and runs on its own thread count."""

import asyncio
import dataclasses
import logging
import threading

import pytest
import torch
from conftest import running
from safetensors.torch import load
from synthetic import synthetic_artifact, synthetic_scenario
from test_hot_reload import wait_for
from torch._dynamo.utils import counters

from model.artifact import MetaLearner, publish, save_artifact
from service import adaptation, compilation
from service.adaptation import adapt_registrations, registration
from service.compilation import StepCompiler
from service.learners import MetaLearners
from service.metrics import ServiceMetrics
from service.settings import Settings

MIN_INTERACTIONS = 8


def compiled_gauges(app) -> dict[str, float]:
    sample = app.state.metrics.registry.get_sample_value
    return {
        variant: sample("s2meta_adaptation_compiled", {"variant": variant})
        for variant in ("interaction", "mapping", "hybrid")
    }


def recorded_modes(monkeypatch, threads: list[int] | None = None) -> list[bool]:
    """Whether each adaptation the service runs asks for the compiled step (and, into
    `threads`, torch's thread count it runs with); run eagerly here, so that no test pays
    for compiling it."""
    modes: list[bool] = []
    real = adaptation.adapt_scenarios

    def recorded(*args, compiled: bool = False, **kwargs):
        modes.append(compiled)
        if threads is not None:
            threads.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(adaptation, "adapt_scenarios", recorded)
    return modes


def held_warm_up(monkeypatch, fail: bool = False) -> tuple[threading.Event, list[str]]:
    """A warm-up that holds until the event is set, then succeeds (or raises, `fail`)."""
    release, warmed = threading.Event(), []

    def warm_up(meta, config, tables, batch_sizes) -> None:
        release.wait(timeout=60)
        if fail:
            raise RuntimeError("no C compiler")
        warmed.append(config.recommender.variant)

    monkeypatch.setattr(compilation, "warm_up_adaptation", warm_up)
    return release, warmed


@pytest.mark.anyio
async def test_the_eager_step_serves_while_the_compiled_one_warms_up(
    registry, scenario, monkeypatch
):
    release, warmed = held_warm_up(monkeypatch)
    modes = recorded_modes(monkeypatch)
    async with running(Settings(registry=registry, adapt_compile=True)) as (app, client):
        ready = await client.get("/readyz")
        assert ready.status_code == 200  # readiness does not wait for the compile
        adapted = await client.post("/scenarios/early/adapt", json=scenario.body())
        assert adapted.status_code == 200, adapted.text
        assert modes == [False]
        assert compiled_gauges(app) == {"interaction": 0, "mapping": 0, "hybrid": 0}
        release.set()

        async def compiled() -> bool:
            return set(compiled_gauges(app).values()) == {1}

        await wait_for(compiled, what="the compiled step")
        default = app.state.service.learners.current.artifact.default_variant
        variants = list(dict.fromkeys(warmed))  # one warm-up per (batch size, threads)
        assert variants[0] == default and sorted(variants) == ["hybrid", "interaction", "mapping"]
        adapted = await client.post("/scenarios/later/adapt", json=scenario.body())
        assert adapted.status_code == 200, adapted.text
        assert modes == [False, True]


@pytest.mark.anyio
async def test_a_failed_compile_leaves_the_eager_step_serving(
    registry, scenario, monkeypatch, caplog
):
    release, _ = held_warm_up(monkeypatch, fail=True)
    release.set()
    modes = recorded_modes(monkeypatch)
    with caplog.at_level(logging.ERROR, logger="service.compilation"):
        async with running(Settings(registry=registry, adapt_compile=True)) as (app, client):
            compiler = app.state.service.writes.compiler
            await asyncio.to_thread(compiler.wait, 30)
            assert compiler.settled(app.state.service.learners.current)
            adapted = await client.post("/scenarios/s/adapt", json=scenario.body())
            assert adapted.status_code == 200, adapted.text
            assert modes == [False]
            assert compiled_gauges(app) == {"interaction": 0, "mapping": 0, "hybrid": 0}
            sample = app.state.metrics.registry.get_sample_value
            for variant in ("interaction", "mapping", "hybrid"):
                labels = {"variant": variant}
                assert sample("s2meta_adaptation_compile_failures_total", labels) == 1
    failures = [r for r in caplog.records if "adapts eagerly" in r.getMessage()]
    assert len(failures) == 3 and "no C compiler" in caplog.text


def test_compiled_batches_are_the_sizes_warmed(registry, monkeypatch):
    release, _ = held_warm_up(monkeypatch)
    release.set()
    learners = MetaLearners(registry, torch.device("cpu"))
    learners.refresh()
    config = learners.current.learner(None).config
    compiler = StepCompiler(True, 4, (1, 1), ServiceMetrics())
    items = list(range(11))
    assert compiler.chunks(config, items) == [(False, items)]  # not warm yet: one eager batch
    compiler.warm(learners.current)
    assert compiler.wait(30)
    # Two full batches; a remainder of 3 (over half a batch) padded with its last item.
    assert compiler.chunks(config, items) == [
        (True, [0, 1, 2, 3]),
        (True, [4, 5, 6, 7]),
        (True, [8, 9, 10, 10]),
    ]
    # A remainder of 1 or 2 goes one at a time.
    assert compiler.chunks(config, items[:6]) == [(True, [0, 1, 2, 3]), (True, [4]), (True, [5])]
    assert compiler.chunks(config, [7]) == [(True, [7])]


def test_compiled_adaptations_give_the_eager_records(registry):
    learners = MetaLearners(registry, torch.device("cpu"))
    learners.refresh()
    loaded = learners.current
    threads = torch.get_num_threads()  # the adaptations below run on this thread
    compiler = StepCompiler(True, 2, (threads, threads), ServiceMetrics())
    compiler.warm(loaded)  # compiles for real, in the background
    assert compiler.wait(900)
    assert all(compiler.compiled(learner.config) for learner in loaded.artifact.learners.values())
    registrations = []
    for k in range(3):  # a batch of 2, then one alone
        scenario = synthetic_scenario(f"compiled.{k}", seed=20 + k)
        interactions = [(i["user"], i["item"]) for i in scenario.interactions]
        registrations.append(
            (scenario.scenario_id, registration(interactions, scenario.candidates, None, 0))
        )
    graphs = counters["stats"]["unique_graphs"]
    compiled = adapt_registrations(loaded, registrations, MIN_INTERACTIONS, compiler)
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled on the way
    eager = adapt_registrations(loaded, registrations, MIN_INTERACTIONS)
    for fast, slow in zip(compiled, eager, strict=True):
        assert fast.meta["steps"] == slow.meta["steps"]
        torch.testing.assert_close(
            load(fast.params)["theta"], load(slow.params)["theta"], rtol=1e-4, atol=1e-5
        )


@pytest.mark.anyio
async def test_re_adaptation_waits_for_the_compile(registry, scenario, monkeypatch, tmp_path):
    # The next version's learners take fewer steps: configurations not compiled yet.
    artifact = synthetic_artifact()
    learners = {
        variant: MetaLearner(learner.meta, dataclasses.replace(learner.config, max_steps=12))
        for variant, learner in artifact.learners.items()
    }
    next_version = tmp_path / "next"
    save_artifact(dataclasses.replace(artifact, learners=learners), next_version)
    settings = Settings(
        registry=registry,
        reload_poll_s=0.1,
        adapt_compile=True,
        adapt_threads=1,
        readapt_threads=2,
    )
    release, _ = held_warm_up(monkeypatch)
    release.set()  # v0001 warms up at once
    threads: list[int] = []
    modes = recorded_modes(monkeypatch, threads)
    before = torch.get_num_threads()
    async with running(settings) as (app, client):
        service = app.state.service
        await asyncio.to_thread(service.writes.compiler.wait, 30)
        await client.post(f"/scenarios/{scenario.scenario_id}/adapt", json=scenario.body())
        release.clear()  # v0002's configurations are held compiling
        publish(next_version, registry)

        async def switched() -> bool:
            return service.learners.current.version == "v0002"

        await wait_for(switched, what="v0002 loaded")
        await asyncio.sleep(0.5)
        meta = await service.store.get_meta(scenario.scenario_id)
        assert meta["meta_learner"] == "v0001"  # held while v0002 compiles
        release.set()

        async def readapted() -> bool:
            meta = await service.store.get_meta(scenario.scenario_id)
            return meta["meta_learner"] == "v0002"

        await wait_for(readapted, what="re-adaptation")
        assert modes == [True, True]
        # A request's adaptation on S2META_ADAPT_THREADS, a re-adaptation on
        # S2META_READAPT_THREADS (each the worker thread's own setting).
        assert threads == [1, 2]
    assert torch.get_num_threads() == before  # the workers' settings stay their own
