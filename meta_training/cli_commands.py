"""What each `s2meta` subcommand does once its flags are parsed (the parser is in `cli.py`):
prepare, train, publish (its gate is in `gate.py`), trace, evaluate and export-tabular.
Each returns the exit code."""

import argparse
import json
import os
import sys
from pathlib import Path

import redis
import torch.distributed as dist
from tqdm import tqdm

from meta_training.cli_options import data_configs, training_config
from meta_training.config import EmbeddingConfig, ProtocolConfig, Settings, SuppliedEmbeddings
from meta_training.dataset import load_dataset, write_tabular
from meta_training.errors import SettingsError
from meta_training.evaluate import evaluate, write_results
from meta_training.gate import DEFAULT_MARGIN, GateRefusedError, gate
from meta_training.prepare import Prepared, prepare
from meta_training.registry import METHODS
from meta_training.trace import trace_scenario
from meta_training.train_job import AUTO, process_group, resolve_device, train_artifact
from model.artifact import PUBLISHED_EVENT, events_channel, publish
from model.registry import current_or_none

PREPARE_STAGES = 4  # read, protocol, pretrain, save (or: read, load cache)


def _prepare_with_progress(
    args: argparse.Namespace,
    seed: int,
    protocol: ProtocolConfig,
    embedding: EmbeddingConfig | SuppliedEmbeddings,
    cache_dir: Path,
) -> Prepared:
    with tqdm(total=PREPARE_STAGES, desc=f"prepare seed {seed}", unit="stage", leave=False) as bar:

        def report(stage: str) -> None:
            bar.set_postfix_str(stage)
            bar.update(1)

        prepared = prepare(args.data, seed, protocol, embedding, cache_dir, report)
        bar.update(bar.total - bar.n)
    return prepared


def run_prepare(args: argparse.Namespace) -> int:
    protocol, embedding, cache_dir = data_configs(args)
    prepared = _prepare_with_progress(args, args.seed, protocol, embedding, cache_dir)
    summary = prepared.benchmark.summary()
    origin = "loaded from cache" if prepared.from_cache else "built"
    print(f"{summary['dataset']} (seed {args.seed}): {origin} at {prepared.cache_dir}")
    print(_format_summary(summary))
    return 0


def _format_summary(summary: dict[str, object]) -> str:
    scenarios = summary["scenarios"]
    lines = [
        f"  users {summary['users']:,}  items {summary['items']:,}  "
        f"interactions {summary['interactions']:,}",
        f"  scenarios: meta-train {scenarios['train']}, meta-valid {scenarios['valid']}, "
        f"meta-test {scenarios['test']}, dropped {scenarios['dropped']}",
        f"  support interactions per meta-valid/test scenario: "
        f"{summary['support_interactions_mean']:.1f}",
        f"  evaluation users: meta-valid {summary['valid_eval_users']:,}, meta-test "
        f"{summary['test_eval_users']:,} ({summary['test_eval_interactions']:,} interactions)",
        f"  hidden from pretraining: meta-train episodes {summary['episode_interactions']:,} "
        f"({summary['episode_share']:.1%}), meta-valid/test "
        f"{summary['evaluation_hidden_share']:.1%}; visible "
        f"{summary['visible_interactions']:,}",
        f"  without a visible interaction (zero embedding): users "
        f"{summary['users_without_visible_interaction']:,}, items "
        f"{summary['items_without_visible_interaction']:,}",
    ]
    return "\n".join(lines)


def run_train(args: argparse.Namespace) -> int:
    protocol, embedding, cache_dir = data_configs(args)
    protocol = ProtocolConfig.model_validate(
        protocol.model_dump() | {"kind": args.protocol, "validation_share": args.validation_share}
    )
    if args.embeddings is not None:
        embedding = SuppliedEmbeddings(path=args.embeddings)
    training = training_config(args)
    device = resolve_device(args.device)
    with process_group(device) as (rank, world):
        # One process fills the cache; the others read it.
        if rank == 0:
            prepared = _prepare_with_progress(args, args.seed, protocol, embedding, cache_dir)
        if world > 1:
            dist.barrier()
        if rank != 0:
            prepared = prepare(args.data, args.seed, protocol, embedding, cache_dir)
        variants = 3 if args.variant == AUTO else 1
        with tqdm(
            total=variants * training.iterations,
            desc="meta-train",
            unit="step",
            disable=rank != 0,
        ) as bar:

            def progress(variant: str, step: int, stats: dict[str, float]) -> None:
                bar.set_postfix_str(f"{variant} test loss {stats['test_loss']:.3f}")
                bar.update(1)

            metrics = train_artifact(
                prepared, embedding, training, args.variant, args.out, device, progress
            )
    if rank == 0:
        scores = ", ".join(f"{k} {v:.4f}" for k, v in metrics["valid_recall@20"].items())
        benchmark = metrics["benchmark"]
        source = (
            f"embeddings supplied by {args.embeddings} ({metrics['embedding']['dim']} dims)"
            if args.embeddings
            else f"embeddings on {benchmark['visible_interactions']:,} of "
            f"{benchmark['interactions']:,} interactions ({1 - benchmark['hidden_share']:.1%})"
        )
        print(
            f"{args.protocol} protocol: {source}; meta-train "
            f"{benchmark['scenarios']['train']} scenarios, meta-valid "
            f"{benchmark['scenarios']['valid']} ({benchmark['valid_eval_users']:,} users)"
        )
        print(
            f"meta-valid Recall@20: {scores}; kept {metrics['variant']} "
            f"(step {metrics['best_step']}, {world} process(es))"
        )
        print(f"wrote artifact {args.out}")
    return 0


def run_publish(args: argparse.Namespace) -> int:
    if not args.gate and (args.margin is not None or args.data is not None):
        raise SettingsError("--margin and --data apply only with --gate")
    if args.gate:
        _run_gate(args)
    version = publish(args.artifact, args.registry, stage=args.stage)
    print(version)
    if args.stage:
        # Nothing for the replicas to load: current has not moved.
        print(f"staged {version}; current is unchanged (s2meta promote {version})", file=sys.stderr)
        return 0
    if args.notify:
        event = json.dumps({"type": PUBLISHED_EVENT, "version": version})
        try:
            with _redis_client(args.notify) as client:
                client.publish(events_channel(args.namespace), event)
        except redis.RedisError as error:
            # Published all the same: replicas pick it up at their next registry poll.
            print(f"s2meta: warning: could not notify replicas: {error}", file=sys.stderr)
    return 0


def _run_gate(args: argparse.Namespace) -> None:
    """Raise GateRefusedError (exit 2, nothing published) unless the artifact passes the gate."""
    if args.data is None:
        raise SettingsError(
            "--gate needs --data: the data the artifacts were trained on (their metrics.json "
            "records its name, seed and protocol, not its location)"
        )
    margin = DEFAULT_MARGIN if args.margin is None else args.margin
    result = gate(args.artifact, args.registry, args.data, margin)
    message = result.message(str(args.artifact))
    if not result.passed:
        raise GateRefusedError(message)
    # Another publisher may have moved current while we scored: compare again, not publish.
    if current_or_none(args.registry) != result.current_version:
        raise GateRefusedError(
            f"gate: current moved from {result.current_version} to "
            f"{current_or_none(args.registry)} while scoring; nothing published (run it again)"
        )
    print(message, file=sys.stderr)


def _redis_client(url: str) -> redis.Redis:
    """The Redis the replicas listen on, with the password and CA file of their settings."""
    ca_file = os.environ.get("S2META_REDIS_TLS_CA_FILE")
    return redis.Redis.from_url(
        url,
        socket_timeout=5,
        password=os.environ.get("S2META_REDIS_PASSWORD") or None,
        # Only with a CA file: a plain redis:// connection rejects the keyword.
        **({"ssl_ca_certs": ca_file} if ca_file else {}),
    )


def run_trace(args: argparse.Namespace) -> int:
    cache_dir = args.cache_dir or Settings().cache_dir
    record = trace_scenario(args.artifact, args.data, args.scenario, args.out, cache_dir)
    recalls = record["recall@20"]
    print(
        f"scenario {args.scenario}: {record['steps'][0]} steps, Recall@20 "
        f"{recalls[0]:.4f} -> {recalls[-1]:.4f}; wrote {args.out}"
    )
    return 0


def _parse_seeds(text: str) -> list[int]:
    try:
        if "," in text:
            seeds = [int(part) for part in text.split(",") if part.strip()]
        else:
            seeds = list(range(int(text)))
    except ValueError:
        raise SettingsError(f"--seeds {text!r}: expected a count or a list like 0,1,2") from None
    if not seeds or any(seed < 0 for seed in seeds) or len(set(seeds)) != len(seeds):
        raise SettingsError(f"--seeds {text!r}: expected at least one distinct seed >= 0")
    return seeds


def run_evaluate(args: argparse.Namespace) -> int:
    protocol, embedding, cache_dir = data_configs(args)
    training = training_config(args)
    seeds = _parse_seeds(args.seeds)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown:
        raise SettingsError(
            f"--methods: unknown {', '.join(unknown) or '(none given)'}; "
            f"known: {', '.join(METHODS)}"
        )
    prepared = [
        _prepare_with_progress(args, seed, protocol, embedding, cache_dir) for seed in seeds
    ]
    with tqdm(total=len(seeds) * len(methods), desc="evaluate", unit="run") as bar:

        def advance(label: str) -> None:
            bar.set_postfix_str(label)
            bar.update(1)

        results = evaluate(prepared, methods, advance, training=training)
    write_results(results, args.out)
    print((args.out / "results.md").read_text())
    print(f"wrote {args.out / 'results.md'} and {args.out / 'results.json'}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    data = load_dataset(args.data)
    write_tabular(data, args.out)
    print(
        json.dumps(
            {
                "out": str(args.out),
                "interactions": data.num_interactions,
                "scenarios": len(data.scenario_ids),
            }
        )
    )
    return 0
