"""Readers of both input forms: counts, row order, scenario pools, and errors that name the
file and line. Expected values are computed here from the raw files, not by the reader."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA

from meta_training.cli import main
from meta_training.dataset import (
    InteractionData,
    load_dataset,
    read_sequence,
    read_tabular,
)
from meta_training.errors import DataError

LASTFM = DATA / "LastFM"
SLICE_LINES = 200


# ---------------------------------------------------------------------------- helpers


def raw_sequences(txt: Path) -> list[tuple[str, list[str]]]:
    """(user, items) per non-empty line, as written."""
    lines = []
    for line in txt.read_text(encoding="utf-8").splitlines():
        tokens = line.split()
        if tokens:
            lines.append((tokens[0], tokens[1:]))
    return lines


def expected_pairs(sequences: list[tuple[str, list[str]]]) -> list[tuple[str, str]]:
    """File order, keeping the first occurrence of a (user, item) pair."""
    seen: set[tuple[str, str]] = set()
    pairs = []
    for user, items in sequences:
        for item in items:
            if (user, item) not in seen:
                seen.add((user, item))
                pairs.append((user, item))
    return pairs


def expected_pools(attributes: dict[str, list]) -> dict[str, set[str]]:
    pools: dict[str, set[str]] = {}
    for item, item_attributes in attributes.items():
        for attribute in item_attributes:
            pools.setdefault(str(attribute), set()).add(item)
    return pools


def id_pairs(data: InteractionData) -> list[tuple[str, str]]:
    return [
        (data.user_ids[u], data.item_ids[i])
        for u, i in zip(data.users.tolist(), data.items.tolist(), strict=True)
    ]


def id_pools(data: InteractionData) -> dict[str, set[str]]:
    return {
        scenario: {data.item_ids[i] for i in pool.tolist()}
        for scenario, pool in zip(data.scenario_ids, data.scenario_pools, strict=True)
    }


def per_user(data: InteractionData) -> dict[str, list[str]]:
    sequences: dict[str, list[str]] = {}
    for user, item in id_pairs(data):
        sequences.setdefault(user, []).append(item)
    return sequences


def assert_rows_grouped_by_user(data: InteractionData) -> None:
    assert data.users.dtype == np.int32 and data.items.dtype == np.int32
    assert len(data.users) == len(data.items)
    # Sorted by user index: each user's rows are one contiguous block.
    assert np.all(np.diff(data.users) >= 0)


def assert_pools_sorted_unique(data: InteractionData) -> None:
    assert len(data.scenario_pools) == len(data.scenario_ids)
    assert len(set(data.scenario_ids)) == len(data.scenario_ids)
    for pool in data.scenario_pools:
        assert len(pool) > 0
        assert np.issubdtype(pool.dtype, np.integer)
        assert np.all(np.diff(pool) > 0), "pool must be strictly increasing (sorted, unique)"
        assert pool.min() >= 0 and pool.max() < data.num_items


def write_tabular(
    directory: Path, interactions: str | None, scenarios: str | None = "item,scenario\n"
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    if interactions is not None:
        (directory / "interactions.csv").write_text(interactions, encoding="utf-8")
    if scenarios is not None:
        (directory / "item_scenarios.csv").write_text(scenarios, encoding="utf-8")
    return directory


def write_sequence(directory: Path, name: str, txt: str, attributes: str | None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.txt").write_text(txt, encoding="utf-8")
    if attributes is not None:
        (directory / f"{name}_item2attributes.json").write_text(attributes, encoding="utf-8")
    return directory / name


def data_error(path: Path, line: int | None = None) -> str:
    """A `match` pattern: the message names the file, and the line when given."""
    where = str(path) if line is None else f"{path}:{line}:"
    return re.escape(where)


# ---------------------------------------------------------------------------- sequence form


@pytest.fixture
def lastfm_slice(tmp_path) -> tuple[Path, list[tuple[str, list[str]]], dict[str, list]]:
    lines = (DATA / "LastFM.txt").read_text(encoding="utf-8").splitlines()[:SLICE_LINES]
    all_attributes = json.loads((DATA / "LastFM_item2attributes.json").read_text())
    stem = tmp_path / "slice" / "LastFMslice"
    stem.parent.mkdir()
    (stem.parent / "LastFMslice.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    sequences = [(line.split()[0], line.split()[1:]) for line in lines]
    items = {item for _, seq in sequences for item in seq}
    attributes = {item: all_attributes[item] for item in all_attributes if item in items}
    (stem.parent / "LastFMslice_item2attributes.json").write_text(json.dumps(attributes))
    return stem, sequences, attributes


def test_sequence_slice_counts_order_and_pools(lastfm_slice):
    stem, sequences, attributes = lastfm_slice
    data = load_dataset(stem)

    pairs = expected_pairs(sequences)
    assert data.name == "LastFMslice"
    assert data.num_users == len({user for user, _ in sequences}) == SLICE_LINES
    assert data.num_items == len({item for _, seq in sequences for item in seq})
    assert data.num_interactions == len(pairs)
    assert_rows_grouped_by_user(data)
    # One line per user: user order is line order, and each user's items keep line order.
    assert id_pairs(data) == pairs

    assert_pools_sorted_unique(data)
    assert id_pools(data) == expected_pools(attributes)
    assert data.source_files == (
        stem.parent / "LastFMslice.txt",
        stem.parent / "LastFMslice_item2attributes.json",
    )


def test_sequence_duplicated_attributes_collapse(lastfm_slice):
    stem, _, attributes = lastfm_slice
    repeated = {item: attrs for item, attrs in attributes.items() if len(attrs) > len(set(attrs))}
    assert repeated, "precondition: the LastFM attribute JSON repeats attributes per item"
    data = read_sequence(stem)
    pools = dict(zip(data.scenario_ids, data.scenario_pools, strict=True))
    for item, attrs in list(repeated.items())[:20]:
        index = data.item_ids.index(item)
        for attribute in set(attrs):
            assert np.count_nonzero(pools[str(attribute)] == index) == 1
    total_memberships = sum(len(pool) for pool in data.scenario_pools)
    assert total_memberships == sum(len(set(attrs)) for attrs in attributes.values())


def test_sequence_full_lastfm_matches_raw_file():
    sequences = raw_sequences(DATA / "LastFM.txt")
    attributes = json.loads((DATA / "LastFM_item2attributes.json").read_text())
    data = load_dataset(LASTFM)

    pairs = expected_pairs(sequences)
    assert data.num_users == len({user for user, _ in sequences}) == 1090
    assert data.num_items == len({item for _, seq in sequences for item in seq}) == 3646
    assert data.num_interactions == len(pairs) == 52551
    assert_rows_grouped_by_user(data)
    assert id_pairs(data) == pairs
    assert_pools_sorted_unique(data)
    assert id_pools(data) == expected_pools(attributes)


def test_sequence_repeated_item_in_a_line_keeps_first(tmp_path):
    stem = write_sequence(
        tmp_path, "S", "u1 a b a c\nu2 c a\n", json.dumps({"a": [1], "c": [1, 2]})
    )
    data = read_sequence(stem)
    assert per_user(data) == {"u1": ["a", "b", "c"], "u2": ["c", "a"]}
    assert id_pools(data) == {"1": {"a", "c"}, "2": {"c"}}


def test_sequence_user_on_two_lines_is_rejected(tmp_path):
    stem = write_sequence(tmp_path, "S", "1 a b c\n2 a\n1 d e\n", json.dumps({"a": [1]}))
    with pytest.raises(DataError, match=data_error(tmp_path / "S.txt", 3)) as error:
        read_sequence(stem)
    assert "line 1" in str(error.value)


# ---------------------------------------------------------------------------- tabular form


def test_tabular_timestamps_order_rows_within_a_user(tmp_path):
    directory = write_tabular(
        tmp_path / "tab",
        "user,item,timestamp\n"
        "u-b,i-x,30\n"
        "u-a,i-y,20\n"
        "u-a,i-x,1e1\n"
        "u-b,i-z,5\n"
        "u-a,i-z,15.5\n"
        "u-c,i-y,7\n"
        "u-c,i-x,7\n",  # a tie keeps file order
        "item,scenario\ni-x,s-1\ni-y,s-1\ni-z,s-2\ni-x,s-1\n",
    )
    data = load_dataset(directory)
    assert data.name == "tab"
    assert (data.num_users, data.num_items, data.num_interactions) == (3, 3, 7)
    assert sorted(data.user_ids) == ["u-a", "u-b", "u-c"]
    assert_rows_grouped_by_user(data)
    assert per_user(data) == {
        "u-a": ["i-x", "i-z", "i-y"],
        "u-b": ["i-z", "i-x"],
        "u-c": ["i-y", "i-x"],
    }
    assert_pools_sorted_unique(data)
    assert id_pools(data) == {"s-1": {"i-x", "i-y"}, "s-2": {"i-z"}}
    assert data.source_files == (directory / "interactions.csv", directory / "item_scenarios.csv")


def test_tabular_without_timestamp_file_order_is_time(tmp_path):
    directory = write_tabular(
        tmp_path / "tab",
        "user,item\nu-a,i-3\nu-b,i-1\nu-a,i-1\n\nu-b,i-3\nu-a,i-2\n",
        "item,scenario\ni-2,s-x\n",
    )
    data = read_tabular(directory)
    assert data.num_interactions == 5
    assert_rows_grouped_by_user(data)
    assert per_user(data) == {"u-a": ["i-3", "i-1", "i-2"], "u-b": ["i-1", "i-3"]}
    # Items without a scenario are allowed; they just belong to no pool.
    assert id_pools(data) == {"s-x": {"i-2"}}


def test_tabular_repeated_pair_keeps_earliest_occurrence(tmp_path):
    with_time = read_tabular(
        write_tabular(
            tmp_path / "timed",
            "user,item,timestamp\nu-a,i-x,50\nu-a,i-y,10\nu-a,i-x,5\nu-b,i-x,1\n",
            "item,scenario\ni-x,s\n",
        )
    )
    # The earliest i-x is at time 5, before i-y: only that occurrence remains.
    assert with_time.num_interactions == 3
    assert per_user(with_time) == {"u-a": ["i-x", "i-y"], "u-b": ["i-x"]}

    file_order = read_tabular(
        write_tabular(
            tmp_path / "untimed",
            "user,item\nu-a,i-y\nu-a,i-x\nu-a,i-y\nu-a,i-z\n",
            "item,scenario\ni-x,s\n",
        )
    )
    assert file_order.num_interactions == 3
    assert per_user(file_order) == {"u-a": ["i-y", "i-x", "i-z"]}


def test_export_tabular_round_trip_equals_sequence_form(tmp_path, capsys):
    out = tmp_path / "exported"
    assert main(["export-tabular", "--data", str(LASTFM), "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    original = load_dataset(LASTFM)
    assert report["interactions"] == original.num_interactions
    assert report["scenarios"] == len(original.scenario_ids)

    exported = load_dataset(out)
    assert exported.source_files == (out / "interactions.csv", out / "item_scenarios.csv")
    assert exported.num_users == original.num_users
    assert exported.num_items == original.num_items
    assert id_pairs(exported) == id_pairs(original)
    assert id_pools(exported) == id_pools(original)


# ---------------------------------------------------------------------------- errors


def test_error_missing_interactions_csv(tmp_path):
    directory = write_tabular(tmp_path / "tab", None)
    with pytest.raises(DataError, match=data_error(directory / "interactions.csv")):
        load_dataset(directory)


def test_error_missing_item_scenarios_csv(tmp_path):
    directory = write_tabular(tmp_path / "tab", "user,item\nu-a,i-x\n", None)
    with pytest.raises(DataError, match=data_error(directory / "item_scenarios.csv")):
        load_dataset(directory)


def test_error_missing_attribute_json(tmp_path):
    stem = write_sequence(tmp_path, "S", "u1 a b\n", None)
    with pytest.raises(DataError, match=data_error(tmp_path / "S_item2attributes.json")):
        load_dataset(stem)


def test_error_unknown_format(tmp_path):
    stem = tmp_path / "nothing-here"
    with pytest.raises(DataError, match=data_error(stem)) as raised:
        load_dataset(stem)
    assert "unknown data format" in str(raised.value)
    # A file that is neither a directory nor a stem (the .txt itself) is not accepted either.
    txt = write_sequence(tmp_path, "S", "u1 a\n", "{}").with_suffix(".txt")
    with pytest.raises(DataError, match=data_error(txt)):
        load_dataset(txt)


@pytest.mark.parametrize(
    ("interactions", "scenarios", "bad_file", "line"),
    [
        ("usr,item\nu-a,i-x\n", "item,scenario\ni-x,s\n", "interactions.csv", 1),
        ("user,item\nu-a,i-x\n", "item,scen\ni-x,s\n", "item_scenarios.csv", 1),
        ("user,item,time\nu-a,i-x,1\n", "item,scenario\ni-x,s\n", "interactions.csv", 1),
    ],
    ids=["interactions", "scenarios", "timestamp-name"],
)
def test_error_wrong_header(tmp_path, interactions, scenarios, bad_file, line):
    directory = write_tabular(tmp_path / "tab", interactions, scenarios)
    with pytest.raises(DataError, match=data_error(directory / bad_file, line)) as raised:
        load_dataset(directory)
    assert "header" in str(raised.value)


@pytest.mark.parametrize(
    ("interactions", "scenarios", "bad_file", "line"),
    [
        ("user,item\nu-a,i-x\nu-a,i-y\nu-b\n", "item,scenario\ni-x,s\n", "interactions.csv", 4),
        (
            "user,item,timestamp\nu-a,i-x,1\n\nu-a,i-y,2,extra\n",
            "item,scenario\ni-x,s\n",
            "interactions.csv",
            4,
        ),
        ("user,item\nu-a,i-x\n,i-y\n", "item,scenario\ni-x,s\n", "interactions.csv", 3),
        ("user,item\nu-a,i-x\n", "item,scenario\ni-x,s\ni-x\n", "item_scenarios.csv", 3),
    ],
    ids=["too-few", "too-many-after-blank-line", "empty-user", "scenarios-too-few"],
)
def test_error_wrong_number_of_fields(tmp_path, interactions, scenarios, bad_file, line):
    directory = write_tabular(tmp_path / "tab", interactions, scenarios)
    with pytest.raises(DataError, match=data_error(directory / bad_file, line)):
        load_dataset(directory)


def test_error_non_numeric_timestamp(tmp_path):
    directory = write_tabular(
        tmp_path / "tab",
        "user,item,timestamp\nu-a,i-x,1\nu-a,i-y,2\nu-b,i-x,yesterday\n",
        "item,scenario\ni-x,s\n",
    )
    with pytest.raises(DataError, match=data_error(directory / "interactions.csv", 4)) as raised:
        load_dataset(directory)
    assert "yesterday" in str(raised.value)


def test_csv_with_a_byte_order_mark_is_read(tmp_path):
    directory = write_tabular(
        tmp_path / "tab", "\ufeffuser,item\nu-a,i-x\n", "\ufeffitem,scenario\ni-x,s\n"
    )
    data = load_dataset(directory)
    assert data.user_ids == ["u-a"] and data.scenario_ids == ["s"]


def test_error_nan_timestamp(tmp_path):
    directory = write_tabular(
        tmp_path / "tab",
        "user,item,timestamp\nu-a,i-x,nan\nu-a,i-y,1\n",
        "item,scenario\ni-x,s\n",
    )
    with pytest.raises(DataError, match=data_error(directory / "interactions.csv", 2)):
        load_dataset(directory)


@pytest.mark.parametrize(
    ("interactions", "scenarios", "bad_file"),
    [
        ("", "item,scenario\ni-x,s\n", "interactions.csv"),
        ("user,item\nu-a,i-x\n", "", "item_scenarios.csv"),
        ("user,item\n", "item,scenario\ni-x,s\n", "interactions.csv"),  # header only
        ("user,item\nu-a,i-x\n", "item,scenario\n", "item_scenarios.csv"),  # header only
    ],
    ids=["interactions-empty", "scenarios-empty", "interactions-no-rows", "scenarios-no-rows"],
)
def test_error_empty_tabular_file(tmp_path, interactions, scenarios, bad_file):
    directory = write_tabular(tmp_path / "tab", interactions, scenarios)
    with pytest.raises(DataError, match=data_error(directory / bad_file)):
        load_dataset(directory)


def test_error_empty_sequence_file(tmp_path):
    stem = write_sequence(tmp_path, "S", "\n\n", "{}")
    with pytest.raises(DataError, match=data_error(tmp_path / "S.txt")):
        load_dataset(stem)


def test_error_empty_attribute_json(tmp_path):
    stem = write_sequence(tmp_path, "S", "u1 a b\n", "")
    with pytest.raises(DataError, match=data_error(tmp_path / "S_item2attributes.json")):
        load_dataset(stem)


def test_scenario_item_without_interaction_is_a_cold_item(tmp_path):
    directory = write_tabular(
        tmp_path / "tab",
        "user,item\nu-a,i-x\nu-b,i-y\n",
        "item,scenario\ni-x,s-1\ni-ghost,s-1\ni-y,s-1\ni-ghost,s-2\n",
    )
    data = load_dataset(directory)
    # The cold item comes after every interacted item, is in both its pools, has no row.
    assert data.item_ids == ["i-x", "i-y", "i-ghost"]
    assert id_pools(data) == {"s-1": {"i-x", "i-y", "i-ghost"}, "s-2": {"i-ghost"}}
    assert_pools_sorted_unique(data)
    assert id_pairs(data) == [("u-a", "i-x"), ("u-b", "i-y")]


def test_attribute_json_item_without_interaction_is_a_cold_item(tmp_path):
    stem = write_sequence(tmp_path, "S", "u1 a b\n", json.dumps({"a": [1], "zz": [2, 1]}))
    data = load_dataset(stem)
    assert data.item_ids == ["a", "b", "zz"]
    assert id_pools(data) == {"1": {"a", "zz"}, "2": {"zz"}}
    assert data.num_interactions == 2


def test_error_malformed_json(tmp_path):
    stem = write_sequence(tmp_path, "S", "u1 a b\n", '{\n "a": [1],\n "b": [2,,]\n}\n')
    with pytest.raises(DataError, match=data_error(tmp_path / "S_item2attributes.json", 3)):
        load_dataset(stem)


@pytest.mark.parametrize(
    "attributes", ['[["a", 1]]', '{"a": 1}', '{"a": {"x": 1}}'], ids=["list", "int", "dict"]
)
def test_error_json_wrong_shape(tmp_path, attributes):
    stem = write_sequence(tmp_path, "S", "u1 a b\n", attributes)
    with pytest.raises(DataError, match=data_error(tmp_path / "S_item2attributes.json")):
        load_dataset(stem)


def test_error_sequence_line_without_item(tmp_path):
    stem = write_sequence(tmp_path, "S", "u1 a b\n\nu2 b a\nu3\nu4 a\n", json.dumps({"a": [1]}))
    with pytest.raises(DataError, match=data_error(tmp_path / "S.txt", 4)) as raised:
        load_dataset(stem)
    assert "'u3'" in str(raised.value)


def test_error_non_utf8_file(tmp_path):
    directory = write_tabular(tmp_path / "tab", None, "item,scenario\ncaf,s\n")
    (directory / "interactions.csv").write_bytes("user,item\nu-a,café\n".encode("latin-1"))
    with pytest.raises(DataError, match=data_error(directory / "interactions.csv")):
        load_dataset(directory)
