"""A registry's `current` pointer and its history log, written under a lock file; the
layout is model/artifact.py's, the operations on versions are model/registry.py's."""

import contextlib
import datetime
import fcntl
import os
import re
from collections.abc import Iterator
from pathlib import Path

from model.errors import ArtifactError

CURRENT = "current"
HISTORY = "history"
LOCK = ".lock"
VERSION_PATTERN = re.compile(r"v[0-9]{4,9}")
# History actions after which `current` names their version (model/registry.py).
CURRENT_MOVES = ("publish", "promote", "rollback", "found")


def checked_version(version: str) -> str:
    """A version name as publishing makes them (vNNNN); anything else, such as a path that
    would lead out of the registry, is an ArtifactError."""
    if not VERSION_PATTERN.fullmatch(version):
        raise ArtifactError(f"{version[:80]!r} is not a version name (vNNNN)")
    return version


@contextlib.contextmanager
def registry_lock(registry: Path) -> Iterator[None]:
    """Held while `current` and the history change, so that two moves never interleave."""
    with (registry / LOCK).open("a") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(file, fcntl.LOCK_UN)


def move_current(registry: Path, version: str, action: str) -> None:
    """Point `current` at `version` atomically, then log it; call with registry_lock held.
    In this order, a crash between the two leaves a history that model.registry reconciles
    with `current`, never a `current` the history does not lead to."""
    pointer = registry / CURRENT
    before = pointer.read_text().strip() if pointer.is_file() else None
    lines = [line.split() for line in history_lines(registry)]
    moves = [m for m in lines if len(m) == 3 and m[1] in CURRENT_MOVES]
    if before and (not moves or moves[-1][2] != before):
        # Written by older code, or a crash between the two writes: log it, so that a
        # rollback can go back to it.
        record(registry, "found", before)
    _replace_text(pointer, version + "\n")
    record(registry, action, version)


def record(registry: Path, action: str, version: str) -> None:
    """Append `<UTC time> <action> <version>` to the history, atomically (a whole new file
    replaces the old); call with registry_lock held."""
    path = registry / HISTORY
    before = path.read_text() if path.is_file() else ""
    when = datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds")
    _replace_text(path, f"{before}{when} {action} {checked_version(version)}\n")


def history_lines(registry: Path) -> list[str]:
    path = registry / HISTORY
    return path.read_text().splitlines() if path.is_file() else []


def _replace_text(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
