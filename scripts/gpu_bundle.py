"""Prepares, on a machine with the package index, what benchmarks/gpu.sh needs on a lent GPU
machine that has none: that machine's image holds PyTorch, NumPy, SciPy and matplotlib
(Python 3.12, x86-64; /work/.library/device/KINDS.md lists its packages) but not the
service's stack, Redis, nor the shared data, and it can fetch nothing.

Writes, under --out (default .gpu/, which git ignores and the device tool's `carry` takes):
- wheels/: the wheels, for --python-version on manylinux x86-64, of s2meta's dependencies
  (core, the cpu and train extras, and the benchmarks' httpx and psutil from the dev extra),
  as pip resolves them here, less the large compiled packages the image already holds
  (IMAGE_HOLDS);
- data/: the LastFM files the benchmarks train and serve on;
- redis/: this machine's redis-server with the shared libraries it loads beyond the C
  runtime, behind a wrapper named redis-server that points the loader at them;
- COMMIT: the commit the bundle was made at (-dirty with uncommitted changes), for the
  results' `git` field (the device gets a copy of the working tree without .git).

Then, on the device: `bash benchmarks/gpu.sh` with `.gpu` carried. Not part of the test
run. Run: python -m scripts.gpu_bundle [--python-version 3.12] [--out .gpu]
"""

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from benchmarks.report import DATA

ROOT = Path(__file__).resolve().parents[1]
# Held by the device image and too large to carry (the carried tree is limited to 64 MiB):
# torch alone is gigabytes, scipy tens of megabytes. setuptools stays the image's: gpu.sh's
# editable install of s2meta builds with it.
IMAGE_HOLDS = frozenset(
    {
        "torch",
        "numpy",
        "scipy",
        "matplotlib",
        "contourpy",
        "fonttools",
        "kiwisolver",
        "pillow",
        "ninja",
        "setuptools",
    }
)
# Beyond the core and those extras, what the benchmarks import: their HTTP client and process
# figures, taken from the dev extra (which holds test tools the device needs not).
BENCHMARK_DISTRIBUTIONS = frozenset({"httpx", "psutil"})
# manylinux tags pip may take for the device's glibc (2.39 on its Ubuntu 24.04 image).
MANYLINUX_TAGS = (
    *(f"manylinux_2_{minor}_x86_64" for minor in range(17, 40)),
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
# The C runtime and the compiler's support libraries: every machine has its own, newer ones.
SYSTEM_LIBRARIES = re.compile(
    r"^(linux-vdso|ld-linux)|^(libc|libm|libdl|libpthread|librt|libstdc\+\+|libgcc_s)\.so"
)
DATA_FILES = ("LastFM.txt", "LastFM_item2attributes.json")
# What the device tool takes to the lent machine: the working tree and the carried paths.
CARRY_LIMIT_MIB = 64


def distribution_name(requirement: str) -> str:
    """The normalised distribution name a requirement string starts with."""
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


def bundle_requirements(pyproject: Path, extras: tuple[str, ...] = ("cpu", "train")) -> list[str]:
    """s2meta's requirements with the named extras and the benchmarks' own, less IMAGE_HOLDS."""
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project["optional-dependencies"]
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += optional[extra]
    requirements += [r for r in optional["dev"] if distribution_name(r) in BENCHMARK_DISTRIBUTIONS]
    return [r for r in requirements if distribution_name(r) not in IMAGE_HOLDS]


def platform_options(python_version: str) -> list[str]:
    abi = "cp" + python_version.replace(".", "")
    options = ["--only-binary=:all:", "--python-version", python_version]
    options += ["--implementation", "cp", "--abi", abi, "--abi", "abi3", "--abi", "none"]
    for tag in MANYLINUX_TAGS:
        options += ["--platform", tag]
    return options


def resolve(requirements: list[str], python_version: str) -> list[tuple[str, str]]:
    """(name, version) of every distribution pip installs for `requirements` on the device's
    Python and platform, less IMAGE_HOLDS (dependencies such as numpy come back here)."""
    with tempfile.TemporaryDirectory() as scratch:
        report_path = Path(scratch) / "report.json"
        command = [sys.executable, "-m", "pip", "install", "--quiet", "--dry-run"]
        command += ["--ignore-installed", "--target", str(Path(scratch) / "target")]
        command += ["--report", str(report_path), *platform_options(python_version)]
        subprocess.run([*command, *requirements], check=True)
        report = json.loads(report_path.read_text())
    pins = [
        (distribution_name(item["metadata"]["name"]), item["metadata"]["version"])
        for item in report["install"]
    ]
    return sorted(pin for pin in pins if pin[0] not in IMAGE_HOLDS)


def download_wheels(pins: list[tuple[str, str]], python_version: str, wheels: Path) -> None:
    wheels.mkdir(parents=True)
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(wheels)]
    command += platform_options(python_version)
    subprocess.run([*command, *(f"{name}=={version}" for name, version in pins)], check=True)


def shared_libraries(binary: Path) -> list[Path]:
    """The shared libraries `binary` loads, as ldd resolves them here, less SYSTEM_LIBRARIES."""
    listing = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True)
    libraries = []
    for line in listing.stdout.splitlines():
        name, _, rest = line.strip().partition(" => ")
        if not rest or SYSTEM_LIBRARIES.match(name):
            continue
        path = rest.split(" (", 1)[0].strip()
        if path == "not found":
            raise RuntimeError(f"{binary} needs {name}, which is not found here")
        libraries.append(Path(path))
    return libraries


def bundle_redis(redis_server: Path, destination: Path) -> Path:
    """Copy redis-server and the libraries it loads into destination/lib; the wrapper that
    runs it with the loader pointed there (and only it: Python keeps the image's own)."""
    lib = destination / "lib"
    lib.mkdir(parents=True)
    shutil.copy2(redis_server, lib / "redis-server")
    for library in shared_libraries(redis_server):
        shutil.copy2(library, lib / library.name)
    wrapper = destination / "redis-server"
    wrapper.write_text(
        '#!/bin/sh\nlib="$(dirname "$0")/lib"\n'
        'LD_LIBRARY_PATH="$lib" exec "$lib/redis-server" "$@"\n'
    )
    wrapper.chmod(0o755)
    return wrapper


def size_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def working_tree_mib() -> float:
    """What travels beside the bundle: tracked files and the untracked ones git does not
    ignore."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    files = [ROOT / name for name in listed if name and (ROOT / name).is_file()]
    return sum(path.stat().st_size for path in files) / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--python-version", default="3.12", help="the device's Python (3.12)")
    parser.add_argument("--out", type=Path, default=ROOT / ".gpu")
    args = parser.parse_args()
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        print("gpu_bundle: no redis-server on PATH to bundle", file=sys.stderr)
        return 2
    missing = [name for name in DATA_FILES if not (DATA / name).is_file()]
    if missing:
        print(f"gpu_bundle: {', '.join(missing)} not in {DATA} (S2META_DATA_DIR)", file=sys.stderr)
        return 2
    if args.out.exists():
        shutil.rmtree(args.out)
    pins = resolve(bundle_requirements(ROOT / "pyproject.toml"), args.python_version)
    download_wheels(pins, args.python_version, args.out / "wheels")
    (args.out / "data").mkdir()
    for name in DATA_FILES:
        shutil.copy2(DATA / name, args.out / "data" / name)
    wrapper = bundle_redis(Path(redis_server), args.out / "redis")
    described = subprocess.run(
        ["git", "describe", "--always", "--dirty", "--abbrev=7"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    (args.out / "COMMIT").write_text(described.stdout)
    version = subprocess.run(
        [str(wrapper), "--version"], capture_output=True, text=True, check=True
    )
    print(f"{len(pins)} wheels for Python {args.python_version}: {' '.join(n for n, _ in pins)}")
    print(f"redis: {version.stdout.strip()}")
    bundle_mib, tree_mib = size_mib(args.out), working_tree_mib()
    print(f"wrote {args.out}: {bundle_mib:.1f} MiB; the working tree, {tree_mib:.1f} MiB more")
    if bundle_mib + tree_mib > CARRY_LIMIT_MIB:
        print(f"gpu_bundle: over the {CARRY_LIMIT_MIB} MiB the device carries", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
