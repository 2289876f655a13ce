"""Scale: an artifact of 10,000,000 users and 1,000,000 items (synthetic 64-dim vectors, 2.8
GB of tables) served by 1, 2 and 4 worker processes, which map its tables and ids instead of
each holding a copy (model/ids.py). The goal: each extra worker adds less than 10% of the
tables' size.

- The artifact: random float32 tables, ids `u<hex>`/`i<hex>` in shuffled order (so that the
  sorted order is a real permutation), one meta learner of the default variant fresh from
  its initialiser (sizes are what matters here); written with save_artifact and published
  with `s2meta publish` into a temporary directory, deleted at the end.
- In this process: the time of verify_artifact (sha256 of every file: it reads the tables
  once, through the page cache, and this process's RSS must not grow by them), and of
  service.learners.load_version (verify, map, and the pass over the user table that finds
  users without an embedding).
- `s2meta serve` with S2META_WORKERS=N (its own redis-server, as several workers need one):
  the time from start to every worker having loaded the meta learner (started); then per
  worker RSS, USS and PSS (psutil memory_full_info) and how much of the embeddings file is
  resident in it; and the serve processes' total PSS (the supervisor included where there
  is one). An extra worker's cost = the growth of that total from the previous N, per worker
  added, against the tables' bytes (from 1 to 2 it includes uvicorn's supervisor, which a
  single worker does without).

Prints a table and writes benchmarks/results/artifact_scale.json (--name). Not part of the
test run. Needs about twice the tables' size on disk (artifact and published copy).
Run: python -m benchmarks.artifact_scale [--users 10000000 --items 1000000] [--workers 1,2,4]
"""

import argparse
import gc
import itertools
import secrets
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from benchmarks.harness import Stack
from benchmarks.report import write_report
from model.artifact import VERSIONS, Artifact, MetaLearner, save_artifact, verify_artifact
from model.inner_loss import Tables
from model.learner import init_meta_params
from model.learner_config import LearnerConfig
from model.recommender import RecommenderSpec
from service.learners import load_version

MIB = 2**20
VARIANT = "hybrid"
# What uvicorn logs for each worker once its lifespan, which loads the meta learner, ran.
STARTED = "Application startup complete."


def random_table(rows: int, dim: int, rng: np.random.Generator) -> torch.Tensor:
    table = np.empty((rows, dim), dtype=np.float32)
    for start in range(0, rows, 1 << 20):  # in chunks: no float64 temporary of the table
        part = table[start : start + (1 << 20)]
        part[:] = rng.standard_normal(part.shape, dtype=np.float32) / dim**0.5
    return torch.from_numpy(table)


def synthetic_ids(prefix: str, count: int, rng: np.random.Generator) -> list[str]:
    return [f"{prefix}{k:x}" for k in rng.permutation(count).tolist()]


def write_artifact(directory: Path, users: int, items: int, dim: int) -> int:
    """Returns the tables' bytes."""
    rng = np.random.default_rng(0)
    config = LearnerConfig(recommender=RecommenderSpec(VARIANT, dim))
    meta = init_meta_params(config, torch.Generator().manual_seed(0))
    tables = Tables(random_table(users, dim, rng), random_table(items, dim, rng))
    save_artifact(
        Artifact(
            learners={VARIANT: MetaLearner(meta, config)},
            default_variant=VARIANT,
            tables=tables,
            user_ids=synthetic_ids("u", users, rng),
            item_ids=synthetic_ids("i", items, rng),
            metrics={"dataset": "synthetic", "users": users, "items": items},
        ),
        directory,
    )
    return tables.user.nbytes + tables.item.nbytes


def in_process(version_dir: Path, registry: Path) -> dict[str, float]:
    """Verification and load_version in this process, with its RSS growth."""
    me = psutil.Process()
    before = me.memory_info().rss
    start = time.perf_counter()
    verify_artifact(version_dir)
    verify_s = time.perf_counter() - start
    verify_rss = me.memory_info().rss - before
    start = time.perf_counter()
    loaded = load_version(registry, version_dir.name, torch.device("cpu"))
    load_s = time.perf_counter() - start
    assert loaded.user_rows.get(loaded.artifact.user_ids[0]) == 0
    del loaded
    gc.collect()
    # Unmapped again, or the workers would share their pages with this process.
    assert not any(str(version_dir) in m.path for m in me.memory_maps()), "still mapped"
    return {
        "verify_s": verify_s,
        "verify_rss_growth_mib": verify_rss / MIB,
        "load_version_s": load_s,
    }


def serve_processes(stack: Stack, embeddings: Path, workers: int) -> list[psutil.Process]:
    """The worker processes: those of the serve tree that map the embeddings file."""
    assert stack.api is not None
    root = psutil.Process(stack.api.pid)
    found = []
    for process in (root, *root.children(recursive=True)):
        try:
            if any(m.path == str(embeddings) for m in process.memory_maps()):
                found.append(process)
        except psutil.NoSuchProcess:
            pass
    return found


def measure(stack: Stack, embeddings: Path, workers: int) -> dict[str, object]:
    start = time.perf_counter()
    stack.start_api({"S2META_WORKERS": str(workers), "S2META_DEVICE": "cpu"})
    while stack.api_log.read_text(errors="replace").count(STARTED) < workers:
        if stack.api is None or stack.api.poll() is not None or time.perf_counter() - start > 900:
            raise RuntimeError(f"not every worker loaded:\n{stack.log_tail()}")
        time.sleep(0.2)
    load_s = time.perf_counter() - start
    time.sleep(2)  # let the workers settle after their first requests and timers
    assert stack.api is not None
    tree = [psutil.Process(stack.api.pid), *psutil.Process(stack.api.pid).children(True)]
    per_worker = []
    for process in serve_processes(stack, embeddings, workers):
        info = process.memory_full_info()
        resident = sum(m.rss for m in process.memory_maps() if m.path == str(embeddings))
        per_worker.append(
            {
                "rss_mib": info.rss / MIB,
                "uss_mib": info.uss / MIB,
                "pss_mib": info.pss / MIB,
                "tables_resident_mib": resident / MIB,
            }
        )
    total_pss = sum(p.memory_full_info().pss for p in tree if p.is_running())
    stack.stop_api()
    if len(per_worker) != workers:
        raise RuntimeError(f"found {len(per_worker)} workers mapping the tables, not {workers}")
    return {
        "workers": workers,
        "load_s": load_s,
        "per_worker": per_worker,
        "total_pss_mib": total_pss / MIB,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=10_000_000)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--workers", default="1,2,4", help="comma-separated, 1 first")
    parser.add_argument("--dir", type=Path, default=None, help="parent of the temporary files")
    parser.add_argument("--name", default="artifact_scale", help="results/<name>.json")
    args = parser.parse_args()
    workers = [int(n) for n in args.workers.split(",")]
    if workers[0] != 1:
        parser.error("--workers must start with 1, the baseline of the extra worker's cost")
    tables_estimate = 4 * args.dim * (args.users + args.items)
    parent = args.dir or Path(tempfile.gettempdir())
    free, needed = shutil.disk_usage(parent).free / 2**30, 2.5 * tables_estimate / 2**30
    if free < needed:
        parser.error(f"{parent}: {free:.1f} GiB free, about {needed:.1f} GiB needed")
    root = Path(tempfile.mkdtemp(prefix="artifact-scale-", dir=parent))
    stack = Stack(root, secrets.token_urlsafe(16))
    try:
        start = time.perf_counter()
        tables_bytes = write_artifact(stack.artifact, args.users, args.items, args.dim)
        write_s = time.perf_counter() - start
        files = {p.name: p.stat().st_size for p in stack.artifact.iterdir()}
        version = stack.publish()
        shutil.rmtree(stack.artifact)  # the published copy is what is served
        version_dir = stack.registry / VERSIONS / version
        embeddings = (version_dir / "embeddings.safetensors").resolve()
        local = in_process(version_dir, stack.registry)
        stack.start_redis()
        runs = [measure(stack, embeddings, n) for n in workers]
    finally:
        stack.close()
        shutil.rmtree(root, ignore_errors=True)
    for previous, run in itertools.pairwise(runs):
        extra = (run["total_pss_mib"] - previous["total_pss_mib"]) / (
            run["workers"] - previous["workers"]
        )
        run["extra_worker_pss_mib"] = extra
        run["extra_worker_fraction_of_tables"] = extra * MIB / tables_bytes
    report = {
        "command": "python -m benchmarks.artifact_scale "
        f"--users {args.users} --items {args.items} --dim {args.dim} --workers {args.workers}",
        "users": args.users,
        "items": args.items,
        "dim": args.dim,
        "tables_mib": tables_bytes / MIB,
        "files_mib": {name: size / MIB for name, size in sorted(files.items())},
        "write_artifact_s": write_s,
        "in_process": local,
        "serve": runs,
        "goal": "each extra worker adds < 10% of the tables' size",
        "goal_met": all(r["extra_worker_fraction_of_tables"] < 0.1 for r in runs[1:]),
    }
    print_table(report)
    write_report(args.name, report)


def print_table(report: dict) -> None:
    local = report["in_process"]
    print(
        f"{report['users']:,} users, {report['items']:,} items, dim {report['dim']}: "
        f"tables {report['tables_mib']:.0f} MiB; verify (sha256) {local['verify_s']:.1f} s "
        f"(RSS +{local['verify_rss_growth_mib']:.0f} MiB), load_version "
        f"{local['load_version_s']:.1f} s"
    )
    print("workers  load s  RSS/worker  USS/worker  PSS/worker  tables resident  extra worker")
    for run in report["serve"]:
        mean = {k: np.mean([w[k] for w in run["per_worker"]]) for k in run["per_worker"][0]}
        extra = run.get("extra_worker_pss_mib")
        extra_text = (
            "-"
            if extra is None
            else f"{extra:.0f} MiB ({run['extra_worker_fraction_of_tables']:.1%})"
        )
        print(
            f"{run['workers']:>7}  {run['load_s']:6.1f}  {mean['rss_mib']:8.0f} M  "
            f"{mean['uss_mib']:8.0f} M  {mean['pss_mib']:8.0f} M  "
            f"{mean['tables_resident_mib']:13.0f} M  {extra_text}"
        )


if __name__ == "__main__":
    main()
