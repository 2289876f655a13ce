"""RecBole's atomic files: `<name>.inter` and `<name>.item`, tab-separated, with a header of
`field:type` entries (type token, token_seq, float or float_seq), as RecBole's docs define.

`.inter` needs `user_id:token` and `item_id:token` (RecBole's default field names) and may
have `timestamp:float` and `weight:float`; other fields (rating, review, ...) are ignored.
`.item` needs `item_id:token` and exactly one `token_seq` field: its space-separated tokens
are the item's scenarios. With several token_seq fields (ml-1m has movie_title and genre)
no field is guessed: the error asks to keep one."""

from pathlib import Path

import numpy as np

from meta_training.errors import DataError
from meta_training.readers.build import InteractionData, build_interactions
from meta_training.readers.text import parse_time, parse_weight, read_delimited

TYPES = ("token", "token_seq", "float", "float_seq")
SEQ_SEPARATOR = " "  # RecBole's default seq_separator


def recbole_files(path: Path) -> tuple[Path, Path] | None:
    """(.inter, .item) for a dataset directory `<name>/` or a path stem `<name>`, or None
    when there is no `.inter` file."""
    stem = path / path.name if path.is_dir() else path
    inter, item = stem.parent / f"{stem.name}.inter", stem.parent / f"{stem.name}.item"
    return (inter, item) if inter.is_file() else None


def read_recbole(inter_file: Path, item_file: Path) -> InteractionData:
    if not item_file.is_file():
        raise DataError(f"{item_file}: file not found (its token_seq field names the scenarios)")
    header, rows = read_delimited(
        inter_file,
        "\t",
        lambda header: _fields(
            inter_file, header, {"user_id": "token", "item_id": "token"}, ("timestamp", "weight")
        ),
    )
    fields = _names(header)
    user_at, item_at = fields.index("user_id"), fields.index("item_id")
    if "timestamp" in fields:
        at = fields.index("timestamp")
        times = np.array([parse_time(f[at], f"{inter_file}:{line}") for line, f in rows])
    else:
        times = np.arange(len(rows), dtype=np.float64)  # file order stands for time
    weights = None
    if "weight" in fields:
        at = fields.index("weight")
        weights = np.array([parse_weight(f[at], f"{inter_file}:{line}") for line, f in rows])

    def item_fields(header: list[str]) -> list[int]:
        nonempty = _fields(item_file, header, {"item_id": "token"}, ())
        sequences = [entry for entry in header if entry.endswith(":token_seq")]
        if len(sequences) != 1:
            raise DataError(
                f"{item_file}:1: {len(sequences)} token_seq fields {sequences}, expected "
                "exactly one, naming the item's scenarios (keep one, e.g. with cut -f)"
            )
        return nonempty

    item_header, item_rows = read_delimited(item_file, "\t", item_fields)
    item_names = _names(item_header)
    id_at = item_names.index("item_id")
    scenario_at = next(i for i, e in enumerate(item_header) if e.endswith(":token_seq"))
    memberships = [
        (f[id_at], scenario)
        for _, f in item_rows
        for scenario in f[scenario_at].split(SEQ_SEPARATOR)
        if scenario
    ]
    return build_interactions(
        inter_file.stem,
        [f[user_at] for _, f in rows],
        [f[item_at] for _, f in rows],
        times,
        weights,
        memberships,
        (inter_file, item_file),
    )


def _names(header: list[str]) -> list[str]:
    return [entry.partition(":")[0] for entry in header]


def _fields(
    path: Path, header: list[str], required: dict[str, str], floats: tuple[str, ...]
) -> list[int]:
    """Check a header; the positions of the required (id) fields."""
    expected = {**required, **dict.fromkeys(floats, "float")}
    names: list[str] = []
    for entry in header:
        name, _, kind = entry.partition(":")
        if kind not in TYPES:
            raise DataError(f"{path}:1: header entry {entry!r} is not field:type, type in {TYPES}")
        if name in expected and kind != expected[name]:
            raise DataError(f"{path}:1: field {name!r} has type {kind}, expected {expected[name]}")
        if name in names:
            raise DataError(f"{path}:1: field {name!r} appears twice in the header")
        names.append(name)
    for name, kind in required.items():
        if name not in names:
            raise DataError(f"{path}:1: no {name}:{kind} field in the header {header}")
    return [names.index(name) for name in required]
