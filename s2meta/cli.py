"""Dispatch `s2meta COMMAND ...` to the service, the registry commands or the offline job."""

import sys
from collections.abc import Sequence

EXIT_USAGE = 2
# s2meta/registry_cli.py's commands, dispatched here without importing it.
REGISTRY_COMMANDS = ("versions", "promote", "rollback", "gc")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["serve"]:
        from service.cli import main as serve

        return serve(args[1:])
    if args[:1] and args[0] in REGISTRY_COMMANDS:
        # Operations on a running install: the serving image has them too (no training stack).
        from s2meta.registry_cli import main as registry

        return registry(args)
    try:
        from meta_training.cli import main as offline
    except ImportError as error:
        # A serving install (the API image) has no training stack.
        print(
            f"s2meta: error: {args[0] if args else 'this command'} needs the training "
            f"extra (pip install 's2meta[train]'): {error}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    return offline(args)
