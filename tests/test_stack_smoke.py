"""The local stack end to end without Docker: the commands and environment that
`docker compose config` gives the redis, trainer and api services, run as local processes
(only what a container would supply differs: the port, the volume paths, the host names).
Train -> publish -> the API loads it -> adapt -> recommend -> train again -> hot reload ->
the scenario re-adapted with the new meta learner."""

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import DATA, ROOT, RedisProcess, compose_config, free_port, needs_redis
from synthetic import ScenarioIds

from meta_training.config import ProtocolConfig
from meta_training.dataset import load_dataset
from meta_training.protocol import build_benchmark

# Faster than the stack's defaults; everything else is the compose file's own.
SMOKE_TRAINING = {
    "S2META_TRAIN_STEPS": "2",
    "S2META_TRAIN_ARGS": "--embedding-dim 16 --meta-batch 2 --valid-every 1",
}


def localised(environment: dict[str, str], paths: dict[str, Path], redis_port: int) -> dict:
    """The service's environment with the container's paths and host names mapped to this
    machine's (volume targets to directories, the redis host to the local server)."""
    local = {}
    for key, value in environment.items():
        value = value.replace("redis://redis:6379", f"redis://127.0.0.1:{redis_port}")
        for target, path in paths.items():
            if value == target or value.startswith(f"{target}/"):
                value = str(path) + value[len(target) :]
        local[key] = value
    venv_bin = str(Path(sys.executable).parent)
    return {**os.environ, **local, "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}"}


@pytest.fixture(scope="module")
def lastfm_scenario() -> ScenarioIds:
    """A LastFM meta-test scenario as string ids: the trainer trains on LastFM, so the
    artifact knows only its users and items."""
    data = load_dataset(DATA / "LastFM")
    task = build_benchmark(data, ProtocolConfig(), seed=0).test[0]
    return ScenarioIds(
        scenario_id=task.scenario_id,
        interactions=[
            {"user": data.user_ids[data.users[r]], "item": data.item_ids[data.items[r]]}
            for r in task.support_rows
        ],
        candidates=[data.item_ids[i] for i in task.pool],
        eval_user=data.user_ids[int(np.min(data.users[task.eval_rows]))],
    )


@pytest.fixture
def redis_server(stack, tmp_path):
    """The compose file's redis command, on a port and directory of this test's own."""
    server = RedisProcess(tmp_path / "redis")
    server.start(tuple(compose_config(stack)["services"]["redis"]["command"]))
    yield server.port
    server.stop()


@needs_redis
def test_train_publish_reload_adapt_recommend(stack, redis_server, tmp_path, lastfm_scenario):
    services = compose_config(stack, "train")["services"]
    paths = {"/registry": tmp_path / "registry", "/data": DATA, "/cache": tmp_path / "cache"}
    (tmp_path / "registry").mkdir()

    trainer = services["trainer"]
    trainer_env = localised({**trainer["environment"], **SMOKE_TRAINING}, paths, redis_server)
    trainer_env["S2META_WORK_DIR"] = str(tmp_path / "work")

    def train() -> str:
        # The trainer image's working directory holds docker/train.sh, as the repository does.
        done = subprocess.run(
            trainer["command"], cwd=ROOT, env=trainer_env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        return done.stdout.strip().splitlines()[-1]

    assert train().startswith("trainer: published v0001")

    api = services["api"]
    port = free_port()
    api_env = localised(api["environment"], paths, redis_server)
    api_env |= {"S2META_HOST": "127.0.0.1", "S2META_PORT": str(port), "S2META_RELOAD_POLL_S": "600"}
    log = (tmp_path / "api.log").open("w")
    server = subprocess.Popen(api["command"], env=api_env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    scenario = lastfm_scenario
    auth = {"Authorization": f"Bearer {api['environment']['S2META_ADMIN_TOKEN']}"}
    try:
        wait_until(lambda: get(f"{base}/readyz").get("meta_learner") == "v0001", server, tmp_path)
        adapted = httpx.post(
            f"{base}/scenarios/{scenario.scenario_id}/adapt",
            json=scenario.body(),
            headers=auth,
            timeout=120,
        )
        assert adapted.status_code == 200, adapted.text
        assert (adapted.json()["revision"], adapted.json()["meta_learner"]) == (1, "v0001")
        params = {"user": scenario.eval_user, "scenario": scenario.scenario_id}
        served = httpx.get(f"{base}/recommend", params=params, timeout=30).json()
        assert served["source"] == "adapted" and len(served["items"]) == 10

        # Registry polling is off (600 s): only the trainer's Redis notification can reload.
        assert train().startswith("trainer: published v0002")
        detail_url = f"{base}/scenarios/{scenario.scenario_id}"
        wait_until(lambda: get(detail_url).get("meta_learner") == "v0002", server, tmp_path)
        served = httpx.get(f"{base}/recommend", params=params, timeout=30).json()
        assert (served["revision"], served["meta_learner"]) == (2, "v0002")
        assert get(f"{base}/readyz")["meta_learner"] == "v0002"
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def get(url: str) -> dict:
    try:
        return httpx.get(url, timeout=5).json()
    except httpx.TransportError:
        return {}


def wait_until(condition, server: subprocess.Popen, tmp_path: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert server.poll() is None, (tmp_path / "api.log").read_text()[-3000:]
        assert time.monotonic() < deadline, (tmp_path / "api.log").read_text()[-3000:]
        time.sleep(0.3)
