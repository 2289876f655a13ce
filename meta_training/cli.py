"""`s2meta` command line. Errors caused by input or settings print one line naming the file,
line or setting and exit with code 2; nothing else is written when that happens."""

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import redis
import torch.distributed as dist
from pydantic import ValidationError
from tqdm import tqdm

from meta_training.config import (
    EmbeddingConfig,
    MetaTrainConfig,
    ProtocolConfig,
    ScenarioSelection,
    Settings,
)
from meta_training.dataset import load_dataset, write_tabular
from meta_training.errors import S2MetaError, SettingsError
from meta_training.evaluate import evaluate, write_results
from meta_training.methods import BASELINES
from meta_training.prepare import Prepared, prepare
from meta_training.registry import METHODS
from meta_training.trace import trace_scenario
from meta_training.train_job import AUTO, process_group, resolve_device, train_artifact
from model.artifact import PUBLISHED_EVENT, events_channel, publish
from model.errors import RecommenderError

EXIT_USAGE = 2
PREPARE_STAGES = 4  # read, protocol, pretrain, save (or: read, load cache)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (S2MetaError, RecommenderError) as error:
        print(f"s2meta: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in error.errors()
        )
        print(f"s2meta: error: invalid settings: {problems}", file=sys.stderr)
        return EXIT_USAGE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="s2meta", description=__doc__)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    prepare_cmd = commands.add_parser(
        "prepare", help="build the scenario benchmark and pretrain embeddings (cached)"
    )
    _add_data_options(prepare_cmd)
    prepare_cmd.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    prepare_cmd.set_defaults(run=_run_prepare)

    evaluate_cmd = commands.add_parser(
        "evaluate", help="evaluate methods on meta-test scenarios; write results.md/.json"
    )
    _add_data_options(evaluate_cmd)
    evaluate_cmd.add_argument("--out", type=Path, required=True, help="output directory")
    evaluate_cmd.add_argument(
        "--seeds", default="3", help="a count N (seeds 0..N-1) or a list like 0,4,7 (default 3)"
    )
    evaluate_cmd.add_argument(
        "--methods",
        default=",".join(BASELINES),
        help=f"comma-separated, from: {', '.join(METHODS)} (default: {', '.join(BASELINES)})",
    )
    _add_training_options(evaluate_cmd)
    evaluate_cmd.set_defaults(run=_run_evaluate)

    train_cmd = commands.add_parser(
        "train", help="meta-train on a dataset and write an unpublished artifact"
    )
    _add_data_options(train_cmd)
    _add_training_options(train_cmd)
    train_cmd.add_argument("--out", type=Path, required=True, help="artifact directory")
    train_cmd.add_argument("--seed", type=int, default=0, help="split and training seed")
    train_cmd.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    train_cmd.add_argument(
        "--variant",
        default=AUTO,
        help="interaction, mapping, hybrid, or auto: train all three and keep the best on "
        "meta-valid Recall@20 (default auto)",
    )
    train_cmd.set_defaults(run=_run_train)

    publish_cmd = commands.add_parser(
        "publish", help="publish an artifact into a registry; prints the version"
    )
    publish_cmd.add_argument("artifact", type=Path, help="directory written by s2meta train")
    publish_cmd.add_argument("--registry", type=Path, required=True, help="registry directory")
    publish_cmd.add_argument(
        "--notify",
        default=os.environ.get("S2META_REDIS_URL") or None,
        metavar="REDIS_URL",
        help="announce the new version to the service replicas on this Redis (default "
        "$S2META_REDIS_URL; without it replicas find it at their next registry poll)",
    )
    publish_cmd.add_argument(
        "--namespace",
        default=os.environ.get("S2META_NAMESPACE", "s2meta"),
        help="the service's key namespace (default $S2META_NAMESPACE, else s2meta)",
    )
    publish_cmd.set_defaults(run=_run_publish)

    # Dispatched by s2meta.cli before this parser runs; listed here for --help.
    commands.add_parser("serve", help="run the online service (s2meta serve --help)")

    trace_cmd = commands.add_parser(
        "trace", help="plot one scenario's adaptation (the paper's Figure 2) as a PNG"
    )
    trace_cmd.add_argument("--artifact", type=Path, required=True)
    trace_cmd.add_argument("--data", type=Path, required=True)
    trace_cmd.add_argument("--scenario", required=True, help="a meta-valid/test scenario id")
    trace_cmd.add_argument("--out", type=Path, required=True, help="PNG file")
    trace_cmd.add_argument("--cache-dir", type=Path)
    trace_cmd.set_defaults(run=_run_trace)

    export_cmd = commands.add_parser(
        "export-tabular", help="write a dataset in the tabular form (interactions.csv, ...)"
    )
    export_cmd.add_argument("--data", type=Path, required=True, help="input (either form)")
    export_cmd.add_argument("--out", type=Path, required=True, help="output directory")
    export_cmd.set_defaults(run=_run_export)
    return parser


def _add_data_options(command: argparse.ArgumentParser) -> None:
    defaults = ProtocolConfig()
    embedding = EmbeddingConfig()
    command.add_argument(
        "--data",
        type=Path,
        required=True,
        help="a sequence-form path stem (STEM.txt + STEM_item2attributes.json) "
        "or a tabular directory (interactions.csv + item_scenarios.csv)",
    )
    command.add_argument(
        "--cache-dir", type=Path, help="default: $S2META_CACHE_DIR or ~/.cache/s2meta"
    )
    selection = defaults.selection
    command.add_argument("--min-pool-items", type=int, default=selection.min_pool_items)
    command.add_argument("--max-pool-items", type=int, default=selection.max_pool_items)
    command.add_argument("--min-interactions", type=int, default=selection.min_interactions)
    command.add_argument("--support-size", type=int, default=defaults.support_size)
    command.add_argument("--eval-user-share", type=float, default=defaults.eval_user_share)
    command.add_argument("--episode-share", type=float, default=defaults.episode_share)
    command.add_argument("--embedding-dim", type=int, default=embedding.dim)


class _DeprecatedAlias(argparse.Action):
    """Stores into the flag it stands for, after a one-line warning on stderr."""

    def __init__(self, *args: object, replacement: str, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.replacement = replacement

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        print(
            f"s2meta: warning: {option_string} is deprecated, use {self.replacement}",
            file=sys.stderr,
        )
        setattr(namespace, self.dest, values)


def _add_training_options(command: argparse.ArgumentParser) -> None:
    defaults = MetaTrainConfig()
    steps = command.add_mutually_exclusive_group()
    steps.add_argument(
        "--meta-steps",
        type=int,
        default=defaults.iterations,
        help=f"meta-training iterations (default {defaults.iterations})",
    )
    steps.add_argument(
        "--max-steps",
        dest="meta_steps",
        type=int,
        action=_DeprecatedAlias,
        replacement="--meta-steps",
        help="deprecated alias of --meta-steps",
    )
    command.add_argument(
        "--adapt-max-steps",
        type=int,
        default=defaults.learner.max_steps,
        help=f"most adaptation steps per scenario, T_max (default {defaults.learner.max_steps})",
    )
    command.add_argument(
        "--adapt-min-steps",
        type=int,
        default=defaults.learner.min_steps,
        help="adaptation steps before the first stop decision "
        f"(default {defaults.learner.min_steps})",
    )
    command.add_argument("--meta-batch", type=int, default=defaults.meta_batch)
    command.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    command.add_argument("--valid-every", type=int, default=defaults.valid_every)
    command.add_argument(
        "--compile",
        action="store_true",
        help="run the recommender gradient (and the reference controller) through torch.compile",
    )


def _training(args: argparse.Namespace) -> MetaTrainConfig:
    return MetaTrainConfig(
        learner={"max_steps": args.adapt_max_steps, "min_steps": args.adapt_min_steps},
        iterations=args.meta_steps,
        meta_batch=args.meta_batch,
        learning_rate=args.learning_rate,
        valid_every=min(args.valid_every, args.meta_steps),
        compiled=args.compile,
    )


def _configs(args: argparse.Namespace) -> tuple[ProtocolConfig, EmbeddingConfig, Path]:
    protocol = ProtocolConfig(
        selection=ScenarioSelection(
            min_pool_items=args.min_pool_items,
            max_pool_items=args.max_pool_items,
            min_interactions=args.min_interactions,
        ),
        support_size=args.support_size,
        eval_user_share=args.eval_user_share,
        episode_share=args.episode_share,
    )
    embedding = EmbeddingConfig(dim=args.embedding_dim)
    cache_dir = args.cache_dir or Settings().cache_dir
    return protocol, embedding, cache_dir


def _prepare_with_progress(
    args: argparse.Namespace,
    seed: int,
    protocol: ProtocolConfig,
    embedding: EmbeddingConfig,
    cache_dir: Path,
) -> Prepared:
    with tqdm(total=PREPARE_STAGES, desc=f"prepare seed {seed}", unit="stage", leave=False) as bar:

        def report(stage: str) -> None:
            bar.set_postfix_str(stage)
            bar.update(1)

        prepared = prepare(args.data, seed, protocol, embedding, cache_dir, report)
        bar.update(bar.total - bar.n)
    return prepared


def _run_prepare(args: argparse.Namespace) -> int:
    protocol, embedding, cache_dir = _configs(args)
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


def _run_train(args: argparse.Namespace) -> int:
    protocol, embedding, cache_dir = _configs(args)
    training = _training(args)
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
        print(
            f"meta-valid Recall@20: {scores}; kept {metrics['variant']} "
            f"(step {metrics['best_step']}, {world} process(es))"
        )
        print(f"wrote artifact {args.out}")
    return 0


def _run_publish(args: argparse.Namespace) -> int:
    version = publish(args.artifact, args.registry)
    print(version)
    if args.notify:
        event = json.dumps({"type": PUBLISHED_EVENT, "version": version})
        try:
            with redis.Redis.from_url(args.notify, socket_timeout=5) as client:
                client.publish(events_channel(args.namespace), event)
        except redis.RedisError as error:
            # Published all the same: replicas pick it up at their next registry poll.
            print(f"s2meta: warning: could not notify replicas: {error}", file=sys.stderr)
    return 0


def _run_trace(args: argparse.Namespace) -> int:
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


def _run_evaluate(args: argparse.Namespace) -> int:
    protocol, embedding, cache_dir = _configs(args)
    training = _training(args)
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


def _run_export(args: argparse.Namespace) -> int:
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


if __name__ == "__main__":
    sys.exit(main())
