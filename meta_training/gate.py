"""`s2meta publish --gate`: score a candidate artifact and the registry's current one on the
same meta-valid scenarios at Recall@20, and refuse a drop larger than the margin.

Both artifacts must record the same dataset, seed and protocol in their metrics.json: then
the benchmark rebuilt from the data is the one both were trained on, its meta-valid slice
was hidden from both artifacts' embeddings, and meta-test (or any evaluation interaction)
is never touched. Each artifact adapts with its default variant and its own embeddings,
with the benchmark's seed, as training's model selection does (`meta_train.valid_recall`).
The margin is absolute Recall@20: the gate passes when candidate >= current - margin.
"""

import math
from dataclasses import dataclass
from pathlib import Path

from meta_training.config import ProtocolConfig
from meta_training.dataset import load_dataset
from meta_training.errors import S2MetaError, SettingsError
from meta_training.meta_train import valid_recall
from meta_training.protocol import Benchmark, build_benchmark
from model.artifact import VERSIONS, Artifact, load_artifact
from model.registry import current_or_none

# What must be equal in both metrics.json for their meta-valid figures to be comparable.
SAME_BENCHMARK = ("dataset", "seed", "protocol")
DEFAULT_MARGIN = 0.0


class GateRefusedError(S2MetaError):
    """The candidate scored worse than current by more than the margin (or could not be
    compared with it); nothing was published."""


@dataclass(frozen=True)
class GateResult:
    # Meta-valid Recall@20 of each default variant; both None without a current version
    # (nothing to compare with, so nothing is scored).
    candidate: float | None
    current: float | None
    current_version: str | None
    margin: float
    scenarios: int  # meta-valid scenarios scored (0 without a current version)
    dataset: str

    @property
    def passed(self) -> bool:
        if self.candidate is None or self.current is None:
            return True
        return self.candidate >= self.current - self.margin

    def message(self, candidate_name: str) -> str:
        if self.candidate is None or self.current is None:
            return f"gate: no current version to compare with; {candidate_name} passes"
        relation = ">=" if self.passed else "<"
        verdict = "passes" if self.passed else "nothing published"
        return (
            f"gate: candidate {candidate_name} Recall@20 {self.candidate:.4f} {relation} "
            f"current {self.current_version} {self.current:.4f} - margin {self.margin:g} "
            f"({self.scenarios} meta-valid scenarios of {self.dataset}); {verdict}"
        )


def check_margin(margin: float) -> float:
    if not math.isfinite(margin) or not 0.0 <= margin < 1.0:
        raise SettingsError(
            f"--margin {margin}: expected an absolute Recall@20 drop in [0, 1), e.g. 0.01"
        )
    return margin


def gate(
    candidate_dir: Path, registry: Path, data_path: Path, margin: float = DEFAULT_MARGIN
) -> GateResult:
    """Score the candidate artifact against the registry's current version (see module)."""
    check_margin(margin)
    candidate = load_artifact(candidate_dir)
    version = current_or_none(registry)
    if version is None:
        return GateResult(None, None, None, margin, 0, "")
    current = load_artifact(registry / VERSIONS / version)
    _check_comparable(candidate.metrics, str(candidate_dir), current.metrics, version)
    benchmark = _benchmark(candidate.metrics, data_path)
    for name, artifact in ((str(candidate_dir), candidate), (version, current)):
        _check_trained_on(artifact, name, benchmark)
    return GateResult(
        candidate=artifact_recall(candidate, benchmark),
        current=artifact_recall(current, benchmark),
        current_version=version,
        margin=margin,
        scenarios=len(benchmark.valid),
        dataset=benchmark.data.name,
    )


def artifact_recall(artifact: Artifact, benchmark: Benchmark) -> float:
    """Mean meta-valid Recall@20 of the artifact's default variant."""
    return valid_recall(artifact.meta, artifact.learner, benchmark, artifact.tables, benchmark.seed)


def _check_comparable(
    candidate: dict[str, object], candidate_name: str, current: dict[str, object], version: str
) -> None:
    for name, metrics in ((candidate_name, candidate), (version, current)):
        missing = [key for key in SAME_BENCHMARK if key not in metrics]
        if missing:
            raise GateRefusedError(
                f"gate: {name}'s metrics.json records no {', '.join(missing)} (not written by "
                "s2meta train?), so its meta-valid scenarios are unknown; nothing published "
                "(publish without --gate to skip the comparison)"
            )
    differences = [key for key in SAME_BENCHMARK if candidate[key] != current[key]]
    if differences:
        detail = "; ".join(f"{key}: {candidate[key]!r} vs {current[key]!r}" for key in differences)
        raise GateRefusedError(
            f"gate: candidate {candidate_name} and current {version} were trained on different "
            f"benchmarks ({detail}); their meta-valid scores are not comparable; nothing "
            "published (publish without --gate, or retrain with the current's settings)"
        )


def _benchmark(metrics: dict[str, object], data_path: Path) -> Benchmark:
    data = load_dataset(data_path)
    if data.name != metrics["dataset"]:
        raise SettingsError(
            f"--data {data_path}: dataset {data.name!r}, the artifacts were trained on "
            f"{metrics['dataset']!r}"
        )
    return build_benchmark(data, ProtocolConfig(**metrics["protocol"]), int(metrics["seed"]))


def _check_trained_on(artifact: Artifact, name: str, benchmark: Benchmark) -> None:
    """The data at --data must be the data the artifact was trained on: its tables are
    indexed by the data's ids, and other data would give other meta-valid interactions,
    some of which the artifact may have seen."""
    data = benchmark.data
    recorded = artifact.metrics.get("validation", {}).get("scenarios")
    rebuilt = [task.scenario_id for task in benchmark.valid]
    if (
        list(artifact.user_ids) != data.user_ids
        or list(artifact.item_ids) != data.item_ids
        or (recorded is not None and recorded != rebuilt)
    ):
        raise SettingsError(
            f"--data {data.name}: not the data {name} was trained on (its user or item ids, "
            "or its meta-valid scenarios, differ from the artifact's record)"
        )
