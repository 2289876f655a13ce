"""The meta-learner artifact: everything serving needs, nothing of training.

A directory:
- `meta_learner.<variant>.safetensors`: omega (initial parameters, update and stop
  controllers) of each recommender variant that was meta-trained;
- `embeddings.safetensors`: the fixed user and item embeddings;
- `ids.json`: user and item ids in table order;
- `ids.safetensors`: the same ids as fixed-width bytes with their sorted order, which the
  service maps instead of parsing ids.json (model/ids.py); absent from artifacts written
  before it, whose ids are read from ids.json;
- `config.json`: format version, the default variant (chosen on meta-valid) and each
  variant's learner configuration;
- `metrics.json`: what training measured (meta-valid Recall@20, ...);
- `manifest.json`: sha256 and size of every file above, written last.

A registry is a directory of published versions, `versions/<version>/`, and a `current`
file naming one; publishing copies the artifact in under a temporary name, renames it into
place, and only then replaces `current` (atomically), so readers never see a partial one.
A staged publication leaves `current` alone. A `history` file logs every publication and
every move of `current`, serialised by a lock file, `.lock` (model/history.py); the
operations on versions (promote, roll back, list, remove) are model/registry.py's.
"""

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import TypeAdapter, ValidationError
from safetensors.torch import load_file, save_file

from model.errors import ArtifactError
from model.history import (
    CURRENT,
    VERSION_PATTERN,
    checked_version,
    history_lines,
    move_current,
    record,
    registry_lock,
)
from model.ids import IdTable, map_index, map_safetensors, mapped_tensor, save_index
from model.inner_loss import Tables
from model.learner_config import LearnerConfig
from model.params import Params

FORMAT_VERSION = 2
# Present in every artifact; the meta learners' files are named by config.json.
COMMON_FILES = ("embeddings.safetensors", "ids.json", "config.json", "metrics.json")
# Written by save_artifact since the service maps its ids; optional, so the format and
# older artifacts stay readable both ways (older code hashes it and reads ids.json).
IDS_INDEX = "ids.safetensors"
MANIFEST = "manifest.json"
VERSIONS = "versions"
# What a publisher announces on the service's event channel (Redis pub/sub), so replicas load
# a new version at once instead of at their next registry poll.
PUBLISHED_EVENT = "meta_learner_published"
_LEARNER_CONFIG = TypeAdapter(LearnerConfig)


def events_channel(namespace: str) -> str:
    return f"{namespace}:events"


@dataclass(frozen=True)
class MetaLearner:
    """One variant's omega and the learner configuration it was trained with."""

    meta: Params
    config: LearnerConfig


@dataclass(frozen=True)
class Artifact:
    learners: dict[str, MetaLearner]  # by recommender variant
    default_variant: str
    tables: Tables
    user_ids: Sequence[str]  # a list, or an IdTable when loaded
    item_ids: Sequence[str]
    metrics: dict[str, object]

    def __post_init__(self) -> None:
        if self.default_variant not in self.learners:
            raise ArtifactError(
                f"default variant {self.default_variant!r} is not among {sorted(self.learners)}"
            )
        for variant, learner in self.learners.items():
            if learner.config.recommender.variant != variant:
                raise ArtifactError(
                    f"learner under {variant!r} is a {learner.config.recommender.variant!r}"
                )

    @property
    def meta(self) -> Params:
        """The default variant's omega."""
        return self.learners[self.default_variant].meta

    @property
    def learner(self) -> LearnerConfig:
        """The default variant's learner configuration."""
        return self.learners[self.default_variant].config


def _meta_file(variant: str) -> str:
    return f"meta_learner.{variant}.safetensors"


def save_artifact(artifact: Artifact, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for variant, learner in artifact.learners.items():
        save_file(
            {k: v.detach().contiguous() for k, v in learner.meta.items()},
            str(directory / _meta_file(variant)),
        )
    save_file(
        {"user": artifact.tables.user.contiguous(), "item": artifact.tables.item.contiguous()},
        str(directory / "embeddings.safetensors"),
    )
    users = IdTable.build(artifact.user_ids, "user ids")
    items = IdTable.build(artifact.item_ids, "item ids")
    _write_json(directory / "ids.json", {"users": list(users), "items": list(items)})
    save_index({"user": users, "item": items}, directory / IDS_INDEX)
    _write_json(
        directory / "config.json",
        {
            "format_version": FORMAT_VERSION,
            "default_variant": artifact.default_variant,
            "learners": {
                variant: dataclasses.asdict(learner.config)
                for variant, learner in artifact.learners.items()
            },
        },
    )
    _write_json(directory / "metrics.json", artifact.metrics)
    names = (*COMMON_FILES, IDS_INDEX, *(_meta_file(variant) for variant in artifact.learners))
    manifest = {name: _file_entry(directory / name) for name in names}
    _write_json(directory / MANIFEST, {"format_version": FORMAT_VERSION, "files": manifest})


def verify_artifact(directory: Path) -> None:
    """Raise ArtifactError unless every file is present with the manifest's sha256."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{directory}: no {MANIFEST} (not an artifact, or a partial one)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ArtifactError(f"{manifest_path}: unreadable manifest ({error})") from error
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{manifest_path}: format version {manifest.get('format_version')!r}, "
            f"this code reads {FORMAT_VERSION}"
        )
    if not isinstance(files, dict) or not set(COMMON_FILES) <= set(files):
        raise ArtifactError(f"{manifest_path}: does not list {list(COMMON_FILES)}")
    for name, entry in files.items():
        path = directory / name
        if Path(name).name != name:
            raise ArtifactError(f"{manifest_path}: file name {name!r} is not a plain name")
        if not path.is_file():
            raise ArtifactError(f"{path}: missing")
        if _file_entry(path) != entry:
            raise ArtifactError(f"{path}: sha256 does not match the manifest (corrupt)")
    try:
        config = json.loads((directory / "config.json").read_text())
        learners = config["learners"]
        default = config["default_variant"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ArtifactError(f"{directory / 'config.json'}: unreadable ({error})") from error
    if default not in learners:
        raise ArtifactError(f"{directory / 'config.json'}: default variant {default!r} missing")
    missing = [v for v in learners if _meta_file(v) not in files]
    if missing:
        raise ArtifactError(f"{manifest_path}: no meta learner file for {missing}")


def load_artifact(directory: Path) -> Artifact:
    """The artifact with its embedding tables and ids memory-mapped (read-only views of the
    files, shared with every process that maps them), its meta learners read in."""
    directory = Path(directory)
    verify_artifact(directory)
    config = json.loads((directory / "config.json").read_text())
    learners = {}
    for variant, learner in config["learners"].items():
        try:
            learner_config = _LEARNER_CONFIG.validate_python(learner)
        except ValidationError as error:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors()
            )
            raise ArtifactError(
                f"{directory / 'config.json'}: learner {variant!r}: {problems}"
            ) from error
        learners[variant] = MetaLearner(
            meta=load_file(str(directory / _meta_file(variant))), config=learner_config
        )
    embeddings = map_safetensors(directory / "embeddings.safetensors")
    user_ids, item_ids = _load_ids(directory)
    for kind, ids in (("user", user_ids), ("item", item_ids)):
        if kind not in embeddings or embeddings[kind].ndim != 2:
            raise ArtifactError(f"{directory / 'embeddings.safetensors'}: no [N, D] {kind} table")
        ids.check_rows(len(embeddings[kind]), f"{directory}: {kind}")
    return Artifact(
        learners=learners,
        default_variant=config["default_variant"],
        tables=Tables(mapped_tensor(embeddings["user"]), mapped_tensor(embeddings["item"])),
        user_ids=user_ids,
        item_ids=item_ids,
        metrics=json.loads((directory / "metrics.json").read_text()),
    )


def publish(artifact_dir: Path, registry: Path, stage: bool = False) -> str:
    """Copy a verified artifact into the registry as the next version; point `current` at
    it unless `stage` (then model.registry.promote makes it current later). Returns the
    version name."""
    verify_artifact(artifact_dir)
    versions = registry / VERSIONS
    versions.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=versions))
    try:
        for name in (*_manifest_files(artifact_dir), MANIFEST):
            shutil.copy2(artifact_dir / name, staging / name)
        verify_artifact(staging)
        with registry_lock(registry):
            while True:
                version = f"v{_next_number(registry):04d}"
                try:
                    # Fails if a publisher without the lock (older code) took the name.
                    os.rename(staging, versions / version)
                    break
                except OSError:
                    if not (versions / version).exists():
                        raise
            if stage:
                record(registry, "stage", version)
            else:
                move_current(registry, version, "publish")
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return version


def current_version(registry: Path) -> str:
    pointer = registry / CURRENT
    if not pointer.is_file():
        raise ArtifactError(f"{registry}: no published meta learner ({CURRENT} is missing)")
    return checked_version(pointer.read_text().strip())


def load_current(registry: Path) -> tuple[str, Artifact]:
    version = current_version(registry)
    return version, load_artifact(registry / VERSIONS / version)


def _load_ids(directory: Path) -> tuple[IdTable, IdTable]:
    """Mapped from ids.safetensors; from ids.json (in memory) where an older artifact has
    no index."""
    if IDS_INDEX not in _manifest_files(directory):
        ids = json.loads((directory / "ids.json").read_text())
        return IdTable.build(ids["users"], "user ids"), IdTable.build(ids["items"], "item ids")
    users, items = map_index(directory / IDS_INDEX, ("user", "item"))
    return users, items


def _manifest_files(directory: Path) -> list[str]:
    return list(json.loads((directory / MANIFEST).read_text())["files"])


def _next_number(registry: Path) -> int:
    """One more than any version present or ever logged: a removed version's name is never
    given to another artifact (stored scenarios and replicas know versions by name)."""
    names = [p.name for p in (registry / VERSIONS).glob("v[0-9]*")]
    names += [line.split()[-1] for line in history_lines(registry) if line.strip()]
    numbers = [int(name[1:]) for name in names if VERSION_PATTERN.fullmatch(name)]
    return max(numbers, default=0) + 1


def _file_entry(path: Path) -> dict[str, object]:
    # Read in chunks: the tables' gigabytes pass through the page cache, not the heap.
    with path.open("rb") as file:
        digest = hashlib.file_digest(file, "sha256").hexdigest()
    return {"sha256": digest, "bytes": path.stat().st_size}


def _write_json(path: Path, payload: object) -> None:
    path.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
