"""The tabular form (users' own data): a directory with the interactions, columns user, item
and optionally timestamp and weight, and the scenario membership, columns item, scenario;
each as CSV (`interactions.csv`, `item_scenarios.csv`) or Parquet (`.parquet`).

CSV goes through the csv module rather than pyarrow.csv: it counts physical lines (quoted
newlines included), so an error names the line; pyarrow's reader reports no line for a value
that parses but is wrong (a negative weight, say)."""

import csv
from pathlib import Path

import numpy as np

from meta_training.errors import DataError
from meta_training.readers.build import InteractionData, build_interactions
from meta_training.readers.parquet import read_parquet
from meta_training.readers.text import parse_time, parse_weight, read_delimited

INTERACTIONS = "interactions"
ITEM_SCENARIOS = "item_scenarios"
SUFFIXES = (".csv", ".parquet")
# (required, optional) columns of each file.
INTERACTION_COLUMNS = (("user", "item"), ("timestamp", "weight"))
SCENARIO_COLUMNS = (("item", "scenario"), ())


def is_tabular(directory: Path) -> bool:
    return any((directory / f"{INTERACTIONS}{suffix}").is_file() for suffix in SUFFIXES)


def read_tabular(directory: Path) -> InteractionData:
    directory = Path(directory)
    interactions_file = _one_file(directory, INTERACTIONS)
    scenarios_file = _one_file(directory, ITEM_SCENARIOS)
    columns = _read_columns(interactions_file, INTERACTION_COLUMNS)
    users, items = columns["user"], columns["item"]
    # Without timestamps, file order stands for time.
    times = columns.get("timestamp", np.arange(len(users), dtype=np.float64))
    memberships = _read_columns(scenarios_file, SCENARIO_COLUMNS)
    return build_interactions(
        directory.name,
        users,
        items,
        times,
        columns.get("weight"),
        zip(memberships["item"], memberships["scenario"], strict=True),
        (interactions_file, scenarios_file),
    )


def write_tabular(data: InteractionData, directory: Path) -> None:
    """Write `data` as CSV in the tabular form; a user's position in their history is the
    time, and the weight column is written when `data` has weights."""
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / f"{INTERACTIONS}.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        weighted = data.weights is not None
        writer.writerow(["user", "item", "timestamp"] + (["weight"] if weighted else []))
        starts: dict[int, int] = {}
        for row, (user, item) in enumerate(
            zip(data.users.tolist(), data.items.tolist(), strict=True)
        ):
            position = row - starts.setdefault(user, row)  # rows are sorted by user, time
            weight = [repr(float(data.weights[row]))] if weighted else []
            writer.writerow([data.user_ids[user], data.item_ids[item], position, *weight])
    with (directory / f"{ITEM_SCENARIOS}.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["item", "scenario"])
        for scenario, pool in zip(data.scenario_ids, data.scenario_pools, strict=True):
            for item in pool.tolist():
                writer.writerow([data.item_ids[item], scenario])


def _one_file(directory: Path, stem: str) -> Path:
    found = [directory / f"{stem}{s}" for s in SUFFIXES if (directory / f"{stem}{s}").is_file()]
    if len(found) > 1:
        raise DataError(f"{found[0]}: {found[1].name} is there too; keep one of them")
    if not found:
        raise DataError(
            f"{directory / (stem + SUFFIXES[0])}: file not found (the tabular form needs "
            f"{INTERACTIONS}.csv or .parquet and {ITEM_SCENARIOS}.csv or .parquet)"
        )
    return found[0]


def _read_columns(
    path: Path, spec: tuple[tuple[str, ...], tuple[str, ...]]
) -> dict[str, list[str] | np.ndarray]:
    """Id columns as lists of strings, timestamp and weight as float64 arrays."""
    required, optional = spec
    if path.suffix == ".parquet":
        return read_parquet(path, required, optional)

    def check_header(header: list[str]) -> list[int]:
        names = set(header)
        if (
            len(names) != len(header)
            or not set(required) <= names
            or not names <= {*required, *optional}
        ):
            expected = ",".join(required) + "".join(f"[,{name}]" for name in optional)
            raise DataError(
                f"{path}:1: header {','.join(header)!r}, expected {expected!r} (any order)"
            )
        return [header.index(name) for name in required]

    header, rows = read_delimited(path, ",", check_header)
    columns: dict[str, list[str] | np.ndarray] = {
        name: [fields[header.index(name)] for _, fields in rows] for name in required
    }
    for name, parse in (("timestamp", parse_time), ("weight", parse_weight)):
        if name in header:
            at = header.index(name)
            columns[name] = np.array(
                [parse(fields[at], f"{path}:{line}") for line, fields in rows], dtype=np.float64
            )
    return columns
