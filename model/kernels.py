"""The project's compiled kernels, one extension module: the fused update-controller step
(csrc/update_cell.cpp, used through model/fused_cell.py) and the ranking of several pools at
once (csrc/rank_pools.cpp, used through model/ranking.py). Built on first use with the
machine's C++ compiler through torch's extension loader, and cached by torch
(TORCH_EXTENSIONS_DIR). Where it cannot be built (no compiler), `load` logs why once and the
callers use their pure-torch references.

Images carry no compiler: they build the module at image build time for each CPU capability
(`python -m model.kernels DIR`, into site-packages), and `load` imports such a prebuilt
module before it tries to build one.
"""

import argparse
import functools
import importlib
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
from torch.utils import cpp_extension

logger = logging.getLogger(__name__)

SOURCES = [Path(__file__).parent / "csrc" / name for name in ("update_cell.cpp", "rank_pools.cpp")]


# at::parallel_for spreads the blocks over torch's threads only when built with OpenMP
# (else it runs them one by one), using the runtime torch already loaded.
OPENMP = "-fopenmp"
COMPILE_FLAGS = ["-O3", "-ffast-math", OPENMP]
ISA_FLAGS = {"AVX2": ["-mavx2", "-mfma"], "AVX512": ["-mavx512f", "-mfma"]}


def extension_name(capability: str) -> str:
    return f"s2meta_kernels_{capability.lower()}"


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
        logger.warning("compiled kernels unavailable, using the references: %s", error)
        return None


def build(capability: str) -> ModuleType:
    """Compile (or find in torch's cache) and import the module for this machine."""
    _ninja_on_path()
    return cpp_extension.load(
        name=extension_name(capability),
        sources=[str(source) for source in SOURCES],
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
    """Compile the module for each CPU capability (torch's names) into importable modules in
    `target` (a directory on sys.path, e.g. site-packages), without importing them (the
    building machine need not run every instruction set), for environments without a
    compiler."""
    _ninja_on_path()
    for capability in capabilities:
        extension = cpp_extension.CppExtension(
            name=extension_name(capability),
            sources=[str(source) for source in SOURCES],
            # -g0: no debug info (the interpreter's flags ask for it; it nearly doubles the
            # build time).
            extra_compile_args=[*COMPILE_FLAGS, "-g0", *ISA_FLAGS.get(capability, [])],
            extra_link_args=[OPENMP],
        )
        distribution = Distribution(
            {
                "name": "s2meta-kernels",
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
    print(f"compiled kernels prebuilt into {args.target}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
