"""`s2meta train`: prepare, meta-train (choosing the variant on meta-valid when asked), and
write an unpublished artifact."""

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from meta_training.config import EmbeddingConfig, MetaTrainConfig, SuppliedEmbeddings
from meta_training.errors import SettingsError
from meta_training.meta_train import TrainedLearner, meta_train, tables_of
from meta_training.prepare import Prepared, embedding_record
from model.artifact import Artifact, MetaLearner, save_artifact
from model.recommender import VARIANTS

AUTO = "auto"


def resolve_device(name: str) -> torch.device:
    """The device for this process; under torchrun each process takes its LOCAL_RANK GPU."""
    if name not in ("cpu", "cuda"):
        raise SettingsError(f"--device {name!r}: expected cpu or cuda")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise SettingsError("--device cuda: no CUDA device is available here")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


@contextmanager
def process_group(device: torch.device) -> Iterator[tuple[int, int]]:
    """(rank, world size): a torch.distributed group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        yield 0, 1
        return
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield dist.get_rank(), world
    finally:
        dist.destroy_process_group()


def train_artifact(
    prepared: Prepared,
    embedding: EmbeddingConfig | SuppliedEmbeddings,
    training: MetaTrainConfig,
    variant: str,
    out: Path,
    device: torch.device,
    progress: Callable[[str, int, dict[str, float]], None],
) -> dict[str, object]:
    """Meta-train and save an artifact to `out`; returns its metrics."""
    variants = list(VARIANTS) if variant == AUTO else [variant]
    if not set(variants) <= set(VARIANTS):
        raise SettingsError(f"--variant {variant!r}: expected auto or one of {list(VARIANTS)}")
    benchmark = prepared.benchmark
    results: dict[str, TrainedLearner] = {}
    for name in variants:
        results[name] = meta_train(
            benchmark,
            prepared.embeddings,
            training.model_copy(update={"variant": name}),
            seed=benchmark.seed,
            checkpoint_dir=out / "checkpoints" / name,
            progress=lambda step, stats, name=name: progress(name, step, stats),
            device=device,
        )
    chosen = max(results, key=lambda name: results[name].best_valid_recall)
    summary = benchmark.summary()
    best = results[chosen]
    metrics = {
        "dataset": benchmark.data.name,
        "seed": benchmark.seed,
        "variant": chosen,
        "valid_recall@20": {name: r.best_valid_recall for name, r in results.items()},
        "best_step": best.best_step,
        "history": best.history,
        "training": best.config.model_dump(),
        # Enough to rebuild the same benchmark (s2meta trace, evaluation of the artifact);
        # protocol.kind says "serving" (trained on all but the validation slice) or
        # "evaluation" (meta-test held out too).
        "protocol": benchmark.config.model_dump(mode="json"),
        "validation": {
            "scenarios": [task.scenario_id for task in benchmark.valid],
            "eval_users": summary["valid_eval_users"],
        },
        "embedding": embedding_record(embedding, prepared.embeddings),
        "benchmark": summary,
    }
    if dist.is_initialized() and dist.get_rank() != 0:
        return metrics
    save_artifact(
        Artifact(
            # Every trained variant, so the service can adapt with any of them; the one
            # chosen on meta-valid is the default.
            learners={
                name: MetaLearner(meta=result.meta, config=result.learner)
                for name, result in results.items()
            },
            default_variant=chosen,
            tables=tables_of(prepared.embeddings),
            user_ids=benchmark.data.user_ids,
            item_ids=benchmark.data.item_ids,
            metrics=metrics,
        ),
        out,
    )
    return metrics
