"""Render a kustomization offline, for CI: there is no kustomize or kubectl binary on PyPI,
and deploy/ must be validated without a cluster. It implements exactly the subset deploy/
uses, with kustomize's semantics, and refuses anything else (`kubectl kustomize` remains the
reference, and `kubectl apply -k` what users run):

- `resources`: YAML files (several documents each) and directories with a kustomization;
- `namespace`: set on every namespaced object;
- `secretGenerator` (`envs` files and `literals`) with `generatorOptions:
  disableNameSuffixHash: true` (so no reference rewriting is needed);
- `images`: `newName` / `newTag` on matching container images;
- `patches`: inline JSON 6902 patches (`add`, `replace`, `remove`) on a `target` kind/name.

Usage: python scripts/render_kustomize.py DIR > rendered.yaml
"""

import base64
import copy
import sys
from pathlib import Path

import yaml

SUPPORTED = {
    "apiVersion",
    "kind",
    "namespace",
    "resources",
    "secretGenerator",
    "generatorOptions",
    "images",
    "patches",
}
CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "StorageClass", "ClusterRole"}
Resource = dict[str, object]


class RenderError(ValueError):
    pass


def render(directory: Path) -> list[Resource]:
    directory = Path(directory)
    path = directory / "kustomization.yaml"
    if not path.is_file():
        raise RenderError(f"{directory}: no kustomization.yaml")
    spec = yaml.safe_load(path.read_text()) or {}
    unknown = set(spec) - SUPPORTED
    if unknown:
        raise RenderError(f"{path}: fields this renderer does not implement: {sorted(unknown)}")
    resources: list[Resource] = []
    for entry in spec.get("resources", []):
        target = directory / entry
        if target.is_dir():
            resources.extend(render(target))
        elif target.is_file():
            resources.extend(d for d in yaml.safe_load_all(target.read_text()) if d)
        else:
            raise RenderError(f"{path}: resource {entry!r} not found")
    resources.extend(_secrets(directory, spec))
    if "namespace" in spec:
        for resource in resources:
            if resource["kind"] not in CLUSTER_SCOPED:
                resource["metadata"]["namespace"] = spec["namespace"]
    for image in spec.get("images", []):
        _set_image(resources, image)
    for patch in spec.get("patches", []):
        _patch(resources, patch, path)
    return resources


def _secrets(directory: Path, spec: dict) -> list[Resource]:
    generators = spec.get("secretGenerator", [])
    if generators and not spec.get("generatorOptions", {}).get("disableNameSuffixHash"):
        raise RenderError("secretGenerator needs generatorOptions.disableNameSuffixHash: true")
    secrets = []
    for generator in generators:
        pairs = list(generator.get("literals", []))
        for env_file in generator.get("envs", []):
            env_path = directory / env_file
            if not env_path.is_file():
                raise RenderError(f"{env_path}: missing (copy it from {env_path.name}.example)")
            lines = env_path.read_text().splitlines()
            pairs += [line for line in lines if line.strip() and not line.startswith("#")]
        data = {}
        for pair in pairs:
            key, _, value = pair.partition("=")
            data[key.strip()] = base64.b64encode(value.encode()).decode()
        secrets.append(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": generator["name"]},
                "type": generator.get("type", "Opaque"),
                "data": data,
            }
        )
    return secrets


def _containers(resource: Resource) -> list[dict]:
    spec = resource.get("spec", {})
    if resource["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    pod = spec.get("template", {}).get("spec", {})
    return [*pod.get("initContainers", []), *pod.get("containers", [])]


def _set_image(resources: list[Resource], image: dict) -> None:
    for resource in resources:
        for container in _containers(resource):
            name = container["image"].split("@")[0]
            head, _, tag = name.rpartition(":")
            if head and "/" not in tag:  # a tag, not a registry's port
                name = head
            if name != image["name"]:
                continue
            tag = image.get("newTag")
            new_name = image.get("newName", name)
            container["image"] = f"{new_name}:{tag}" if tag else new_name


def _patch(resources: list[Resource], patch: dict, path: Path) -> None:
    if set(patch) != {"target", "patch"}:
        raise RenderError(f"{path}: only inline JSON 6902 patches with a target are implemented")
    target = patch["target"]
    matches = [
        r
        for r in resources
        if r["kind"] == target.get("kind", r["kind"])
        and r["metadata"]["name"] == target.get("name", r["metadata"]["name"])
    ]
    if not matches:
        raise RenderError(f"{path}: patch target {target} matches no resource")
    for resource in matches:
        for operation in yaml.safe_load(patch["patch"]):
            _apply(resource, operation, path)


def _apply(document: Resource, operation: dict, path: Path) -> None:
    op, pointer = operation["op"], operation["path"]
    keys = [k.replace("~1", "/").replace("~0", "~") for k in pointer.lstrip("/").split("/")]
    parent: object = document
    for key in keys[:-1]:
        parent = parent[int(key)] if isinstance(parent, list) else parent[key]
    last = keys[-1]
    try:
        if op == "remove":
            del parent[int(last) if isinstance(parent, list) else last]
        elif op in ("add", "replace"):
            value = copy.deepcopy(operation["value"])
            if isinstance(parent, list):
                if last == "-":
                    parent.append(value)
                elif op == "add":
                    parent.insert(int(last), value)
                else:
                    parent[int(last)] = value
            else:
                if op == "replace" and last not in parent:
                    raise KeyError(last)
                parent[last] = value
        else:
            raise RenderError(f"{path}: JSON patch op {op!r} is not implemented")
    except (KeyError, IndexError) as error:
        raise RenderError(f"{path}: {op} {pointer}: no such location ({error})") from error


def main() -> int:
    try:
        resources = render(Path(sys.argv[1]))
    except (RenderError, IndexError) as error:
        print(f"render_kustomize: error: {error}", file=sys.stderr)
        return 2
    yaml.safe_dump_all(resources, sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
