"""The published meta learners this process holds: the registry's `current` one, and older
versions while a stored scenario still serves from one (its embeddings and id maps)."""

import functools
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from model import kernels
from model.artifact import (
    VERSIONS,
    Artifact,
    MetaLearner,
    checked_version,
    current_version,
    load_artifact,
)
from model.errors import ArtifactError
from model.fold_in import FoldInSettings, fold_in_settings, gram
from model.ids import IdRows, IdTable
from model.learner import Tables

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedVersion:
    """One published artifact on the serving device, with its id maps: views of the
    artifact's mapped id tables (model/ids.py), not dicts, so that a worker of an artifact
    of 10M users does not hold 10M strings of its own."""

    version: str
    artifact: Artifact
    user_rows: IdRows
    item_rows: IdRows
    user_has_embedding: np.ndarray  # [U] bool: a nonzero pretrained vector
    item_has_embedding: np.ndarray  # [I] bool

    @property
    def tables(self) -> Tables:
        return self.artifact.tables

    def learner(self, variant: str | None) -> MetaLearner:
        return self.artifact.learners[variant or self.artifact.default_variant]

    def has_embedding(self, user: str) -> bool:
        row = self.user_rows.get(user)
        return row is not None and bool(self.user_has_embedding[row])

    def embedded_item_rows(self, items: Sequence[str]) -> np.ndarray:
        """[len(items)] int64: each item's row where it has a nonzero vector, else -1 (not
        in the table, or a zero row: both are folded in); one search for all."""
        return _embedded_rows(self.item_rows.table, self.item_has_embedding, items)

    def embedded_user_rows(self, users: Sequence[str]) -> np.ndarray:
        """As `embedded_item_rows`, for users."""
        return _embedded_rows(self.user_rows.table, self.user_has_embedding, users)

    # Fold-in's inputs, computed once per loaded version on first use (model/fold_in.py).
    @functools.cached_property
    def fold_settings(self) -> FoldInSettings:
        settings = fold_in_settings(self.artifact.metrics)
        if settings.defaulted:
            logger.warning(
                "meta learner %s does not record its ALS settings: fold-in takes "
                "regularization %s and alpha %s",
                self.version,
                settings.regularization,
                settings.alpha,
            )
        return settings

    @functools.cached_property
    def user_gram(self) -> Tensor:
        return gram(self.tables.user)  # YᵀY [D, D], to fold in items

    @functools.cached_property
    def item_gram(self) -> Tensor:
        return gram(self.tables.item)  # to fold in users


def _embedded_rows(table: IdTable, has_embedding: np.ndarray, ids: Sequence[str]) -> np.ndarray:
    rows = table.rows_of(ids)
    return np.where(has_embedding[np.maximum(rows, 0)] & (rows >= 0), rows, -1)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("S2META_DEVICE=cuda: no CUDA device is available here")
    return torch.device(name)


def load_version(registry: Path, version: str, device: torch.device) -> LoadedVersion:
    """Load and verify (sha256 of every file) one published version; ArtifactError if it is
    missing, partial or corrupt. On the CPU the tables stay mapped from the registry's file
    (`.to` is then no copy); on CUDA they are copied to the device."""
    artifact = load_artifact(registry / VERSIONS / checked_version(version))
    user_ids, item_ids = IdTable.build(artifact.user_ids), IdTable.build(artifact.item_ids)
    on_device = Artifact(
        learners={
            variant: MetaLearner({k: v.to(device) for k, v in learner.meta.items()}, learner.config)
            for variant, learner in artifact.learners.items()
        },
        default_variant=artifact.default_variant,
        tables=Tables(artifact.tables.user.to(device), artifact.tables.item.to(device)),
        user_ids=user_ids,
        item_ids=item_ids,
        metrics=artifact.metrics,
    )
    if device.type == "cpu":
        kernels.load()  # build (or find cached) the compiled kernels now, not in a first request
    return LoadedVersion(
        version=version,
        artifact=on_device,
        user_rows=user_ids.rows,
        item_rows=item_ids.rows,
        user_has_embedding=nonzero_rows(artifact.tables.user, f"{version}: user table"),
        item_has_embedding=nonzero_rows(artifact.tables.item, f"{version}: item table"),
    )


def nonzero_rows(table: torch.Tensor, what: str, chunk: int = 1 << 16) -> np.ndarray:
    """[N] bool: rows with a nonzero entry, a chunk at a time with numpy, so that a table of
    millions of rows needs no [N, D] temporary (torch's reduction left tens of MB of heap
    behind per million rows, in every worker). ArtifactError on a row with a NaN or inf,
    which would score and fold in as NaN."""
    rows = table.numpy()
    found = np.empty(len(rows), dtype=bool)
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        found[start : start + chunk] = part.any(axis=1)
        finite = np.isfinite(part).all(axis=1)
        if not finite.all():
            row = start + int(np.flatnonzero(~finite)[0])
            raise ArtifactError(f"{what}: row {row} holds a NaN or inf")
    return found


class MetaLearners:
    """Thread-safe: loading runs in worker threads, lookups on the event loop."""

    def __init__(self, registry: Path, device: torch.device) -> None:
        self.registry = registry
        self.device = device
        self._loaded: dict[str, LoadedVersion] = {}
        self._current: str | None = None
        self._refused: set[str] = set()
        self._warned_unpublished = False
        self._lock = threading.Lock()

    @property
    def current(self) -> LoadedVersion | None:
        with self._lock:
            return self._loaded.get(self._current) if self._current else None

    @property
    def loaded_versions(self) -> list[str]:
        with self._lock:
            return sorted(self._loaded)

    @property
    def loaded(self) -> list[LoadedVersion]:
        """The versions held now, without loading any (for metrics)."""
        with self._lock:
            return list(self._loaded.values())

    def refresh(self) -> str | None:
        """Load the registry's current version if it is new; returns it when this call
        switched to it. A version that fails verification is refused (logged once) and the
        process stays on what it had."""
        try:
            version = current_version(self.registry)
        except ArtifactError as error:
            if not self._warned_unpublished:
                logger.warning("no meta learner to load yet: %s", error)
                self._warned_unpublished = True
            return None
        with self._lock:
            if version == self._current or version in self._refused:
                return None
        try:
            loaded = self.get(version)
        except ArtifactError as error:
            logger.error(
                "refusing meta learner %s, staying on %s: %s", version, self._current, error
            )
            with self._lock:
                self._refused.add(version)
            return None
        with self._lock:
            self._current = loaded.version
        logger.info(
            "meta learner %s loaded (variants %s)", version, sorted(loaded.artifact.learners)
        )
        return version

    def get(self, version: str) -> LoadedVersion:
        """A loaded version, loading it from the registry if this process does not hold it
        (a scenario adapted by another replica, or before a restart)."""
        with self._lock:
            if version in self._loaded:
                return self._loaded[version]
        loaded = load_version(self.registry, version, self.device)
        with self._lock:
            return self._loaded.setdefault(version, loaded)

    def retain(self, versions: set[str]) -> list[str]:
        """Unload every version but the current one and `versions`; returns those dropped."""
        with self._lock:
            keep = versions | ({self._current} if self._current else set())
            dropped = [v for v in self._loaded if v not in keep]
            for version in dropped:
                del self._loaded[version]
        return dropped
