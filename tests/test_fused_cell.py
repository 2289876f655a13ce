"""The fused update-controller cell against the reference controller it replaces."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import fused_cell, kernels
from model.controllers import init_update_controller, update_gates
from model.learner import adapt, init_meta_params
from tests.test_learner import make_config, scenario_batches, tables  # noqa: F401


def lane_major(state: torch.Tensor, sizes: list[int], lanes: int) -> torch.Tensor:
    """[S, n, H] -> the kernel's [S, blocks, H, lanes]: each tensor's elements in runs of
    `lanes`, the last run padded with zeros."""
    blocks = []
    for part in torch.split(state, sizes, dim=1):
        padded = torch.nn.functional.pad(part, (0, 0, 0, -part.shape[1] % lanes))
        blocks.append(padded.unflatten(1, (-1, lanes)).transpose(2, 3))
    return torch.cat(blocks, dim=1).contiguous()


def element_major(state: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """The kernel's [S, blocks, H, lanes] -> [S, n, H], dropping the padding lanes."""
    lanes = state.shape[-1]
    parts, start = [], 0
    for size in sizes:
        count = -(-size // lanes)
        block = state[:, start : start + count].transpose(2, 3).flatten(1, 2)
        parts.append(block[:, :size])
        start += count
    return torch.cat(parts, dim=1)


def instruction_sets() -> list[str]:
    """The machine's own build and, on an AVX-512 machine, the AVX2 build too (eight lanes and
    the portable exp: what AVX2 machines run)."""
    capability = torch.backends.cpu.get_cpu_capability()
    return [capability, "AVX2"] if capability == "AVX512" else [capability]


@pytest.fixture(scope="module", params=instruction_sets())
def extension(request):
    if request.param == torch.backends.cpu.get_cpu_capability():
        module = kernels.load()
    else:
        module = kernels.build(request.param)
    assert module is not None, "the fused cell should build on this machine"
    return module


def controller_inputs(sizes: list[int], scenarios: int, hidden_size: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    meta = init_update_controller(len(sizes), hidden_size, generator)
    # Weights well away from their small initial values, so every gate is exercised.
    meta = {name: torch.randn(v.shape, generator=generator) * 0.5 for name, v in meta.items()}
    n = sum(sizes)
    grad = torch.randn(scenarios, n, generator=generator) * 0.01
    grad[:, :5] = 0.0  # both branches of the preprocessing: exact zeros and tiny values
    grad[:, 5:12] *= 1e-4
    theta = torch.randn(scenarios, n, generator=generator)
    loss = torch.rand(scenarios, generator=generator) + 0.1
    hidden = torch.randn(scenarios, n, hidden_size, generator=generator) * 0.3
    cell = torch.randn(scenarios, n, hidden_size, generator=generator)
    return meta, grad, theta, loss, hidden, cell


@pytest.mark.parametrize("hidden_size", fused_cell.HIDDEN_SIZES)
@pytest.mark.parametrize("scenarios", [1, 3])
def test_fused_gates_equal_the_reference(extension, hidden_size, scenarios):
    # Segment sizes that are not multiples of the kernel's lanes, and a one-element one.
    sizes = [37, 8, 1, 20, 64]
    meta, *inputs = controller_inputs(sizes, scenarios, hidden_size, seed=hidden_size)
    gates = fused_cell.FusedGates(extension, meta, sizes, hidden_size)
    grad, theta, loss, hidden, cell = inputs
    lanes = gates.state_shape[-1]
    assert lanes == extension.lanes
    assert gates.zero_state(scenarios, grad).shape == (scenarios, *gates.state_shape)
    states = (lane_major(hidden, sizes, lanes), lane_major(cell, sizes, lanes))
    with torch.no_grad():
        expected = update_gates(meta, sizes, *inputs)
        alpha, beta, new_hidden, new_cell = gates(meta, sizes, grad, theta, loss, *states)
    # Without a backward pass the states are updated in place.
    assert new_hidden.data_ptr() == states[0].data_ptr()
    assert new_cell.data_ptr() == states[1].data_ptr()
    fused = (alpha, beta, element_major(new_hidden, sizes), element_major(new_cell, sizes))
    for name, want, got in zip(("alpha", "beta", "hidden", "cell"), expected, fused, strict=True):
        assert got.shape == want.shape, name
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6, msg=name)


@pytest.mark.parametrize("grad_mode", [False, True])
def test_scenarios_not_updating_get_zero_gates_and_keep_their_states(extension, grad_mode):
    sizes, hidden_size = [37, 8, 1, 20], 16
    meta, grad, theta, loss, hidden, cell = controller_inputs(sizes, 4, hidden_size, seed=3)
    updating = torch.tensor([True, False, True, False])
    lanes = extension.lanes
    trainable = {name: value.clone().requires_grad_(grad_mode) for name, value in meta.items()}
    gates = fused_cell.FusedGates(extension, trainable, sizes, hidden_size)

    def run(mask):
        states = (lane_major(hidden, sizes, lanes), lane_major(cell, sizes, lanes))
        with torch.set_grad_enabled(grad_mode):
            return gates(trainable, sizes, grad, theta, loss, *states, mask), states

    (alpha, beta, new_hidden, new_cell), before = run(updating)
    (all_alpha, all_beta, all_hidden, all_cell), _ = run(None)
    for got, want in ((alpha, all_alpha), (beta, all_beta)):
        torch.testing.assert_close(got[updating], want[updating])
        assert torch.equal(got[~updating], torch.zeros_like(got[~updating]))
    for got, want, start in ((new_hidden, all_hidden, hidden), (new_cell, all_cell, cell)):
        torch.testing.assert_close(got[updating], want[updating])
        unchanged = lane_major(start, sizes, lanes)[~updating]
        assert torch.equal(got[~updating], unchanged)
    if grad_mode:  # the weights' gradient comes through the updating scenarios alone
        d_alpha = torch.randn(alpha.shape, generator=torch.Generator().manual_seed(4))
        masked = torch.autograd.grad((alpha * d_alpha).sum(), list(trainable.values()))
        full = torch.autograd.grad(
            (all_alpha * d_alpha * updating[:, None]).sum(), list(trainable.values())
        )
        for got, want in zip(masked, full, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    else:
        assert new_hidden.data_ptr() == before[0].data_ptr()  # in place, as without a mask


@pytest.mark.parametrize(
    ("hidden_size", "sizes", "threads"),
    [
        (8, [37, 8, 1, 20], 1),
        (16, [37, 8, 1, 20], 1),
        # A tensor of more elements than one product tile of the backward pass holds, and
        # the blocks shared between two threads (each with its own partial sums).
        (16, [2100, 37], 1),
        (16, [2100, 37], 2),
    ],
)
def test_fused_gradients_equal_the_reference(extension, hidden_size, sizes, threads):
    meta, *inputs = controller_inputs(sizes, 2, hidden_size, seed=7)
    generator = torch.Generator().manual_seed(8)
    d_alpha, d_beta = (torch.randn(2, sum(sizes), generator=generator) for _ in range(2))

    def weight_gradients(gates_of, states_of) -> dict[str, torch.Tensor]:
        trainable = {name: value.clone().requires_grad_(True) for name, value in meta.items()}
        grad, theta, loss, hidden, cell = inputs
        alpha, beta, new_hidden, _ = gates_of(trainable)(
            trainable, sizes, grad, theta, loss, states_of(hidden), states_of(cell)
        )
        assert new_hidden.data_ptr() != hidden.data_ptr()  # the backward pass reads the input
        ((alpha * d_alpha).sum() + (beta * d_beta).sum()).backward()
        return {name: value.grad for name, value in trainable.items()}

    expected = weight_gradients(lambda _: update_gates, lambda state: state)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fused = weight_gradients(
            lambda m: fused_cell.FusedGates(extension, m, sizes, hidden_size),
            lambda state: lane_major(state, sizes, extension.lanes),
        )
    finally:
        torch.set_num_threads(previous_threads)
    for name, want in expected.items():
        assert want.abs().sum() > 0, name
        torch.testing.assert_close(fused[name], want, rtol=1e-4, atol=1e-5, msg=name)


def test_fused_cell_applies_only_where_it_is_built():
    sizes = [10, 3]
    meta, *_ = controller_inputs(sizes, 1, 16, seed=0)
    assert fused_cell.fused_update_gates(meta, sizes, 16) is not None
    assert fused_cell.fused_update_gates(meta, sizes, 12) is None  # not a built hidden size
    as_double = {name: value.double() for name, value in meta.items()}
    assert fused_cell.fused_update_gates(as_double, sizes, 16) is None


@pytest.mark.parametrize("variant", ["interaction", "hybrid"])
def test_adaptation_with_the_fused_cell_equals_the_reference(tables, variant):  # noqa: F811
    config = make_config(variant, max_steps=8, min_steps=2)
    generator = torch.Generator().manual_seed(3)
    meta = init_meta_params(config, generator)
    # A stop controller that stops part-way, so the masked path is taken too.
    meta["stop.out_bias"] = torch.tensor([0.0])
    train, _ = scenario_batches(config, 4, seed=5)
    uniforms = torch.rand(4, 8, generator=generator)
    with torch.no_grad():
        reference = adapt(meta, config, tables, train, uniforms, fused=False)
        fused = adapt(meta, config, tables, train, uniforms)
    assert fused.steps.tolist() == reference.steps.tolist()
    assert len(set(reference.steps.tolist())) > 1, "scenarios should stop at different steps"
    torch.testing.assert_close(fused.theta, reference.theta, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        fused.alpha_mean, reference.alpha_mean, rtol=1e-5, atol=1e-6, equal_nan=True
    )


def test_without_a_compiler_adaptation_falls_back_to_the_reference(monkeypatch, caplog):
    def no_compiler(**_kwargs):
        raise RuntimeError("Error building extension: no c++ compiler")

    monkeypatch.setattr(kernels.cpp_extension, "load", no_compiler)
    kernels.load.cache_clear()
    try:
        sizes = [10, 3]
        meta, *_ = controller_inputs(sizes, 1, 16, seed=0)
        with caplog.at_level(logging.WARNING, logger="model.kernels"):
            assert fused_cell.fused_update_gates(meta, sizes, 16) is None
        assert "no c++ compiler" in caplog.text
    finally:
        kernels.load.cache_clear()


def test_prebuilt_kernels_load_without_a_compiler(tmp_path):
    """What the images do: compile ahead of time (no import while building), then run where
    no compiler is on PATH and torch's extension cache is empty: both kernels of the module,
    the fused cell and the ranking kernel, agree with their references."""
    capability = torch.backends.cpu.get_cpu_capability()
    kernels.prebuild(tmp_path / "site", (capability,))
    probe = (
        "import torch; from model import controllers, fused_cell, kernels\n"
        "module = kernels.load(); assert module is not None\n"
        "print(module.__file__)\n"
        "sizes = [37, 8]; g = torch.Generator().manual_seed(0)\n"
        "meta = controllers.init_update_controller(2, 16, g)\n"
        "args = (torch.randn(1, 45) * 0.01, torch.randn(1, 45), torch.rand(1) + 0.1)\n"
        "gates = fused_cell.fused_update_gates(meta, sizes, 16)\n"
        "with torch.no_grad():\n"
        "    want = controllers.update_gates(meta, sizes, *args, *[torch.zeros(1, 45, 16)] * 2)\n"
        "    got = gates(meta, sizes, *args, *[gates.zero_state(1, args[0])] * 2)\n"
        "for a, b in zip(want[:2], got[:2]):\n"
        "    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)\n"
        "from model import ranking, recommender\n"
        "spec = recommender.RecommenderSpec('hybrid', 16)\n"
        "params = recommender.init_params(spec, g)\n"
        "table, rows = torch.randn(80, 16, generator=g), torch.arange(0, 80, 2)\n"
        "with torch.no_grad():\n"
        "    half = recommender.pool_first_layer(params, table[rows])\n"
        "pool = ranking.RankedPool(spec, params, half, table, rows, torch.rand(40))\n"
        "query = ranking.PoolQuery(pool, torch.randn(3, 16, generator=g), 5)\n"
        "assert ranking.kernel_available() and pool.kernel_applies\n"
        "((values, indices),) = ranking.top_k_pools([query])\n"
        "want_values, want_indices = ranking._top_k_reference(query, ranking.SCORE_CHUNK)\n"
        "torch.testing.assert_close(values, want_values, rtol=1e-5, atol=1e-6)\n"
        "assert torch.equal(indices, want_indices)\n"
    )
    bare_path = tmp_path / "bin"
    bare_path.mkdir()  # nothing on PATH: no compiler, no ninja
    env = {
        "PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{Path(__file__).resolve().parents[1]}",
        "PATH": str(bare_path),
        "TORCH_EXTENSIONS_DIR": str(tmp_path / "empty-cache"),
        "HOME": str(tmp_path),
    }
    done = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().startswith(str(tmp_path / "site"))
