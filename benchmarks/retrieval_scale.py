"""Retrieval at scale for the mapping variant: FAISS indexes against exact torch scoring on
pools of 10k, 100k, 300k and 1M items with 64-dim vectors.

Vectors: the 64-dim ALS embeddings of Sports_and_Outdoors (`s2meta prepare`'s pretraining,
seed 0; 18k items, 36k users). A pool of N items holds every real item vector and, beyond
them, synthetic items, each a random real item's vector plus Gaussian noise of half the
catalogue's per-dimension standard deviation, so large pools keep the structure of a real
catalogue instead of becoming isotropic noise. Queries are real user vectors (the inner
product of ALS user and item factors is the model's score, as the user- and item-tower
outputs are in the mapping variant). A last row puts the service's default on 1M isotropic
Gaussian vectors and queries: no structure at all, the worst case for any approximate index.

Per pool size and method: build time (index construction, training included); latency per
query asked one at a time (median over the single queries) and per query in one batch of all
queries; recall@20 and recall@100 against the exact top-100 (torch, float32); speed-up over
exact torch scoring (matrix product and top-k), one at a time and batched. "service default"
is what `s2meta serve` builds with its default settings (S2META_FAISS_INDEX, _SEARCH,
_MIN_POOL): exact Flat below the minimum pool. Target (docs/benchmarks.md): at 1M, the
service's default approximate index at recall@100 >= 0.95 and >= 5x faster than exact torch
scoring.

Threads: torch and faiss use all cores (2 on the reference machine).
Prints a table and writes benchmarks/results/retrieval_scale.json. Not part of the test run.
Run: python -m benchmarks.retrieval_scale [--sizes 10000,100000,1000000] [--queries 500]
"""

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import torch

from benchmarks.report import DATA, write_report
from meta_training.config import EmbeddingConfig, ProtocolConfig
from meta_training.prepare import prepare
from service.retrieval import CpuRetriever
from service.settings import Settings

TOP = 100
NOISE = 0.5  # synthetic items' noise, in the catalogue's per-dimension standard deviations
SINGLE_QUERIES = 100


@dataclass(frozen=True)
class Method:
    """An index factory string and the search settings swept on the one index it builds."""

    factory: str
    searches: tuple[str, ...] = ("",)
    min_pool: int = 0
    label: str = ""  # shown instead of "factory search"

    def name(self, search: str) -> str:
        return self.label or f"{self.factory} {search}".strip()


METHODS = [
    Method("Flat"),
    Method("IVF1024,Flat", ("nprobe=16", "nprobe=32", "nprobe=64", "nprobe=128")),
    Method("HNSW32", ("efSearch=128", "efSearch=256", "efSearch=512")),
]


def service_default() -> Method:
    settings = Settings()
    return Method(
        settings.faiss_index,
        (settings.faiss_search,),
        settings.faiss_min_pool,
        "service default",
    )


def catalogue(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Real item and user vectors [I, 64], [U, 64] of Sports_and_Outdoors."""
    with tempfile.TemporaryDirectory() as cache:
        prepared = prepare(
            DATA / "Sports_and_Outdoors", seed, ProtocolConfig(), EmbeddingConfig(), Path(cache)
        )
    embeddings = prepared.embeddings
    return embeddings.item[embeddings.item_known], embeddings.user[embeddings.user_known]


def pool_of(size: int, items: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`size` item vectors: the real ones, then noisy copies of random real ones."""
    real = items[:size]
    extra = size - len(real)
    sources = items[rng.integers(0, len(items), extra)]
    noise = rng.standard_normal((extra, items.shape[1]), dtype=np.float32)
    synthetic = sources + NOISE * items.std(axis=0) * noise
    return np.ascontiguousarray(np.concatenate([real, synthetic]), dtype=np.float32)


def exact_torch(vectors: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Exact top-100 of every query, and ms per query one at a time and in one batch."""
    pool = torch.from_numpy(vectors)
    asked = torch.from_numpy(queries)
    single = []
    for query in asked[:SINGLE_QUERIES]:
        start = time.perf_counter()
        torch.topk(query[None] @ pool.T, TOP, dim=1)
        single.append((time.perf_counter() - start) * 1000)
    start = time.perf_counter()
    # In chunks of 64 queries so the score matrix stays small at 1M items.
    top = torch.cat(
        [torch.topk(chunk @ pool.T, TOP, dim=1).indices for chunk in torch.split(asked, 64)]
    )
    batch_ms = (time.perf_counter() - start) * 1000 / len(queries)
    return top.numpy(), statistics.median(single), batch_ms


def timed_search(index: object, queries: np.ndarray) -> tuple[np.ndarray, float, float]:
    single = []
    for k in range(SINGLE_QUERIES):
        start = time.perf_counter()
        index.search(queries[k : k + 1], TOP)
        single.append((time.perf_counter() - start) * 1000)
    start = time.perf_counter()
    _, positions = index.search(queries, TOP)
    batch_ms = (time.perf_counter() - start) * 1000 / len(queries)
    return positions, statistics.median(single), batch_ms


def recall(found: np.ndarray, exact: np.ndarray, n: int) -> float:
    return float(
        np.mean([len(np.intersect1d(f[:n], e[:n])) / n for f, e in zip(found, exact, strict=True)])
    )


def measure(
    vectors: np.ndarray, queries: np.ndarray, methods: list[Method], label: str
) -> list[dict]:
    """Rows for one pool: exact torch, then each method and search setting."""
    exact, torch_single, torch_batch = exact_torch(vectors, queries)
    base = {"data": label, "items": len(vectors)}
    rows = [
        {**base, "method": "torch exact", "build_s": 0.0, "single_ms": torch_single,
         "batch_ms": torch_batch, "recall@20": 1.0, "recall@100": 1.0}
    ]  # fmt: skip
    for method in methods:
        start = time.perf_counter()
        retriever = CpuRetriever(method.factory, method.searches[0], method.min_pool)
        index = retriever.build(vectors)
        build_s = time.perf_counter() - start
        for k, search in enumerate(method.searches):
            if k > 0:  # the retriever set the first
                faiss.ParameterSpace().set_index_parameters(index, search)
            found, single, batch = timed_search(index, queries)
            rows.append(
                {**base, "method": method.name(search), "build_s": build_s,
                 "single_ms": single, "batch_ms": batch, "recall@20": recall(found, exact, 20),
                 "recall@100": recall(found, exact, 100)}
            )  # fmt: skip
            print(f"  {label} {len(vectors):>9,} {method.name(search):<28} done", flush=True)
    for row in rows:
        row["speedup_single"] = torch_single / row["single_ms"]
        row["speedup_batch"] = torch_batch / row["batch_ms"]
    return rows


def print_table(rows: list[dict]) -> None:
    print(
        f"{'data':<10}{'items':>10}  {'method':<26}{'build s':>8}{'ms/q 1':>8}{'ms/q B':>8}"
        f"{'R@20':>7}{'R@100':>7}{'x 1':>7}{'x B':>7}"
    )
    for r in rows:
        print(
            f"{r['data']:<10}{r['items']:>10,}  {r['method']:<26}{r['build_s']:>8.1f}"
            f"{r['single_ms']:>8.3f}{r['batch_ms']:>8.3f}{r['recall@20']:>7.3f}"
            f"{r['recall@100']:>7.3f}{r['speedup_single']:>7.1f}{r['speedup_batch']:>7.1f}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="10000,100000,300000,1000000")
    parser.add_argument("--queries", type=int, default=500, help="batched; the first 100 alone")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    rng = np.random.default_rng(args.seed)
    print("retrieval_scale: Sports_and_Outdoors ALS embeddings (s2meta prepare) ...", flush=True)
    items, users = catalogue(args.seed)
    queries = np.ascontiguousarray(users[rng.choice(len(users), args.queries, replace=False)])
    methods = [*METHODS, service_default()]
    rows = []
    for size in sizes:
        rows += measure(pool_of(size, items, rng), queries, methods, "catalogue")
    largest = max(sizes)
    isotropic = rng.standard_normal((largest, items.shape[1]), dtype=np.float32)
    isotropic_queries = rng.standard_normal((args.queries, items.shape[1]), dtype=np.float32)
    rows += measure(isotropic, isotropic_queries, [service_default()], "isotropic")
    print_table(rows)
    default = next(
        r for r in rows
        if r["data"] == "catalogue" and r["items"] == largest and r["method"] == "service default"
    )  # fmt: skip
    settings = Settings()
    target = {
        "items": largest,
        "index": settings.faiss_index,
        "search": settings.faiss_search,
        "recall@100": default["recall@100"],
        "speedup_single": default["speedup_single"],
        "speedup_batch": default["speedup_batch"],
        "meets": default["recall@100"] >= 0.95 and default["speedup_single"] >= 5,
    }
    print(
        f"service default at {largest:,} items ({settings.faiss_index}, {settings.faiss_search}):"
        f" recall@100 {target['recall@100']:.3f} (target >= 0.95), "
        f"{target['speedup_single']:.1f}x exact torch one query at a time, "
        f"{target['speedup_batch']:.1f}x batched (target >= 5x)"
    )
    write_report(
        "retrieval_scale",
        {
            "vectors": "Sports_and_Outdoors ALS embeddings (dim 64) + noisy copies; "
            "queries: real user vectors; last row isotropic Gaussian",
            "noise": NOISE,
            "queries": args.queries,
            "single_queries": SINGLE_QUERIES,
            "threads": torch.get_num_threads(),
            "rows": rows,
            "target": target,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
