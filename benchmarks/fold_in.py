"""Fold-in on LastFM meta-test: how much of the quality lost to ids the
artifact lacks does folding them in (model/fold_in.py, as the service does) win back.

A meta learner meta-trained on LastFM under the evaluation protocol (`s2meta train
--protocol evaluation`, the hybrid variant, one seed), its default variant adapting each
meta-test scenario from its support set. Recall@20 as `s2meta evaluate` computes it.

- Items: a seeded 10%, 30%, 50% of each pool's items are new (their embeddings dropped).
  `original`: every embedding kept. `fold_in`: a new item's vector folded in from the fixed
  vectors of the support users who interacted with it (zero with none), then adaptation and
  ranking as usual. `dropped`: what the service did before fold-in, the new items left out
  of the pool and of the support set (a relevant new item is a miss). Also the recall of the
  new items alone (`new_recall@20`: their hits in the top 20 over the relevant new items).
- Users: the protocol's evaluation users have no support interactions, so a seeded half of
  each evaluation user's scenario interactions (users with at least 2) is added to the
  support set and the rest is their ground truth, in every arm. Then a seeded 10%, 30%, 50%
  of those users (at least one per scenario) are new. `original`: their embeddings kept.
  `fold_in`: their vectors folded in from their support items. `dropped`: their support
  interactions left out and the scenario's popular items recommended (the service's
  fallback). Recall@20 over the new users, with their own support items never ranked (the
  service's exclude_seen).

Caveat: the kept embeddings were fitted with the "new" ids present, which a real new id
would not have influenced (a small effect: one row among thousands).

Each arm's per-scenario values are kept (`rows`); the differences the docs claim (fold-in
minus dropped, fold-in minus original) carry a paired 95% percentile bootstrap interval over
scenarios (`paired_differences`). Prints a table and writes benchmarks/results/fold_in.json
(--name). Not part of the test run. Run: python -m benchmarks.fold_in [--meta-steps 200]
[--variant hybrid] [--seed 0] [--artifact DIR] (8.5 to 13 minutes on a shared 2-core
machine, nearly all of it meta-training; --meta-steps 50 for a quick look)
"""

import argparse
import os
import subprocess
import sys
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.report import DATA, write_report
from meta_training.evaluate import BOOTSTRAP_SEED
from meta_training.metrics import mean_and_ci, rank_top, scenario_metrics
from meta_training.prepare import prepare_for_artifact
from meta_training.protocol import Benchmark, ground_truth
from meta_training.tasks import EvaluationTask
from model.artifact import Artifact, MetaLearner, load_artifact
from model.fold_in import FoldInSettings, fold_in, fold_in_settings, gram
from model.inner_loss import Tables
from model.scenario import ScenarioInput, adapt_scenarios, score_scenario

FRACTIONS = (0.1, 0.3, 0.5)
ARMS = ("original", "fold_in", "dropped")
CONTRASTS = (("fold_in", "dropped"), ("fold_in", "original"))
K = 20


@dataclass(frozen=True)
class Context:
    benchmark: Benchmark
    learner: MetaLearner
    tables: Tables
    grams: Tables  # YᵀY of the user and of the item table
    settings: FoldInSettings
    seed: int

    def adapted_scores(
        self, scenario: ScenarioInput, users: np.ndarray, tables: Tables
    ) -> np.ndarray:
        """[U, P] scores of users (rows) after adapting to the scenario on `tables`."""
        meta, config = self.learner.meta, self.learner.config
        result = adapt_scenarios(meta, config, tables, [scenario], self.seed)
        return score_scenario(config, result.theta[0], tables, scenario, users).numpy()


def recall(scores: np.ndarray, truth: np.ndarray, rng: np.random.Generator) -> float:
    return scenario_metrics(scores, truth, rng)[f"recall@{K}"]


def new_recall(scores: np.ndarray, truth: np.ndarray, new: np.ndarray, seed: list[int]) -> float:
    """Hits on new pool positions in the top K over the relevant new items (nan: none)."""
    top = rank_top(scores, K, np.random.default_rng(seed))
    relevant = truth & new[None, :]
    if not relevant.any():
        return float("nan")
    return float(np.take_along_axis(relevant, top, axis=1).sum() / relevant.sum())


def item_rows(context: Context, task: EvaluationTask) -> list[dict[str, object]]:
    """One scenario's rows of the items experiment."""
    data, tables, seed = context.benchmark.data, context.tables, context.seed
    users, truth = ground_truth(context.benchmark, task)
    support_users, support_items = data.users[task.support_rows], data.items[task.support_rows]
    scenario = ScenarioInput(task.scenario_id, support_users, support_items, task.pool)
    key = zlib.crc32(task.scenario_id.encode())
    original = context.adapted_scores(scenario, users, tables)
    rows = []
    for fraction in FRACTIONS:
        rng = np.random.default_rng([seed, key, int(fraction * 100)])
        new = np.zeros(len(task.pool), dtype=bool)
        new[rng.choice(len(task.pool), size=round(fraction * len(task.pool)), replace=False)] = True
        new_items = task.pool[new]
        folded = fold_in(
            context.grams.user,
            [tables.user[support_users[support_items == item]] for item in new_items],
            context.settings,
        )
        item_table = tables.item.clone()
        item_table[new_items] = folded
        with_folds = context.adapted_scores(scenario, users, Tables(tables.user, item_table))
        kept = ~np.isin(support_items, new_items)
        dropped = np.full_like(original, -np.inf)
        if kept.any():
            reduced = ScenarioInput(
                task.scenario_id, support_users[kept], support_items[kept], task.pool[~new]
            )
            dropped[:, ~new] = context.adapted_scores(reduced, users, tables)
        for arm, scores in zip(ARMS, (original, with_folds, dropped), strict=True):
            rows.append(
                {
                    "scenario": task.scenario_id,
                    "fraction": fraction,
                    "arm": arm,
                    f"recall@{K}": recall(scores, truth, np.random.default_rng([seed, key])),
                    f"new_recall@{K}": new_recall(scores, truth, new, [seed, key]),
                }
            )
    return rows


def user_rows(context: Context, task: EvaluationTask) -> list[dict[str, object]]:
    """One scenario's rows of the users experiment."""
    data, tables, seed = context.benchmark.data, context.tables, context.seed
    users, truth = ground_truth(context.benchmark, task)
    key = zlib.crc32(task.scenario_id.encode())
    rng = np.random.default_rng([seed, key, 1])
    given = np.zeros_like(truth)
    for u in range(len(users)):
        relevant = np.flatnonzero(truth[u])
        if len(relevant) >= 2:
            given[u, rng.choice(relevant, size=len(relevant) // 2, replace=False)] = True
    split = np.flatnonzero(given.any(axis=1))
    if len(split) == 0:
        return []
    truth = truth & ~given
    support_users = np.concatenate([data.users[task.support_rows], np.repeat(users, given.sum(1))])
    support_items = np.concatenate([data.items[task.support_rows], task.pool[np.nonzero(given)[1]]])
    rows = []
    for fraction in FRACTIONS:
        count = max(1, round(fraction * len(split)))
        draw = np.random.default_rng([seed, key, int(fraction * 100)])
        new = np.sort(draw.choice(split, count, replace=False))
        new_users = users[new]
        scenario = ScenarioInput(task.scenario_id, support_users, support_items, task.pool)
        original = context.adapted_scores(scenario, users[new], tables)
        folded = fold_in(
            context.grams.item, [tables.item[task.pool[given[u]]] for u in new], context.settings
        )
        user_table = tables.user.clone()
        user_table[new_users] = folded
        with_folds = context.adapted_scores(scenario, users[new], Tables(user_table, tables.item))
        kept = ~np.isin(support_users, new_users)
        positions = np.searchsorted(task.pool, support_items[kept])
        counts = np.bincount(positions, minlength=len(task.pool))
        popular = np.repeat(counts[None, :].astype(np.float64), len(new), axis=0)
        for arm, scores in zip(ARMS, (original, with_folds, popular), strict=True):
            scores = np.where(given[new], -np.inf, scores)  # exclude_seen
            rows.append(
                {
                    "scenario": task.scenario_id,
                    "fraction": fraction,
                    "arm": arm,
                    "new_users": int(count),
                    f"recall@{K}": recall(scores, truth[new], np.random.default_rng([seed, key])),
                }
            )
    return rows


def summary(rows: list[dict[str, object]], metric: str) -> dict[str, dict[str, float]]:
    """Mean over scenarios per fraction and arm (nan-free: scenarios without a value skip)."""
    table: dict[str, dict[str, float]] = {}
    for fraction in FRACTIONS:
        for arm in ARMS:
            values = [
                float(row[metric])
                for row in rows
                if row["fraction"] == fraction and row["arm"] == arm
            ]
            table.setdefault(f"{fraction:.0%}", {})[arm] = float(np.nanmean(values))
    return table


def differences(rows: list[dict[str, object]], metric: str) -> dict[str, dict[str, object]]:
    """Per fraction and contrast (`fold_in-dropped`, ...), the mean over scenarios of the
    difference and its paired 95% bootstrap interval (scenarios without both values skip)."""
    table: dict[str, dict[str, object]] = {}
    for fraction in FRACTIONS:
        by_arm: dict[str, dict[str, float]] = {arm: {} for arm in ARMS}
        for row in rows:
            if row["fraction"] == fraction:
                by_arm[str(row["arm"])][str(row["scenario"])] = float(row[metric])
        for first, second in CONTRASTS:
            a, b = by_arm[first], by_arm[second]
            scenarios = [s for s in a if s in b and not np.isnan(a[s] - b[s])]
            # Differencing within each scenario, then resampling scenarios, is the paired
            # bootstrap of mean(first) - mean(second).
            diff = np.array([a[s] - b[s] for s in scenarios])
            result = mean_and_ci([diff], np.random.default_rng(BOOTSTRAP_SEED))
            table.setdefault(f"{fraction:.0%}", {})[f"{first}-{second}"] = result
    return table


def train(out: Path, args: argparse.Namespace, data: Path) -> None:
    command = [
        str(Path(sys.executable).with_name("s2meta")),
        "train",
        "--data",
        str(data),
        "--protocol",
        "evaluation",
        "--meta-steps",
        str(args.meta_steps),
        "--variant",
        args.variant,
        "--seed",
        str(args.seed),
        "--out",
        str(out),
    ]
    subprocess.run(command, check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--meta-steps", type=int, default=200, help="the figures in the docs")
    parser.add_argument("--variant", default="hybrid", help="s2meta train --variant")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--artifact", type=Path, help="an evaluation-protocol artifact to use")
    default_cache = os.environ.get("S2META_CACHE_DIR", Path.home() / ".cache" / "s2meta")
    parser.add_argument("--cache-dir", type=Path, default=default_cache)
    parser.add_argument("--name", default="fold_in", help="results file name")
    args = parser.parse_args()
    data = DATA / "LastFM"
    with tempfile.TemporaryDirectory(prefix="s2meta-fold-in-") as scratch:
        artifact_dir = args.artifact
        if artifact_dir is None:
            artifact_dir = Path(scratch) / "artifact"
            train(artifact_dir, args, data)
        return measure(load_artifact(artifact_dir), args)


def measure(artifact: Artifact, args: argparse.Namespace) -> int:
    protocol = artifact.metrics.get("protocol")
    if not isinstance(protocol, dict) or protocol.get("kind", "evaluation") != "evaluation":
        raise SystemExit("the artifact is not trained under the evaluation protocol")
    benchmark = prepare_for_artifact(artifact.metrics, DATA / "LastFM", args.cache_dir).benchmark
    tables = artifact.tables
    context = Context(
        benchmark,
        artifact.learners[artifact.default_variant],
        tables,
        Tables(gram(tables.user), gram(tables.item)),
        fold_in_settings(artifact.metrics),
        benchmark.seed,
    )
    torch.manual_seed(args.seed)
    items = [row for task in benchmark.test for row in item_rows(context, task)]
    users = [row for task in benchmark.test for row in user_rows(context, task)]
    results = {
        "items": {
            "recall@20": summary(items, f"recall@{K}"),
            "new_recall@20": summary(items, f"new_recall@{K}"),
        },
        "users": {"recall@20": summary(users, f"recall@{K}")},
    }
    paired = {
        "items": {"recall@20": differences(items, f"recall@{K}")},
        "users": {"recall@20": differences(users, f"recall@{K}")},
    }
    print(f"LastFM meta-test, {len(benchmark.test)} scenarios, variant {artifact.default_variant}")
    print(f"{'':28}" + "".join(f"{arm:>10}" for arm in ARMS))
    for experiment, metrics in results.items():
        for metric, table in metrics.items():
            for fraction, arms in table.items():
                label = f"{experiment} {fraction} new {metric}"
                print(f"{label:28}" + "".join(f"{arms[arm]:10.4f}" for arm in ARMS))
    print("paired differences over scenarios, mean [95% bootstrap interval]:")
    for experiment, metrics in paired.items():
        for metric, table in metrics.items():
            for fraction, contrasts in table.items():
                label = f"{experiment} {fraction} new {metric}"
                cells = [
                    f"{name} {c['mean']:+.4f} [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]"
                    for name, c in contrasts.items()
                ]
                print(f"{label:28}" + "   ".join(cells))
    write_report(
        args.name,
        {
            "config": {
                "meta_steps": None if args.artifact else args.meta_steps,
                "train_variant": None if args.artifact else args.variant,
                "seed": args.seed,
                "variant": artifact.default_variant,
                "fold_in": fold_in_settings(artifact.metrics).__dict__,
                "scenarios": len(benchmark.test),
                "artifact": str(args.artifact) if args.artifact else "trained by this run",
            },
            "results": results,
            "paired_differences": paired,
            "rows": {"items": items, "users": users},
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
