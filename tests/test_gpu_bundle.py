"""The bundle gpu.sh takes to a lent GPU machine that can fetch nothing: which requirements it
carries, and a redis-server that runs there on the libraries it carries."""

import os
import shutil
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from scripts.gpu_bundle import (
    IMAGE_HOLDS,
    bundle_redis,
    bundle_requirements,
    distribution_name,
    shared_libraries,
)

ROOT = Path(__file__).resolve().parents[1]
REDIS_SERVER = shutil.which("redis-server")
needs_redis_server = pytest.mark.skipif(REDIS_SERVER is None, reason="no redis-server here")


def test_distribution_names_are_normalised() -> None:
    assert distribution_name("prometheus_client>=0.20") == "prometheus-client"
    assert distribution_name("Pydantic.Settings[dotenv] ; python_version>'3'") == (
        "pydantic-settings"
    )
    with pytest.raises(ValueError, match="not a requirement"):
        distribution_name(">=1.0")


def test_requirements_are_the_services_and_trainings_less_what_the_image_holds() -> None:
    names = {distribution_name(r) for r in bundle_requirements(ROOT / "pyproject.toml")}
    # serving, the cpu extra's faiss, the train extra, and the benchmarks' client and psutil
    assert {"fastapi", "uvicorn", "redis", "pydantic-settings", "faiss-cpu", "implicit"} <= names
    assert {"httpx", "psutil"} <= names
    assert not names & {"pytest", "ruff", "schemathesis"}  # the dev extra's test tools
    assert not names & IMAGE_HOLDS
    assert "faiss-gpu" not in names  # one faiss: the two extras write the same package


@needs_redis_server
def test_bundled_redis_server_leaves_the_c_runtime_to_the_machine() -> None:
    names = [library.name for library in shared_libraries(Path(REDIS_SERVER))]
    assert names, "redis-server loads libraries beyond the C runtime (jemalloc, ssl ...)"
    runtime = ("libc.so", "libm.so", "ld-linux", "libstdc++.so", "libgcc_s.so")
    assert not any(name.startswith(runtime) for name in names)
    assert any(name.startswith("libcrypto.so") for name in names)  # libc's prefix, not libc


@needs_redis_server
def test_bundled_redis_server_runs_on_the_libraries_beside_it(tmp_path: Path) -> None:
    wrapper = bundle_redis(Path(REDIS_SERVER), tmp_path / "redis")
    environment = {key: value for key, value in os.environ.items() if key != "LD_LIBRARY_PATH"}
    version = subprocess.run(
        [str(wrapper), "--version"], env=environment, capture_output=True, text=True, check=True
    )
    assert version.stdout.startswith("Redis server v=")
    # The libraries the running server mapped (the wrapper execs it, so the pid is its own).
    server = subprocess.Popen(
        [str(wrapper), "--port", "0", "--unixsocket", "redis.sock", "--save", ""],
        env=environment,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
    )
    bundled = tmp_path / "redis" / "lib"
    expected = {str(library) for library in bundled.iterdir() if library.name != "redis-server"}
    try:
        deadline = time.monotonic() + 10
        mapped: set[str] = set()
        while not expected <= mapped and time.monotonic() < deadline:
            maps = psutil.Process(server.pid).memory_maps()
            mapped = {region.path for region in maps if region.path.startswith("/")}
            time.sleep(0.05)
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert expected <= mapped
