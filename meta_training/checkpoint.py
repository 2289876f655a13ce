"""Meta-training checkpoints, so an interrupted `meta_train` resumes where it stopped.

A checkpoint is tensors in safetensors and the rest in JSON (no pickle): CHECKPOINT.json
names the sha256 of CHECKPOINT.safetensors and is written last.
"""

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from meta_training.config import MetaTrainConfig
from model.params import Params

CHECKPOINT = "checkpoint"


def save_checkpoint(
    path: Path,
    config: MetaTrainConfig,
    seed: int,
    meta: Params,
    optimizer: torch.optim.Optimizer,
    best: Params,
    state: dict[str, object],
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    optimizer_state = optimizer.state_dict()
    tensors = {f"meta.{k}": v.detach().cpu().contiguous() for k, v in meta.items()}
    tensors |= {f"best.{k}": v.detach().cpu().contiguous() for k, v in best.items()}
    for index, values in optimizer_state["state"].items():
        for name, value in values.items():
            tensors[f"optimizer.{index}.{name}"] = torch.as_tensor(value).cpu().contiguous()
    blob = path.with_suffix(".safetensors")
    staging = path.with_suffix(".safetensors.tmp")
    save_file(tensors, str(staging))
    staging.replace(blob)
    record = {
        "config": config.model_dump(mode="json"),
        "seed": seed,
        "state": state,
        "param_groups": optimizer_state["param_groups"],
        "tensors_sha256": hashlib.sha256(blob.read_bytes()).hexdigest(),
    }
    staging = path.with_suffix(".json.tmp")
    staging.write_text(json.dumps(record))
    staging.replace(path.with_suffix(".json"))


def load_checkpoint(path: Path, device: torch.device) -> dict[str, object] | None:
    """The checkpoint at `path` if one is there whole (its tensors match the JSON's sha256),
    else None: a run interrupted while writing one starts from the start."""
    record_path, blob = path.with_suffix(".json"), path.with_suffix(".safetensors")
    if not (record_path.is_file() and blob.is_file()):
        return None
    record = json.loads(record_path.read_text())
    if hashlib.sha256(blob.read_bytes()).hexdigest() != record["tensors_sha256"]:
        return None
    tensors = load_file(str(blob), device=str(device))
    optimizer_state: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            optimizer_state.setdefault(int(index), {})[name] = value
    return {
        "config": record["config"],
        "seed": record["seed"],
        "state": record["state"],
        "meta": {k[5:]: v for k, v in tensors.items() if k.startswith("meta.")},
        "best": {k[5:]: v.cpu() for k, v in tensors.items() if k.startswith("best.")},
        "optimizer": {"state": optimizer_state, "param_groups": record["param_groups"]},
    }
