"""Wall time of `s2meta prepare` without a cache: read + protocol + ALS pretraining.

Goal: Sports_and_Outdoors (296k interactions) within 30 s on the 2-core reference machine.
Run: python -m benchmarks.prepare_pretrain [--stem Sports_and_Outdoors] [--repeats 3]
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.report import DATA, write_report
from meta_training.config import EmbeddingConfig, ProtocolConfig
from meta_training.prepare import prepare

GOAL_SECONDS = 30.0


def time_once(stem: Path, seed: int) -> dict[str, float]:
    marks: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        prepared = prepare(
            stem,
            seed,
            ProtocolConfig(),
            EmbeddingConfig(),
            Path(cache),
            lambda stage: marks.append((stage, time.perf_counter())),
        )
        total = time.perf_counter() - start
    assert not prepared.from_cache
    stages = {
        name: round(end - begin, 3)
        for (name, begin), (_, end) in zip(marks, [*marks[1:], ("end", start + total)], strict=True)
    }
    return {"total_s": round(total, 3), **{f"{k}_s": v for k, v in stages.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--stem", default="Sports_and_Outdoors")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    runs = [time_once(DATA / args.stem, seed) for seed in range(args.repeats)]
    median = statistics.median(run["total_s"] for run in runs)
    for run in runs:
        print("  " + "  ".join(f"{k} {v:.2f}" for k, v in run.items()))
    print(
        f"{args.stem}: prepare + pretrain median {median:.2f} s "
        f"(goal <= {GOAL_SECONDS:.0f} s) over {args.repeats} runs"
    )
    write_report(
        "prepare_pretrain",
        {
            "dataset": args.stem,
            "runs": runs,
            "median_total_s": median,
            "goal_s": GOAL_SECONDS,
            "meets_goal": median <= GOAL_SECONDS,
        },
    )


if __name__ == "__main__":
    main()
