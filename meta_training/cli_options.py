"""The flags several `s2meta` subcommands share, and the configurations they make: the data
and protocol flags (prepare, evaluate, train) and the meta-training flags (evaluate, train),
with --max-steps kept as a deprecated alias of --meta-steps."""

import argparse
import sys
from pathlib import Path

from meta_training.config import (
    EmbeddingConfig,
    MetaTrainConfig,
    ProtocolConfig,
    ScenarioSelection,
    Settings,
)


def add_data_options(command: argparse.ArgumentParser) -> None:
    defaults = ProtocolConfig()
    embedding = EmbeddingConfig()
    command.add_argument(
        "--data",
        type=Path,
        required=True,
        help="a tabular directory (interactions + item_scenarios, each .csv or .parquet), "
        "a RecBole directory or stem (NAME.inter + NAME.item), or a sequence-form stem "
        "(STEM.txt + STEM_item2attributes.json); docs/data.md",
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


def add_training_options(command: argparse.ArgumentParser) -> None:
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


def training_config(args: argparse.Namespace) -> MetaTrainConfig:
    return MetaTrainConfig(
        learner={"max_steps": args.adapt_max_steps, "min_steps": args.adapt_min_steps},
        iterations=args.meta_steps,
        meta_batch=args.meta_batch,
        learning_rate=args.learning_rate,
        valid_every=min(args.valid_every, args.meta_steps),
        compiled=args.compile,
    )


def data_configs(args: argparse.Namespace) -> tuple[ProtocolConfig, EmbeddingConfig, Path]:
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
