"""Operations on a registry's versions (model/artifact.py defines the layout and publishes):
list them, promote one to `current`, roll `current` back, remove one.

The history file logs, one line each, `<UTC time> <action> <version>`:
- `publish`: published and made current; `stage`: published, `current` left alone;
- `promote`: made current; `rollback`: made current again by a rollback;
- `remove`: removed (its name is never given to another artifact);
- `found`: the version `current` named before a move when the history did not end with it
  (written by older code, or a crash between the two writes).
Replaying it gives the stack of versions that were current: publish and promote push,
rollback pops back to the version it names. A rollback goes to the newest version below the
top that is still present. A `current` the history does not end with (written by older code,
or a crash between the two writes) counts as pushed last.
"""

import datetime
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from model.artifact import VERSIONS, verify_artifact
from model.errors import ArtifactError
from model.history import (
    CURRENT,
    CURRENT_MOVES,
    HISTORY,
    VERSION_PATTERN,
    checked_version,
    history_lines,
    move_current,
    record,
    registry_lock,
)

PUSHES = ("publish", "promote", "found")
ACTIONS = (*CURRENT_MOVES, "stage", "remove")
# The figures of metrics.json a listing shows (the rest is the training record).
SUMMARY_METRICS = ("dataset", "variant", "seed", "best_step", "valid_recall@20")


@dataclass(frozen=True)
class Entry:
    when: datetime.datetime
    action: str
    version: str


@dataclass(frozen=True)
class VersionInfo:
    version: str
    published: datetime.datetime  # from the history, else the directory's mtime
    metrics: dict[str, object]  # SUMMARY_METRICS present in metrics.json
    current: bool
    staged: bool  # published with stage and never current since
    rollback_target: bool  # where `rollback` would go now
    problem: str | None = None  # why metrics.json could not be read

    @property
    def recall(self) -> float | None:
        """Meta-valid Recall@20 of the default variant, where metrics.json has it."""
        recalls = self.metrics.get("valid_recall@20")
        if isinstance(recalls, dict):
            value = recalls.get(self.metrics.get("variant"))
            return float(value) if isinstance(value, int | float) else None
        return float(recalls) if isinstance(recalls, int | float) else None

    def as_json(self) -> dict[str, object]:
        return {**asdict(self), "published": self.published.isoformat(), "recall@20": self.recall}


def history(registry: Path) -> list[Entry]:
    entries = []
    for number, line in enumerate(history_lines(registry), start=1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            when, action, version = parts
            entry = Entry(datetime.datetime.fromisoformat(when), action, checked_version(version))
        except (ValueError, ArtifactError) as error:
            raise ArtifactError(f"{registry / HISTORY}:{number}: unreadable ({error})") from error
        if action not in ACTIONS:
            raise ArtifactError(f"{registry / HISTORY}:{number}: unknown action {action!r}")
        entries.append(entry)
    return entries


def current_or_none(registry: Path) -> str | None:
    pointer = registry / CURRENT
    return checked_version(pointer.read_text().strip()) if pointer.is_file() else None


def current_stack(registry: Path, entries: list[Entry] | None = None) -> list[str]:
    """The versions that were current, oldest first, the current one last."""
    stack: list[str] = []
    for entry in history(registry) if entries is None else entries:
        if entry.action in PUSHES:
            stack.append(entry.version)
        elif entry.action == "rollback":
            while stack and stack[-1] != entry.version:
                stack.pop()
            if not stack:
                stack.append(entry.version)
    current = current_or_none(registry)
    if current is not None and (not stack or stack[-1] != current):
        stack.append(current)
    return stack


def rollback_target(registry: Path, entries: list[Entry] | None = None) -> str | None:
    """The version `rollback` would make current, or None when there is none."""
    stack = current_stack(registry, entries)
    for version in reversed(stack[:-1]):
        if version != stack[-1] and (registry / VERSIONS / version).is_dir():
            return version
    return None


def version_names(registry: Path) -> list[str]:
    """The versions present, oldest first."""
    _check_registry(registry)
    versions = registry / VERSIONS
    names = [p.name for p in versions.iterdir() if VERSION_PATTERN.fullmatch(p.name)]
    return sorted(names, key=lambda name: int(name[1:]))


def list_versions(registry: Path) -> list[VersionInfo]:
    """Every version present, oldest first, with its date, metrics and status."""
    names = version_names(registry)
    entries = history(registry)
    current = current_or_none(registry)
    target = rollback_target(registry, entries)
    published = {e.version: e.when for e in entries if e.action in ("publish", "stage")}
    was_current = {e.version for e in entries if e.action in CURRENT_MOVES}
    staged = {e.version for e in entries if e.action == "stage"} - was_current
    listed = []
    for name in names:
        directory = registry / VERSIONS / name
        when = published.get(name) or datetime.datetime.fromtimestamp(
            directory.stat().st_mtime, datetime.UTC
        )
        metrics, problem = _summary(directory / "metrics.json")
        listed.append(
            VersionInfo(
                version=name,
                published=when,
                metrics=metrics,
                current=name == current,
                staged=name in staged and name != current,
                rollback_target=name == target,
                problem=problem,
            )
        )
    return listed


def promote(registry: Path, version: str) -> str:
    """Make a present, verified version current; returns it. Promoting the current version
    changes nothing."""
    checked_version(version)
    _check_registry(registry)
    with registry_lock(registry):
        _check_present(registry, version)
        if current_or_none(registry) != version:
            verify_artifact(registry / VERSIONS / version)
            move_current(registry, version, "promote")
    return version


def rollback(registry: Path) -> str:
    """Make the version current before the current one current again; returns it.
    ArtifactError when there is none (one version only, or the earlier ones removed)."""
    _check_registry(registry)
    with registry_lock(registry):
        current = current_or_none(registry)
        if current is None:
            raise ArtifactError(f"{registry}: nothing to roll back: no version is current")
        target = rollback_target(registry)
        if target is None:
            raise ArtifactError(
                f"{registry}: nothing to roll back to: no version was current before "
                f"{current} (or those were removed)"
            )
        verify_artifact(registry / VERSIONS / target)
        move_current(registry, target, "rollback")
    return target


def remove_version(registry: Path, version: str) -> None:
    """Remove a version that is not current: renamed out of place first, so a reader finds
    it whole or not at all, then deleted."""
    checked_version(version)
    _check_registry(registry)
    with registry_lock(registry):
        _check_present(registry, version)
        if current_or_none(registry) == version:
            raise ArtifactError(
                f"{version} is current: promote or roll back to another version first"
            )
        doomed = registry / VERSIONS / f".removing-{version}-{uuid.uuid4().hex[:8]}"
        os.rename(registry / VERSIONS / version, doomed)
        record(registry, "remove", version)
    shutil.rmtree(doomed)


def _check_registry(registry: Path) -> None:
    if not (registry / VERSIONS).is_dir():
        raise ArtifactError(f"{registry}: not a registry (no {VERSIONS}/ directory)")


def _check_present(registry: Path, version: str) -> None:
    if not (registry / VERSIONS / version).is_dir():
        present = ", ".join(version_names(registry)) or "none"
        raise ArtifactError(f"{registry}: no version {version} (present: {present})")


def _summary(path: Path) -> tuple[dict[str, object], str | None]:
    try:
        metrics = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        return {}, f"{path}: {error}"
    if not isinstance(metrics, dict):
        return {}, f"{path}: not a JSON object"
    return {key: metrics[key] for key in SUMMARY_METRICS if key in metrics}, None


@dataclass(frozen=True)
class GcPlan:
    kept: dict[str, list[str]]  # version: why, newest first
    removed: list[str]  # oldest first


def plan_gc(listed: list[VersionInfo], keep: int, used: dict[str, int]) -> GcPlan:
    """Which versions `gc --keep N` removes: all but the N newest and, always, the current
    one, the rollback target, every staged version newer than current (a rollout in
    progress: promote would be refused once it is gone) and every version a stored scenario
    uses (`used`: scenarios per version; pinned canaries among them)."""
    current = next((int(i.version[1:]) for i in listed if i.current), None)
    kept: dict[str, list[str]] = {}
    removed = []
    newest_first = sorted(listed, key=lambda info: int(info.version[1:]), reverse=True)
    for rank, info in enumerate(newest_first):
        reasons = []
        if info.current:
            reasons.append("current")
        if info.rollback_target:
            reasons.append("rollback target")
        if info.staged and (current is None or int(info.version[1:]) > current):
            reasons.append("staged, newer than current")
        if used.get(info.version):
            count = used[info.version]
            reasons.append(f"used by {count} stored scenario{'s' if count > 1 else ''}")
        if rank < keep:
            reasons.append(f"among the {keep} newest")
        if reasons:
            kept[info.version] = reasons
        else:
            removed.append(info.version)
    return GcPlan(kept=kept, removed=removed[::-1])
