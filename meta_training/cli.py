"""`s2meta` command line. Errors caused by input or settings print one line naming the file,
line or setting and exit with code 2; nothing else is written when that happens."""

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from meta_training.cli_commands import (
    run_evaluate,
    run_export,
    run_prepare,
    run_publish,
    run_trace,
    run_train,
)
from meta_training.cli_options import add_data_options, add_training_options
from meta_training.config import ProtocolConfig
from meta_training.errors import S2MetaError
from meta_training.gate import DEFAULT_MARGIN
from meta_training.methods import BASELINES
from meta_training.registry import METHODS
from meta_training.train_job import AUTO
from model.errors import RecommenderError, settings_problems

EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (S2MetaError, RecommenderError) as error:
        print(f"s2meta: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except ValidationError as error:
        print(f"s2meta: error: invalid settings: {settings_problems(error)}", file=sys.stderr)
        return EXIT_USAGE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="s2meta", description=__doc__)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    prepare_cmd = commands.add_parser(
        "prepare", help="build the scenario benchmark and pretrain embeddings (cached)"
    )
    add_data_options(prepare_cmd)
    prepare_cmd.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    prepare_cmd.set_defaults(run=run_prepare)

    evaluate_cmd = commands.add_parser(
        "evaluate", help="evaluate methods on meta-test scenarios; write results.md/.json"
    )
    add_data_options(evaluate_cmd)
    evaluate_cmd.add_argument("--out", type=Path, required=True, help="output directory")
    evaluate_cmd.add_argument(
        "--seeds", default="3", help="a count N (seeds 0..N-1) or a list like 0,4,7 (default 3)"
    )
    evaluate_cmd.add_argument(
        "--methods",
        default=",".join(BASELINES),
        help=f"comma-separated, from: {', '.join(METHODS)} (default: {', '.join(BASELINES)})",
    )
    add_training_options(evaluate_cmd)
    evaluate_cmd.set_defaults(run=run_evaluate)

    train_cmd = commands.add_parser(
        "train", help="meta-train on a dataset and write an unpublished artifact"
    )
    add_data_options(train_cmd)
    add_training_options(train_cmd)
    train_cmd.add_argument(
        "--protocol",
        choices=("serving", "evaluation"),
        default="serving",
        help="serving: embeddings on every interaction but a small validation slice's, "
        "meta-training on every other scenario; evaluation: the split of s2meta evaluate, "
        "meta-test held out (default serving; docs/protocol.md)",
    )
    train_cmd.add_argument(
        "--validation-share",
        type=float,
        default=ProtocolConfig().validation_share,
        help="serving: interactions the validation slice may hide from the embeddings, as a "
        f"share of all (default {ProtocolConfig().validation_share})",
    )
    train_cmd.add_argument(
        "--embeddings",
        type=Path,
        metavar="DIR",
        help="use these user and item vectors instead of pretraining the ALS: DIR holds "
        "users.parquet and items.parquet (columns id, vector), or users.npy + users.txt and "
        "items.npy + items.txt (docs/data.md); --embedding-dim does not apply",
    )
    train_cmd.add_argument("--out", type=Path, required=True, help="artifact directory")
    train_cmd.add_argument("--seed", type=int, default=0, help="split and training seed")
    train_cmd.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    train_cmd.add_argument(
        "--variant",
        default=AUTO,
        help="interaction, mapping, hybrid, or auto: train all three and keep the best on "
        "meta-valid Recall@20 (default auto)",
    )
    train_cmd.set_defaults(run=run_train)

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
    publish_cmd.add_argument(
        "--stage",
        action="store_true",
        help="write the version without making it current (s2meta promote does that later)",
    )
    publish_cmd.add_argument(
        "--gate",
        action="store_true",
        help="first score the artifact and the current version on the same meta-valid "
        "scenarios (needs --data); refuse with exit code 2 if its Recall@20 is lower by "
        "more than --margin",
    )
    publish_cmd.add_argument(
        "--margin",
        type=float,
        metavar="M",
        help=f"with --gate: the absolute Recall@20 drop allowed (default {DEFAULT_MARGIN})",
    )
    publish_cmd.add_argument(
        "--data",
        type=Path,
        help="with --gate: the data both artifacts were trained on (as for s2meta train)",
    )
    publish_cmd.set_defaults(run=run_publish)

    # Dispatched by s2meta.cli before this parser runs; listed here for --help.
    commands.add_parser("serve", help="run the online service (s2meta serve --help)")
    for name, text in (
        ("versions", "list a registry's versions"),
        ("promote", "make a version current"),
        ("rollback", "make the previous version current again"),
        ("gc", "remove old unused versions"),
    ):
        commands.add_parser(name, help=text)

    trace_cmd = commands.add_parser(
        "trace", help="plot one scenario's adaptation (the paper's Figure 2) as a PNG"
    )
    trace_cmd.add_argument("--artifact", type=Path, required=True)
    trace_cmd.add_argument("--data", type=Path, required=True)
    trace_cmd.add_argument("--scenario", required=True, help="a meta-valid/test scenario id")
    trace_cmd.add_argument("--out", type=Path, required=True, help="PNG file")
    trace_cmd.add_argument("--cache-dir", type=Path)
    trace_cmd.set_defaults(run=run_trace)

    export_cmd = commands.add_parser(
        "export-tabular", help="write a dataset in the tabular form (interactions.csv, ...)"
    )
    export_cmd.add_argument("--data", type=Path, required=True, help="input, any form")
    export_cmd.add_argument("--out", type=Path, required=True, help="output directory")
    export_cmd.set_defaults(run=run_export)
    return parser


if __name__ == "__main__":
    sys.exit(main())
