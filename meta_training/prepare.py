"""Prepare a benchmark for one seed: read, apply the protocol, pretrain embeddings; cached on
disk under a fingerprint of the input files' bytes and every setting that shapes the result."""

import hashlib
import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import implicit
import numpy as np
from safetensors.numpy import load_file, save_file

from meta_training.config import EmbeddingConfig, ProtocolConfig, SuppliedEmbeddings
from meta_training.dataset import InteractionData, fingerprint_files, load_dataset
from meta_training.embeddings import Embeddings, pretrain_embeddings
from meta_training.protocol import Benchmark, EpisodeTask, EvaluationTask, build_benchmark
from meta_training.supplied_embeddings import read_supplied_embeddings, supplied_files

# Bump when the cached layout or the protocol's behaviour changes.
CACHE_FORMAT = 2


@dataclass(frozen=True)
class Prepared:
    benchmark: Benchmark
    embeddings: Embeddings
    cache_dir: Path
    from_cache: bool


def prepare(
    data_path: Path,
    seed: int,
    protocol: ProtocolConfig,
    embedding: EmbeddingConfig | SuppliedEmbeddings,
    cache_root: Path,
    report: Callable[[str], None] = lambda stage: None,
) -> Prepared:
    """The benchmark and embeddings for `seed`, from the cache when inputs and settings match.

    The embeddings are pretrained by the ALS, or read from supplied files (keyed on their
    bytes). `report` is called with the name of each stage as it starts (for progress display).
    """
    data_path = Path(data_path)
    report("read")
    data = load_dataset(data_path)
    key = _fingerprint(data, seed, protocol, embedding)
    directory = Path(cache_root) / f"{data.name}-seed{seed}-{key[:16]}"
    if (directory / "manifest.json").is_file():
        report("load cache")
        benchmark = _load_benchmark(directory, data, protocol, seed)
        return Prepared(benchmark, _load_embeddings(directory), directory, from_cache=True)

    report("protocol")
    benchmark = build_benchmark(data, protocol, seed)
    if isinstance(embedding, SuppliedEmbeddings):
        report("read embeddings")
        embeddings = read_supplied_embeddings(embedding.path, data)
    else:
        report("pretrain")
        embeddings = pretrain_embeddings(data, benchmark.visible, embedding, seed)
    report("save cache")
    _save(directory, benchmark, embeddings, key)
    return Prepared(benchmark, embeddings, directory, from_cache=False)


def prepare_for_artifact(metrics: dict[str, object], data_path: Path, cache_root: Path) -> Prepared:
    """The benchmark and embeddings an artifact was trained on, from its metrics.json (seed,
    protocol and embedding settings), from the cache when it holds them."""
    record = metrics["embedding"]
    embedding = (
        SuppliedEmbeddings(path=record["supplied"])
        if "supplied" in record
        else EmbeddingConfig(**record)
    )
    return prepare(
        data_path,
        int(metrics["seed"]),
        ProtocolConfig(**metrics["protocol"]),
        embedding,
        cache_root,
    )


def embedding_record(
    embedding: EmbeddingConfig | SuppliedEmbeddings, embeddings: Embeddings
) -> dict[str, object]:
    """What metrics.json says about the embeddings: the ALS settings, or the supplied
    vectors' directory and dimension (read back by `prepare_for_artifact`)."""
    if isinstance(embedding, SuppliedEmbeddings):
        return {"supplied": str(Path(embedding.path).resolve()), "dim": embeddings.user.shape[1]}
    return embedding.model_dump()


def _fingerprint(
    data: InteractionData,
    seed: int,
    protocol: ProtocolConfig,
    embedding: EmbeddingConfig | SuppliedEmbeddings,
) -> str:
    if isinstance(embedding, SuppliedEmbeddings):
        files = supplied_files(embedding.path)
        embedding_key = {"supplied": fingerprint_files(sum(files.values(), ()))}
    else:
        embedding_key = embedding.model_dump(mode="json")
    settings = {
        "format": CACHE_FORMAT,
        "seed": seed,
        # The protocol's kind is in its dump: serving and evaluation never share a cache.
        "protocol": protocol.model_dump(mode="json"),
        "embedding": embedding_key,
        "implicit": implicit.__version__,
    }
    digest = hashlib.sha256(fingerprint_files(data.source_files).encode())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()


def _save(directory: Path, benchmark: Benchmark, embeddings: Embeddings, key: str) -> None:
    """Write into a temporary sibling, then rename: a crash never leaves a half cache."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        arrays: dict[str, np.ndarray] = {"visible": benchmark.visible}
        for split, tasks in (("valid", benchmark.valid), ("test", benchmark.test)):
            arrays |= _pack(f"{split}.support", [t.support_rows for t in tasks])
            arrays |= _pack(f"{split}.eval", [t.eval_rows for t in tasks])
        arrays |= _pack("train.rows", [t.rows for t in benchmark.train])
        np.savez(staging / "benchmark.npz", **arrays)
        save_file(
            {
                "user": embeddings.user,
                "item": embeddings.item,
                "user_known": embeddings.user_known.astype(np.uint8),
                "item_known": embeddings.item_known.astype(np.uint8),
            },
            str(staging / "embeddings.safetensors"),
        )
        manifest = {
            "key": key,
            "scenarios": {
                "train": [t.scenario_id for t in benchmark.train],
                "valid": [t.scenario_id for t in benchmark.valid],
                "test": [t.scenario_id for t in benchmark.test],
            },
            "dropped": benchmark.dropped,
            "summary": benchmark.summary(),
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging, directory)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def _load_benchmark(
    directory: Path, data: InteractionData, protocol: ProtocolConfig, seed: int
) -> Benchmark:
    manifest = json.loads((directory / "manifest.json").read_text())
    pools = dict(zip(data.scenario_ids, data.scenario_pools, strict=True))
    with np.load(directory / "benchmark.npz", allow_pickle=False) as arrays:

        def evaluation(split: str) -> list[EvaluationTask]:
            ids = manifest["scenarios"][split]
            support = _unpack(arrays, f"{split}.support")
            held_out = _unpack(arrays, f"{split}.eval")
            return [
                EvaluationTask(scenario_id, pools[scenario_id], s, e)
                for scenario_id, s, e in zip(ids, support, held_out, strict=True)
            ]

        train = [
            EpisodeTask(scenario_id, pools[scenario_id], rows)
            for scenario_id, rows in zip(
                manifest["scenarios"]["train"], _unpack(arrays, "train.rows"), strict=True
            )
        ]
        return Benchmark(
            data=data,
            config=protocol,
            seed=seed,
            train=train,
            valid=evaluation("valid"),
            test=evaluation("test"),
            visible=arrays["visible"],
            dropped=manifest["dropped"],
        )


def _load_embeddings(directory: Path) -> Embeddings:
    tensors = load_file(str(directory / "embeddings.safetensors"))
    return Embeddings(
        user=tensors["user"],
        item=tensors["item"],
        user_known=tensors["user_known"].astype(bool),
        item_known=tensors["item_known"].astype(bool),
    )


def _pack(name: str, parts: list[np.ndarray]) -> dict[str, np.ndarray]:
    """A ragged list of row arrays as one flat array and its offsets."""
    lengths = np.array([len(p) for p in parts], dtype=np.int64)
    flat = np.concatenate(parts).astype(np.int64) if parts else np.empty(0, dtype=np.int64)
    return {f"{name}.flat": flat, f"{name}.offsets": np.r_[0, np.cumsum(lengths)]}


def _unpack(arrays: np.lib.npyio.NpzFile, name: str) -> list[np.ndarray]:
    flat, offsets = arrays[f"{name}.flat"], arrays[f"{name}.offsets"]
    return [flat[a:b] for a, b in itertools.pairwise(offsets)]
