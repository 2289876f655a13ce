"""The fused update-controller step (model/csrc/update_cell.cpp): built on first use with the
machine's C++ compiler through torch's extension loader, and cached by torch
(TORCH_EXTENSIONS_DIR). It computes the same gates as `controllers.update_gates` to float
rounding, several times faster on the CPU, and its backward gives the controller weights'
gradients, so evaluation, serving and meta-training all run it. Where it cannot be built (no
compiler), adaptation logs why once and uses the reference.

Images carry no compiler: they build the cell at image build time for each CPU capability
(`python -m model.fused_cell DIR`, into site-packages), and `load` imports such a prebuilt
module before it tries to build one.
"""

import argparse
import functools
import importlib
import itertools
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import ninja
import torch
from setuptools import Distribution
from torch import Tensor
from torch.utils import cpp_extension

from model.controllers import PREPROCESS_P
from model.params import Params

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "update_cell.cpp"
HIDDEN_SIZES = (8, 16, 32)  # the sizes the kernel is instantiated for


# OpenMP: at::parallel_for spreads the blocks over torch's threads only where the extension
# is built with it (without, it silently runs them one after another); the module then uses
# the OpenMP runtime torch already loaded (libgomp.so.1, torch's own copy).
OPENMP = "-fopenmp"
COMPILE_FLAGS = ["-O3", "-ffast-math", OPENMP]
ISA_FLAGS = {"AVX2": ["-mavx2", "-mfma"], "AVX512": ["-mavx512f", "-mfma"]}


def extension_name(capability: str) -> str:
    return f"s2meta_update_cell_{capability.lower()}"


@functools.cache
def load() -> ModuleType | None:
    """The extension for this machine's CPU capability: prebuilt, else built now (cached by
    torch), else None (logged) where it cannot be built."""
    # The instruction set is chosen from what this machine runs torch with, not -march=native,
    # so a build made on one machine stays valid on another of the same capability.
    capability = torch.backends.cpu.get_cpu_capability()
    try:
        return importlib.import_module(extension_name(capability))
    except ImportError:
        pass  # not prebuilt into this environment: build it below
    try:
        return build(capability)
    except (OSError, ImportError, RuntimeError, subprocess.CalledProcessError) as error:
        logger.warning("fused update cell unavailable, using the reference: %s", error)
        return None


def build(capability: str) -> ModuleType:
    """Compile (or find in torch's cache) and import the cell for this machine."""
    _ninja_on_path()
    return cpp_extension.load(
        name=extension_name(capability),
        sources=[str(SOURCE)],
        extra_cflags=[*COMPILE_FLAGS, *ISA_FLAGS.get(capability, [])],
        extra_ldflags=[OPENMP],
        verbose=False,
    )


def _ninja_on_path() -> None:
    if shutil.which("ninja") is None:
        # The ninja wheel (a dependency) sits in the environment's bin, which is not on PATH
        # when the environment's python runs without activation.
        os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"


def prebuild(target: Path, capabilities: tuple[str, ...] = ("DEFAULT", "AVX2", "AVX512")) -> None:
    """Compile the cell for each CPU capability (torch's names) into importable modules in
    `target` (a directory on sys.path, e.g. site-packages), without importing them (the
    building machine need not run every instruction set), for environments without a
    compiler."""
    _ninja_on_path()
    for capability in capabilities:
        extension = cpp_extension.CppExtension(
            name=extension_name(capability),
            sources=[str(SOURCE)],
            # -g0: no debug info (the interpreter's flags ask for it; it nearly doubles the
            # build time).
            extra_compile_args=[*COMPILE_FLAGS, "-g0", *ISA_FLAGS.get(capability, [])],
            extra_link_args=[OPENMP],
        )
        distribution = Distribution(
            {
                "name": "s2meta-update-cell",
                "ext_modules": [extension],
                "cmdclass": {"build_ext": cpp_extension.BuildExtension},
            }
        )
        command = distribution.get_command_obj("build_ext")
        # Each capability its own scratch directory: the object files share a name.
        with tempfile.TemporaryDirectory() as scratch:
            command.build_lib = str(target)
            command.build_temp = scratch
            distribution.run_command("build_ext")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=prebuild.__doc__)
    parser.add_argument("target", type=Path, help="a directory on sys.path (site-packages)")
    args = parser.parse_args(argv)
    prebuild(args.target)
    print(f"fused update cell prebuilt into {args.target}", file=sys.stderr)
    return 0


class _FusedStep(torch.autograd.Function):
    """One fused controller step; differentiable in the controller's weights through alpha
    and beta (the other inputs and the new states are constants to the first-order
    meta-gradient)."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        extension: ModuleType,
        offsets: list[int],
        inputs: tuple[Tensor, ...],
        states_out: tuple[Tensor, Tensor],
        *weights: Tensor,
    ) -> tuple[Tensor, Tensor]:
        alpha, beta = extension.update_gates(*inputs, *weights, offsets, PREPROCESS_P, *states_out)
        ctx.save_for_backward(*inputs, *weights)
        ctx.extension, ctx.offsets = extension, offsets
        return alpha, beta

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, d_alpha: Tensor, d_beta: Tensor
    ) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors
        d_weights = ctx.extension.update_gates_backward(
            *saved, ctx.offsets, PREPROCESS_P, d_alpha.contiguous(), d_beta.contiguous()
        )
        return (None, None, None, None, *d_weights)


class FusedGates:
    """A drop-in for `controllers.update_gates` on one set of controller weights (packed
    once, so their gradients flow back through the packing). Its recurrent states are the
    kernel's lane-major [S, blocks, H, lanes] rather than the reference's [S, n, H]:
    `zero_state` makes them."""

    def __init__(self, extension: ModuleType, meta: Params, sizes: list[int], hidden_size: int):
        self.extension = extension
        self.offsets = [0, *itertools.accumulate(sizes)]
        lanes = int(extension.lanes)
        self.state_shape = (sum(-(-size // lanes) for size in sizes), hidden_size, lanes)
        self.packed = [
            torch.stack([meta[f"update.{k}.{part}"] for k in range(len(sizes))])
            for part in ("weight", "bias", "out_weight", "out_bias")
        ]

    def zero_state(self, num_scenarios: int, like: Tensor) -> Tensor:
        return like.new_zeros(num_scenarios, *self.state_shape)

    def __call__(
        self,
        _meta: Params,
        _sizes: list[int],
        grad: Tensor,
        theta: Tensor,
        loss: Tensor,
        hidden: Tensor,
        cell: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """alpha, beta [S, n] and the new states; without a backward pass to keep them for,
        the new states are `hidden` and `cell` themselves, updated in place."""
        # The controller's inputs are constants (first-order), whatever their graph.
        inputs = tuple(x.detach().contiguous() for x in (grad, theta, loss, hidden, cell))
        if torch.is_grad_enabled() and any(w.requires_grad for w in self.packed):
            # The backward pass reads this step's states: keep them.
            states_out = (torch.empty_like(inputs[3]), torch.empty_like(inputs[4]))
            alpha, beta = _FusedStep.apply(
                self.extension, self.offsets, inputs, states_out, *self.packed
            )
        else:
            # Without a backward pass the states are updated in place (no new buffers: at a
            # batch of scenarios, fresh pages each step cost as much as a tenth of the step)
            # and the extension is called directly (autograd's bookkeeping is a few percent
            # of a step at one scenario).
            states_out = (inputs[3], inputs[4])
            alpha, beta = self.extension.update_gates(
                *inputs, *self.packed, self.offsets, PREPROCESS_P, *states_out
            )
        return alpha, beta, *states_out


def fused_update_gates(meta: Params, sizes: list[int], hidden_size: int) -> FusedGates | None:
    """The fused cell on these controller weights, or None where it does not apply: the
    weights are not float32 on the CPU, the hidden size is not built, or the cell cannot be
    built here."""
    controller = [value for name, value in meta.items() if name.startswith("update.")]
    if hidden_size not in HIDDEN_SIZES or any(
        w.device.type != "cpu" or w.dtype != torch.float32 for w in controller
    ):
        return None
    extension = load()
    if extension is None:
        return None
    return FusedGates(extension, meta, sizes, hidden_size)


if __name__ == "__main__":
    sys.exit(main())
