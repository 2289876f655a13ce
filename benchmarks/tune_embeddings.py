"""How the ALS defaults in meta_training/config.py were chosen: mf_dot Recall@20 on the
meta-valid scenarios (never meta-test) for a small grid, three datasets, seeds 0..2.

Run: python -m benchmarks.tune_embeddings   (about 2 minutes on 2 cores)
"""

import itertools
import tempfile
from pathlib import Path

from benchmarks.report import DATA, write_report
from meta_training.config import EmbeddingConfig, ProtocolConfig
from meta_training.evaluate import evaluate
from meta_training.prepare import prepare

STEMS = ("Beauty", "Sports_and_Outdoors", "LastFM")
GRID = {"regularization": (0.01, 1.0), "alpha": (1.0, 20.0), "iterations": (15, 30)}
SEEDS = (0, 1, 2)


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for values in itertools.product(*GRID.values()):
            config = EmbeddingConfig(**dict(zip(GRID, values, strict=True)))
            row = {**config.model_dump(), "valid_recall@20": {}}
            for stem in STEMS:
                prepared = [
                    prepare(DATA / stem, seed, ProtocolConfig(), config, Path(cache))
                    for seed in SEEDS
                ]
                result = evaluate(prepared, ["mf_dot"], split="valid")
                row["valid_recall@20"][stem] = result["methods"]["mf_dot"]["recall@20"]["mean"]
            row["mean"] = sum(row["valid_recall@20"].values()) / len(STEMS)
            print(
                f"reg {config.regularization:<5} alpha {config.alpha:<5} iters "
                f"{config.iterations:<3} "
                + "  ".join(f"{stem} {v:.4f}" for stem, v in row["valid_recall@20"].items())
                + f"  mean {row['mean']:.4f}",
                flush=True,
            )
            rows.append(row)
    best = max(rows, key=lambda row: row["mean"])
    print(f"best on meta-valid: { ({k: best[k] for k in GRID}) }")
    write_report(
        "tune_embeddings",
        {"split": "valid", "seeds": list(SEEDS), "rows": rows, "best": {k: best[k] for k in GRID}},
    )


if __name__ == "__main__":
    main()
