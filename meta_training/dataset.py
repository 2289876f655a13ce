"""Readers for the two input forms, both producing one `InteractionData`.

1. Sequence form (the shared data): a path stem with `<stem>.txt` (`user item item ...` per
   line, items in time order) and `<stem>_item2attributes.json` (`{"item": [attr, ...]}`).
2. Tabular form (users' own data): a directory with `interactions.csv`
   (`user,item[,timestamp]`) and `item_scenarios.csv` (`item,scenario`).

Ids are strings in both. A repeated (user, item) pair keeps its earliest occurrence, because
the protocol reasons about which items a user met first.
"""

import csv
import hashlib
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from meta_training.errors import DataError

INTERACTIONS_CSV = "interactions.csv"
ITEM_SCENARIOS_CSV = "item_scenarios.csv"


@dataclass(frozen=True)
class InteractionData:
    """Implicit feedback with a scenario dimension.

    Rows are sorted by user and, within a user, by time: a user's rows are contiguous and
    earliest first, so "the earliest k" is a slice.
    """

    name: str
    user_ids: list[str]
    item_ids: list[str]
    users: np.ndarray  # [n] int32, index into user_ids
    items: np.ndarray  # [n] int32, index into item_ids
    scenario_ids: list[str]
    scenario_pools: list[np.ndarray]  # per scenario: sorted unique item indices
    source_files: tuple[Path, ...]

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def num_interactions(self) -> int:
        return len(self.users)


def load_dataset(path: Path) -> InteractionData:
    """Read either input form, telling them apart by what exists at `path`."""
    path = Path(path)
    if path.is_dir():
        return read_tabular(path)
    sequence_file = path.parent / f"{path.name}.txt"
    if sequence_file.is_file():
        return read_sequence(path)
    raise DataError(
        f"{path}: unknown data format: expected a directory with {INTERACTIONS_CSV} and "
        f"{ITEM_SCENARIOS_CSV}, or a path stem STEM with STEM.txt and "
        "STEM_item2attributes.json beside it"
    )


def fingerprint_files(paths: tuple[Path, ...]) -> str:
    """sha256 over the bytes of the input files, so a cache notices any edit."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def read_sequence(stem: Path) -> InteractionData:
    stem = Path(stem)
    sequence_file = stem.parent / f"{stem.name}.txt"
    attribute_file = stem.parent / f"{stem.name}_item2attributes.json"
    for required in (sequence_file, attribute_file):
        if not required.is_file():
            raise DataError(f"{required}: file not found (sequence form needs both files)")

    builder = _Builder()
    line_of_user: dict[str, int] = {}
    with _decoding(sequence_file), sequence_file.open(encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            tokens = line.split()
            if not tokens:
                continue
            if len(tokens) < 2:
                raise DataError(
                    f"{sequence_file}:{line_number}: expected 'user item [item ...]', "
                    f"got {line.strip()!r}"
                )
            user = tokens[0]
            first_line = line_of_user.setdefault(user, line_number)
            if first_line != line_number:
                raise DataError(
                    f"{sequence_file}:{line_number}: user {user!r} already has line "
                    f"{first_line}; the sequence form has one line per user"
                )
            for position, item in enumerate(tokens[1:]):
                builder.add(user, item, float(position))
    if builder.empty:
        raise DataError(f"{sequence_file}: no interactions")

    try:
        with _decoding(attribute_file):
            attributes = json.loads(attribute_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(f"{attribute_file}:{error.lineno}: not valid JSON ({error.msg})") from error
    if not isinstance(attributes, dict):
        raise DataError(f"{attribute_file}: expected an object {{item: [attribute, ...]}}")
    pairs: list[tuple[str, str, str]] = []
    for item, item_attributes in attributes.items():
        if not isinstance(item_attributes, list):
            raise DataError(
                f"{attribute_file}: item {item!r}: expected a list of attributes, "
                f"got {type(item_attributes).__name__}"
            )
        for attribute in item_attributes:
            pairs.append((item, str(attribute), f"{attribute_file}: item {item!r}"))
    return builder.build(stem.name, pairs, (sequence_file, attribute_file))


def read_tabular(directory: Path) -> InteractionData:
    directory = Path(directory)
    interactions_file = directory / INTERACTIONS_CSV
    scenarios_file = directory / ITEM_SCENARIOS_CSV
    for required in (interactions_file, scenarios_file):
        if not required.is_file():
            raise DataError(f"{required}: file not found (tabular form needs both files)")

    builder = _Builder()
    rows = _read_csv(interactions_file, (["user", "item"], ["user", "item", "timestamp"]))
    for line_number, fields in rows:
        user, item = fields[0], fields[1]
        if len(fields) == 3:
            try:
                timestamp = float(fields[2])
            except ValueError:
                timestamp = math.nan
            if not math.isfinite(timestamp):
                raise DataError(
                    f"{interactions_file}:{line_number}: timestamp {fields[2]!r} is not a "
                    "finite number"
                )
        else:
            timestamp = float(line_number)  # file order stands for time
        builder.add(user, item, timestamp)
    if builder.empty:
        raise DataError(f"{interactions_file}: no interactions")

    pairs = [
        (fields[0], fields[1], f"{scenarios_file}:{line_number}")
        for line_number, fields in _read_csv(scenarios_file, (["item", "scenario"],))
    ]
    return builder.build(directory.name, pairs, (interactions_file, scenarios_file))


@contextmanager
def _decoding(path: Path) -> Iterator[None]:
    """Turn a decoding failure into a DataError naming the file and byte offset."""
    try:
        yield
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text (byte {error.start}: {error.reason})") from error


def write_tabular(data: InteractionData, directory: Path) -> None:
    """Write `data` in the tabular form; a user's position in their history is the time."""
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / INTERACTIONS_CSV).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["user", "item", "timestamp"])
        starts: dict[int, int] = {}
        for row, (user, item) in enumerate(
            zip(data.users.tolist(), data.items.tolist(), strict=True)
        ):
            position = row - starts.setdefault(user, row)  # rows are sorted by user, time
            writer.writerow([data.user_ids[user], data.item_ids[item], position])
    with (directory / ITEM_SCENARIOS_CSV).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["item", "scenario"])
        for scenario, pool in zip(data.scenario_ids, data.scenario_pools, strict=True):
            for item in pool.tolist():
                writer.writerow([data.item_ids[item], scenario])


def _read_csv(path: Path, headers: tuple[list[str], ...]) -> list[tuple[int, list[str]]]:
    """Rows with their line numbers, after checking the header and every row's shape."""
    # utf-8-sig: spreadsheet programs write a byte-order mark before the header.
    with _decoding(path), path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle)
        try:
            header = [name.strip() for name in next(reader)]
        except StopIteration:
            raise DataError(f"{path}: empty file, expected a header") from None
        except csv.Error as error:
            raise DataError(f"{path}:1: {error}") from error
        if header not in headers:
            expected = " or ".join(repr(",".join(h)) for h in headers)
            raise DataError(f"{path}:1: header {','.join(header)!r}, expected {expected}")
        rows: list[tuple[int, list[str]]] = []
        try:
            for fields in reader:
                line_number = reader.line_num
                if not fields:
                    continue
                fields = [field.strip() for field in fields]
                if len(fields) != len(header) or not all(fields[:2]):
                    raise DataError(
                        f"{path}:{line_number}: expected {len(header)} non-empty fields "
                        f"({','.join(header)}), got {fields!r}"
                    )
                rows.append((line_number, fields))
        except csv.Error as error:
            raise DataError(f"{path}:{reader.line_num}: {error}") from error
    return rows


class _Builder:
    """Collects (user, item, time) triples and id maps, then sorts and deduplicates."""

    def __init__(self) -> None:
        self.user_index: dict[str, int] = {}
        self.item_index: dict[str, int] = {}
        self.users: list[int] = []
        self.items: list[int] = []
        self.times: list[float] = []

    @property
    def empty(self) -> bool:
        return not self.users

    def add(self, user: str, item: str, time: float) -> None:
        self.users.append(self.user_index.setdefault(user, len(self.user_index)))
        self.items.append(self.item_index.setdefault(item, len(self.item_index)))
        self.times.append(time)

    def build(
        self, name: str, item_scenarios: list[tuple[str, str, str]], files: tuple[Path, ...]
    ) -> InteractionData:
        users = np.asarray(self.users, dtype=np.int64)
        items = np.asarray(self.items, dtype=np.int64)
        times = np.asarray(self.times, dtype=np.float64)
        # Sort by user, then time, then input order; keep a pair's earliest occurrence.
        order = np.lexsort((np.arange(len(users)), times, users))
        users, items = users[order], items[order]
        pair_keys = users * len(self.item_index) + items
        _, first = np.unique(pair_keys, return_index=True)
        keep = np.sort(first)

        scenario_index: dict[str, int] = {}
        members: list[set[int]] = []
        for item, scenario, where in item_scenarios:
            if item not in self.item_index:
                raise DataError(f"{where}: unknown item {item!r} (it has no interaction)")
            position = scenario_index.setdefault(scenario, len(scenario_index))
            if position == len(members):
                members.append(set())
            members[position].add(self.item_index[item])
        if not members:
            raise DataError(f"{files[-1]}: no item is assigned to any scenario")

        return InteractionData(
            name=name,
            user_ids=list(self.user_index),
            item_ids=list(self.item_index),
            users=users[keep].astype(np.int32),
            items=items[keep].astype(np.int32),
            scenario_ids=list(scenario_index),
            scenario_pools=[np.array(sorted(m), dtype=np.int32) for m in members],
            source_files=files,
        )
