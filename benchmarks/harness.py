"""What the service benchmarks share: the stack as deployed on loopback (its own redis-server
with an append-only file, a meta learner trained on LastFM with a tiny budget and published,
`s2meta serve` as a subprocess), the LastFM meta-test scenarios to register through the API,
and figures of the stack's processes (psutil). Free ports come from benchmarks/ports.py, the
results file from benchmarks/report.py."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import psutil
import redis

from benchmarks.ports import free_port
from benchmarks.report import DATA
from meta_training.prepare import prepare_for_artifact
from service.store import RedisStore

S2META = str(Path(sys.executable).with_name("s2meta"))
NAMESPACE = "s2meta"  # the service's default key prefix
POOL_RANGE = (300, 1000)  # the LastFM meta-test scenarios start_lastfm_stack returns
COMPILED_GAUGE = "s2meta_adaptation_compiled"


def run(command: list[str]) -> str:
    """Run a command to its end; its stdout, or an error with its stderr's tail."""
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:2])} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def stop_process(process: subprocess.Popen, timeout_s: float = 60) -> int:
    """SIGTERM, then SIGKILL if it does not exit in time. Returns the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def rss_bytes(pid: int) -> int | None:
    """Resident memory of a process, None once it is gone."""
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.NoSuchProcess:
        return None


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) a process and the processes it started (uvicorn's
    workers) have used so far."""
    process = psutil.Process(pid)
    times = [p.cpu_times() for p in (process, *process.children(recursive=True))]
    return sum(t.user + t.system for t in times)


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


@dataclass(frozen=True)
class Scenario:
    """A LastFM meta-test scenario in the API's terms."""

    scenario_id: str
    body: dict[str, object]
    users: list[str]  # its evaluation users


class Stack:
    """Redis, the registry and the API as local processes in one directory."""

    def __init__(self, root: Path, admin_token: str) -> None:
        self.root = root
        self.artifact = root / "artifact"
        self.registry = root / "registry"
        self.cache = root / "cache"
        self.redis_dir = root / "redis"
        self.redis_dir.mkdir()
        self.redis_port = free_port()
        self.api_port = free_port()
        self.admin_token = admin_token
        self.redis: subprocess.Popen | None = None
        self.api: subprocess.Popen | None = None
        self.api_log = root / "api.log"
        self.compiled_after_s: float | None = None

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def train_and_publish(self, data: Path, embedding_dim: int = 16) -> str:
        budget = ["--meta-steps", "2", "--meta-batch", "2", "--embedding-dim", str(embedding_dim)]
        paths = ["--data", str(data), "--out", str(self.artifact), "--cache-dir", str(self.cache)]
        # The benchmarks replay meta-test scenarios, which only the evaluation protocol holds out.
        run([S2META, "train", *paths, *budget, "--protocol", "evaluation"])
        return self.publish()

    def publish_command(self, notify: bool = False) -> list[str]:
        command = [S2META, "publish", str(self.artifact), "--registry", str(self.registry)]
        return [*command, *(["--notify", self.redis_url] if notify else [])]

    def publish(self) -> str:
        return run(self.publish_command()).split()[-1]

    def start_redis(self) -> None:
        where = [
            "--port",
            str(self.redis_port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.redis_dir),
        ]
        durable = ["--appendonly", "yes", "--appendfsync", "always", "--save", ""]
        self.redis = subprocess.Popen(
            ["redis-server", *where, *durable],
            stdout=(self.root / "redis.log").open("a"),
            stderr=subprocess.STDOUT,
        )
        client = redis.Redis(port=self.redis_port)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.redis.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
        client.close()

    def stop_redis(self) -> int:
        assert self.redis is not None
        code = stop_process(self.redis)
        self.redis = None
        return code

    def start_api(self, settings: dict[str, str] | None = None) -> None:
        """`s2meta serve` over this stack's registry and Redis; `settings`: more S2META_*
        variables. Returns once it is ready and its background compile of the adaptation
        step is over (`compiled_after_s`: the seconds that took, None where it compiles
        nothing), so that no benchmark measures beside a compile."""
        env = {
            **os.environ,
            "S2META_REGISTRY": str(self.registry),
            "S2META_REDIS_URL": self.redis_url,
            "S2META_PORT": str(self.api_port),
            "S2META_ADMIN_TOKEN": self.admin_token,
            **(settings or {}),
        }
        self.api = subprocess.Popen(
            [S2META, "serve"], env=env, stdout=self.api_log.open("w"), stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{self.base_url}/readyz", timeout=2).status_code == 200:
                    compiles = env.get("S2META_ADAPT_COMPILE", "true").lower() != "false"
                    self.compiled_after_s = self.wait_compiled() if compiles else None
                    return
            except httpx.TransportError:
                pass
            if self.api.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the API did not get ready:\n{self.log_tail()}")
            time.sleep(0.5)

    def wait_compiled(self, timeout_s: float = 900) -> float | None:
        """Wait until the API's background compile is over, so the cores are quiet again:
        every variant's s2meta_adaptation_compiled is 1 (all workers), or its compile failed
        (the API then adapts eagerly, said in its log). Returns the seconds waited, None
        where the API has no such gauge; an error on timeout."""
        start = time.monotonic()
        while True:
            text = httpx.get(f"{self.base_url}/metrics", timeout=10).text
            if COMPILED_GAUGE not in text:
                return None
            compiled = _samples(text, COMPILED_GAUGE)
            failed = _samples(text, "s2meta_adaptation_compile_failures_total")
            if compiled and all(v >= 1 or failed.get(k, 0) > 0 for k, v in compiled.items()):
                if failed:
                    print(f"warning: the compile failed for {sorted(failed)}: eager there")
                return time.monotonic() - start
            if time.monotonic() - start > timeout_s:
                raise RuntimeError(f"not compiled in {timeout_s} s:\n{self.log_tail()}")
            time.sleep(0.5)

    def stop_api(self) -> int:
        assert self.api is not None
        return stop_process(self.api)

    def log_tail(self, chars: int = 3000) -> str:
        return self.api_log.read_text(errors="replace")[-chars:]

    def close(self) -> None:
        """Stop whatever still runs (after a failure)."""
        if self.api is not None and self.api.poll() is None:
            stop_process(self.api)
        if self.redis is not None:
            stop_process(self.redis)


def _samples(metrics: str, name: str) -> dict[str, float]:
    """A labelled metric's samples in a Prometheus exposition, by label set."""
    found = {}
    for line in metrics.splitlines():
        if line.startswith(f"{name}{{"):
            labels, value = line.rsplit(" ", 1)
            found[labels[len(name) :]] = float(value)
    return found


def meta_test_scenarios(artifact: Path, data: Path, cache: Path) -> list[Scenario]:
    """The benchmark's meta-test scenarios the artifact was trained beside, as string ids."""
    metrics = json.loads((artifact / "metrics.json").read_text())
    benchmark = prepare_for_artifact(metrics, data, cache).benchmark
    ids = benchmark.data
    scenarios = []
    for task in benchmark.test:
        rows = task.support_rows
        body = {
            "interactions": [
                {"user": ids.user_ids[u], "item": ids.item_ids[i]}
                for u, i in zip(ids.users[rows], ids.items[rows], strict=True)
            ],
            "candidates": [ids.item_ids[i] for i in task.pool],
        }
        users = [ids.user_ids[u] for u in np.unique(ids.users[task.eval_rows])]
        scenarios.append(Scenario(task.scenario_id, body, users))
    return scenarios


def start_lastfm_stack(
    stack: Stack, name: str, settings: dict[str, str] | None = None
) -> list[Scenario]:
    """Redis, a meta learner trained on LastFM with a tiny budget (64-dim) and published, and
    the API (`settings`: more S2META_* variables); the LastFM meta-test scenarios with pools in
    POOL_RANGE (not yet registered)."""
    print(f"{name}: training a meta learner (tiny budget, 64-dim) and publishing ...")
    stack.start_redis()
    stack.train_and_publish(DATA / "LastFM", embedding_dim=64)
    stack.start_api(settings)
    return [
        s
        for s in meta_test_scenarios(stack.artifact, DATA / "LastFM", stack.cache)
        if POOL_RANGE[0] <= len(s.body["candidates"]) <= POOL_RANGE[1]
    ]


def register(stack: Stack, scenarios: list[Scenario], variant: str | None = None) -> list[str]:
    """Adapt the scenarios through the API (as `<variant>-<id>` when a variant is given);
    their ids."""
    ids = []
    for scenario in scenarios:
        ids.append(f"{variant}-{scenario.scenario_id}" if variant else scenario.scenario_id)
        httpx.post(
            f"{stack.base_url}/scenarios/{ids[-1]}/adapt",
            json={**scenario.body, "variant": variant},
            headers={"Authorization": f"Bearer {stack.admin_token}"},
            timeout=120,
        ).raise_for_status()
    return ids


async def copy_scenarios(redis_url: str, sources: list[str], count: int) -> list[tuple[str, str]]:
    """`count` new scenarios, each a copy of a source's stored record; (id, source) pairs."""
    store = RedisStore(redis_url, NAMESPACE)
    try:
        states = [(source, (await store.get(source)).state) for source in sources]
        copies = []
        for k in range(count):
            source, state = states[k % len(states)]
            copies.append((f"copy-{k}-{source}", source))
            await store.put(copies[-1][0], state)
        return copies
    finally:
        await store.close()
