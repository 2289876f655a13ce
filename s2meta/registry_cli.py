"""`s2meta versions | promote | rollback | gc`: a registry's versions from the command line.

Operations on a running install, so they import only model/ and service/: the serving image
(no training stack) runs them too. The store's settings are the service's (S2META_REDIS_URL,
S2META_NAMESPACE, ...): promote and rollback announce the new current version there, so the
replicas load it at once (without Redis, at their next registry poll); gc reads there which
versions stored scenarios use. Bad input, an unknown version, or a store that does not
answer: a message on stderr and exit code 2.
"""

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from model.artifact import PUBLISHED_EVENT
from model.errors import ArtifactError, settings_problems
from model.registry import (
    VersionInfo,
    current_or_none,
    list_versions,
    plan_gc,
    promote,
    remove_version,
    rollback,
)
from service.errors import StoreError
from service.settings import Settings
from service.store import ScenarioStore, open_store

EXIT_USAGE = 2
LIST_PAGE = 500


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.registry is None:
        print("s2meta: error: --registry (or S2META_REGISTRY) is required", file=sys.stderr)
        return EXIT_USAGE
    try:
        return args.run(args)
    except (ArtifactError, StoreError) as error:
        print(f"s2meta: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except ValidationError as error:
        print(f"s2meta: error: invalid settings: {settings_problems(error)}", file=sys.stderr)
        return EXIT_USAGE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="s2meta", description=__doc__)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    registry = argparse.ArgumentParser(add_help=False)
    registry.add_argument(
        "--registry",
        type=Path,
        default=os.environ.get("S2META_REGISTRY") or None,
        help="registry directory (default $S2META_REGISTRY)",
    )
    versions = commands.add_parser(
        "versions", parents=[registry], help="list the versions: date, metrics, status"
    )
    versions.add_argument("--json", action="store_true", help="one JSON list instead")
    versions.set_defaults(run=run_versions)
    promote_cmd = commands.add_parser(
        "promote", parents=[registry], help="make a version current and announce it"
    )
    promote_cmd.add_argument("version", help="a version present in the registry (vNNNN)")
    promote_cmd.set_defaults(run=run_promote)
    rollback_cmd = commands.add_parser(
        "rollback", parents=[registry], help="make the version current before current again"
    )
    rollback_cmd.set_defaults(run=run_rollback)
    gc = commands.add_parser(
        "gc",
        parents=[registry],
        help="remove old versions that are not current, not the rollback target, not staged "
        "for a rollout, and that no stored scenario uses",
    )
    gc.add_argument("--keep", type=_count, required=True, help="newest versions kept (N >= 1)")
    gc.add_argument("--dry-run", action="store_true", help="say what would go, remove nothing")
    gc.set_defaults(run=run_gc)
    return parser


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def run_versions(args: argparse.Namespace) -> int:
    listed = list_versions(args.registry)
    if args.json:
        print(json.dumps([info.as_json() for info in listed], indent=1))
        return 0
    if not listed:
        print(f"{args.registry}: no versions")
        return 0
    rows = [("VERSION", "PUBLISHED (UTC)", "DATASET", "VARIANT", "RECALL@20", "STATUS")]
    rows += [_row(info) for info in listed]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())
    return 0


def _row(info: VersionInfo) -> tuple[str, ...]:
    status = [
        label
        for label, on in (
            ("* current", info.current),
            ("staged", info.staged),
            ("rollback target", info.rollback_target),
        )
        if on
    ]
    if info.problem:
        status.append(f"unreadable metrics: {info.problem}")
    return (
        info.version,
        info.published.strftime("%Y-%m-%d %H:%M:%S"),
        str(info.metrics.get("dataset", "-")),
        str(info.metrics.get("variant", "-")),
        "-" if info.recall is None else f"{info.recall:.4f}",
        ", ".join(status),
    )


def run_promote(args: argparse.Namespace) -> int:
    settings = Settings()  # read first: bad settings change nothing
    before = current_or_none(args.registry)
    version = promote(args.registry, args.version)
    if before == version:
        print(f"{version} is already current")
        return 0
    print(f"{version} is current (was {before or 'none'})")
    _announce(settings, version)
    return 0


def run_rollback(args: argparse.Namespace) -> int:
    settings = Settings()
    before = current_or_none(args.registry)
    version = rollback(args.registry)
    print(f"{version} is current (rolled back from {before})")
    _announce(settings, version)
    return 0


def run_gc(args: argparse.Namespace) -> int:
    settings = Settings()
    if settings.redis_url:
        used = asyncio.run(_versions_in_use(settings))
    else:
        # No shared store: a single replica's in-process scenarios keep their versions loaded.
        print(
            "s2meta: warning: S2META_REDIS_URL is unset: no stored scenarios read",
            file=sys.stderr,
        )
        used = {}
    plan = plan_gc(list_versions(args.registry), args.keep, used)
    for version, reasons in plan.kept.items():
        print(f"kept {version}: {', '.join(reasons)}")
    for version in plan.removed:
        if not args.dry_run:
            remove_version(args.registry, version)
        print(f"{'would remove' if args.dry_run else 'removed'} {version}")
    if not plan.removed:
        print("nothing to remove")
    return 0


def store_of(settings: Settings) -> ScenarioStore:
    return open_store(
        settings.redis_url,
        settings.namespace,
        settings.redis_timeout_s,
        password=settings.redis_password,
        tls_ca_file=settings.redis_tls_ca_file,
    )


async def _versions_in_use(settings: Settings) -> dict[str, int]:
    """How many stored scenarios use each version; StoreError if the store does not answer
    (gc then refuses rather than guess)."""
    store = store_of(settings)
    used: dict[str, int] = {}
    try:
        after = None
        while True:
            page = await store.list_meta(after, LIST_PAGE)
            for meta in page:
                version = str(meta["meta_learner"])
                used[version] = used.get(version, 0) + 1
            if len(page) < LIST_PAGE:
                return used
            after = str(page[-1]["scenario"])
    except StoreError as error:
        raise StoreError(
            f"cannot read the stored scenarios ({error}); gc removes nothing without knowing "
            "which versions they use"
        ) from error
    finally:
        await store.close()


def _announce(settings: Settings, version: str) -> None:
    if not settings.redis_url:
        print("replicas load it at their next registry poll (S2META_REDIS_URL is unset)")
        return
    try:
        asyncio.run(_publish(settings, version))
    except StoreError as error:
        # Current has moved all the same: replicas find it at their next registry poll.
        print(f"s2meta: warning: could not notify replicas: {error}", file=sys.stderr)
        return
    print(f"announced to the replicas on namespace {settings.namespace!r}")


async def _publish(settings: Settings, version: str) -> None:
    store = store_of(settings)
    try:
        await store.publish({"type": PUBLISHED_EVENT, "version": version})
    finally:
        await store.close()
