"""Dispatch `s2meta COMMAND ...` to the service or the offline job."""

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["serve"]:
        from service.cli import main as serve

        return serve(args[1:])
    from meta_training.cli import main as offline

    return offline(args)
