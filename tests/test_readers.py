"""The own-data forms: Parquet, RecBole atomic files, weights and cold items. Each form, read
from small files written here, gives the same InteractionData as the equivalent CSV; every
error names the file and the line, or the column; the CLI exits 2 with one line."""

import dataclasses
import datetime
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import DATA

from meta_training.cli import main
from meta_training.config import EmbeddingConfig, ProtocolConfig
from meta_training.dataset import InteractionData, load_dataset, write_tabular
from meta_training.embeddings import pretrain_embeddings
from meta_training.errors import DataError
from meta_training.protocol import build_benchmark, ground_truth

# One log in every form: repeated pairs (u-a/i-x twice, weights 2 + 0.5), a tie in time,
# an item in two scenarios and a cold item (i-cold) that nobody interacted with.
LOG = [  # user, item, timestamp, weight
    ("u-b", "i-x", 30, 1.0),
    ("u-a", "i-y", 20, 3.0),
    ("u-a", "i-x", 10, 2.0),
    ("u-b", "i-z", 5, 1.5),
    ("u-a", "i-x", 40, 0.5),
    ("u-c", "i-y", 7, 1.0),
    ("u-c", "i-x", 7, 4.0),
]
MEMBERSHIP = [("i-x", "s-1"), ("i-y", "s-1"), ("i-z", "s-2"), ("i-cold", "s-2"), ("i-x", "s-2")]


def csv_text(rows: list[tuple], header: str) -> str:
    return header + "\n" + "".join(",".join(map(str, row)) + "\n" for row in rows)


def write_csv_form(directory: Path, weighted: bool = True) -> Path:
    directory.mkdir(parents=True)
    rows = LOG if weighted else [row[:3] for row in LOG]
    header = "user,item,timestamp" + (",weight" if weighted else "")
    (directory / "interactions.csv").write_text(csv_text(rows, header))
    (directory / "item_scenarios.csv").write_text(csv_text(MEMBERSHIP, "item,scenario"))
    return directory


def log_table() -> pa.Table:
    users, items, times, weights = zip(*LOG, strict=True)
    return pa.table({"user": users, "item": items, "timestamp": times, "weight": weights})


def membership_table() -> pa.Table:
    items, scenarios = zip(*MEMBERSHIP, strict=True)
    return pa.table({"item": items, "scenario": scenarios})


def write_recbole(directory: Path, inter: str, item: str | None) -> Path:
    directory.mkdir(parents=True)
    (directory / f"{directory.name}.inter").write_text(inter)
    if item is not None:
        (directory / f"{directory.name}.item").write_text(item)
    return directory


def recbole_texts() -> tuple[str, str]:
    inter = "user_id:token\titem_id:token\trating:float\ttimestamp:float\tweight:float\n"
    inter += "".join(f"{u}\t{i}\t5\t{t}\t{w}\n" for u, i, t, w in LOG)
    scenarios: dict[str, list[str]] = {}
    for item, scenario in MEMBERSHIP:
        scenarios.setdefault(item, []).append(scenario)
    item = "item_id:token\tyear:token\tgenre:token_seq\n"
    item += "".join(f"{i}\t1999\t{' '.join(s)}\n" for i, s in scenarios.items())
    return inter, item


def assert_same_data(a: InteractionData, b: InteractionData) -> None:
    """Equal in everything but the name and the files read."""
    for field in dataclasses.fields(InteractionData):
        if field.name in ("name", "source_files"):
            continue
        left, right = getattr(a, field.name), getattr(b, field.name)
        if field.name == "scenario_pools":
            assert len(left) == len(right)
            for x, y in zip(left, right, strict=True):
                np.testing.assert_array_equal(x, y)
        elif isinstance(left, np.ndarray) or isinstance(right, np.ndarray):
            assert left is not None and right is not None, field.name
            np.testing.assert_array_equal(left, right, err_msg=field.name)
            assert left.dtype == right.dtype, field.name
        else:
            assert left == right, field.name


def id_view(data: InteractionData) -> tuple[list[tuple], dict[str, set[str]]]:
    """Rows as (user, item, weight) and pools as id sets: what survives renumbering."""
    weights = data.weights if data.weights is not None else [None] * data.num_interactions
    rows = [
        (data.user_ids[u], data.item_ids[i], w)
        for u, i, w in zip(data.users.tolist(), data.items.tolist(), weights, strict=True)
    ]
    pools = {
        scenario: {data.item_ids[i] for i in pool.tolist()}
        for scenario, pool in zip(data.scenario_ids, data.scenario_pools, strict=True)
    }
    return rows, pools


@pytest.fixture
def csv_data(tmp_path) -> InteractionData:
    return load_dataset(write_csv_form(tmp_path / "csv"))


# ---------------------------------------------------------------------------- one log, every form


def test_csv_reference_merges_repeats_sums_weights_and_keeps_cold_items(csv_data):
    data = csv_data
    rows, _ = id_view(data)
    # u-a met i-x at 10 (and again at 40: merged, weights 2 + 0.5), then i-y at 20.
    assert rows == [
        ("u-b", "i-z", 1.5),
        ("u-b", "i-x", 1.0),
        ("u-a", "i-x", 2.5),
        ("u-a", "i-y", 3.0),
        ("u-c", "i-y", 1.0),  # a tie in time keeps file order
        ("u-c", "i-x", 4.0),
    ]
    assert data.item_ids == ["i-x", "i-y", "i-z", "i-cold"]
    pools = dict(zip(data.scenario_ids, data.scenario_pools, strict=True))
    assert [data.item_ids[i] for i in pools["s-2"]] == ["i-x", "i-z", "i-cold"]
    assert data.weights.dtype == np.float64


def test_parquet_equals_csv(tmp_path, csv_data):
    directory = tmp_path / "pq"
    directory.mkdir()
    pq.write_table(log_table(), directory / "interactions.parquet")
    pq.write_table(membership_table(), directory / "item_scenarios.parquet")
    data = load_dataset(directory)
    assert_same_data(data, csv_data)
    assert data.source_files == (
        directory / "interactions.parquet",
        directory / "item_scenarios.parquet",
    )


def test_parquet_interactions_with_csv_scenarios_and_other_column_types(tmp_path):
    """Integer ids read as their decimal text, timestamps as time, dictionary strings as
    strings, integer weights as numbers, in any column order: as the CSV says the same."""
    directory = tmp_path / "mixed"
    directory.mkdir()
    times = pa.array([3_000, 1_000, 2_000], pa.timestamp("ms"))
    table = pa.table(
        {
            "weight": pa.array([2, 1, 5], pa.int16()),
            "item": pa.array(["7", "8", "7"]).dictionary_encode(),
            "timestamp": times,
            "user": pa.array([10, 10, 11], pa.int64()),
        }
    )
    pq.write_table(table, directory / "interactions.parquet")
    (directory / "item_scenarios.csv").write_text("scenario,item\nS,7\nS,9\n")
    csv_dir = tmp_path / "same-as-csv"
    csv_dir.mkdir()
    (csv_dir / "interactions.csv").write_text(
        "user,item,timestamp,weight\n10,7,3,2\n10,8,1,1\n11,7,2,5\n"
    )
    (csv_dir / "item_scenarios.csv").write_text("item,scenario\n7,S\n9,S\n")
    assert_same_data(load_dataset(directory), load_dataset(csv_dir))


@pytest.mark.parametrize("kind", [pa.timestamp("s", tz="UTC"), pa.date32(), pa.date64()])
def test_parquet_temporal_timestamps_order_rows(tmp_path, kind):
    directory = tmp_path / "dates"
    directory.mkdir()
    days = [datetime.date(2024, 3, 1), datetime.date(2023, 12, 31), datetime.date(2024, 1, 15)]
    timestamp = pa.array(days, pa.date32()).cast(kind)
    table = pa.table({"user": ["u"] * 3, "item": ["a", "b", "c"], "timestamp": timestamp})
    pq.write_table(table, directory / "interactions.parquet")
    pq.write_table(membership_table(), directory / "item_scenarios.parquet")
    data = load_dataset(directory)
    assert [data.item_ids[i] for i in data.items] == ["b", "c", "a"]


def test_recbole_directory_and_stem_equal_csv(tmp_path, csv_data):
    inter, item = recbole_texts()
    directory = write_recbole(tmp_path / "shop", inter, item)
    for path in (directory, directory / "shop"):
        data = load_dataset(path)
        assert data.name == "shop"
        assert data.source_files == (directory / "shop.inter", directory / "shop.item")
        assert_same_data(data, csv_data)


def test_recbole_without_timestamp_or_weight_is_file_order_unweighted(tmp_path):
    inter = "item_id:token\tuser_id:token\n" + "".join(f"{i}\t{u}\n" for u, i, _, _ in LOG)
    item = "item_id:token\tgenre:token_seq\ni-x\ts-1  s-2\ni-cold\t\n"
    data = load_dataset(write_recbole(tmp_path / "plain", inter, item))
    assert data.weights is None
    csv_dir = tmp_path / "plain-csv"
    csv_dir.mkdir()
    (csv_dir / "interactions.csv").write_text(csv_text([row[:2] for row in LOG], "user,item"))
    (csv_dir / "item_scenarios.csv").write_text("item,scenario\ni-x,s-1\ni-x,s-2\n")
    # An item with an empty token_seq is in no scenario, and with no interaction not read.
    assert_same_data(data, load_dataset(csv_dir))


def test_sequence_form_equals_csv_with_positions_as_time(tmp_path):
    (tmp_path / "S.txt").write_text("u1 a b a\nu2 c a\n")
    (tmp_path / "S_item2attributes.json").write_text(json.dumps({"a": [1], "d": [1, 2]}))
    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    (csv_dir / "interactions.csv").write_text(
        "user,item,timestamp\nu1,a,0\nu1,b,1\nu1,a,2\nu2,c,0\nu2,a,1\n"
    )
    (csv_dir / "item_scenarios.csv").write_text("item,scenario\na,1\nd,1\nd,2\n")
    assert_same_data(load_dataset(tmp_path / "S"), load_dataset(csv_dir))


# ---------------------------------------------------------------------------- weights


def test_weights_round_trip_through_export(tmp_path, csv_data):
    write_tabular(csv_data, tmp_path / "out")
    header = (tmp_path / "out" / "interactions.csv").read_text().splitlines()[0]
    assert header == "user,item,timestamp,weight"
    # The export numbers ids in row order; the rows, weights and pools are the same.
    assert id_view(load_dataset(tmp_path / "out")) == id_view(csv_data)


def test_unweighted_input_has_no_weights_and_exports_none(tmp_path):
    data = load_dataset(write_csv_form(tmp_path / "csv", weighted=False))
    assert data.weights is None
    write_tabular(data, tmp_path / "out")
    header = (tmp_path / "out" / "interactions.csv").read_text().splitlines()[0]
    assert header == "user,item,timestamp"


@pytest.fixture(scope="module")
def lastfm() -> InteractionData:
    return load_dataset(DATA / "LastFM")


def test_weights_are_the_als_confidence(lastfm):
    """implicit's confidence is alpha * value: weights of 2 with alpha a are ones with 2a,
    and differ from ones with alpha a."""
    visible = np.ones(lastfm.num_interactions, dtype=bool)
    config = EmbeddingConfig(dim=8, iterations=3, alpha=5.0)
    twos = dataclasses.replace(lastfm, weights=np.full(lastfm.num_interactions, 2.0))
    weighted = pretrain_embeddings(twos, visible, config, seed=0)
    doubled = pretrain_embeddings(
        lastfm, visible, config.model_copy(update={"alpha": 10.0}), seed=0
    )
    plain = pretrain_embeddings(lastfm, visible, config, seed=0)
    np.testing.assert_allclose(weighted.item, doubled.item, rtol=1e-4, atol=1e-5)
    assert not np.allclose(weighted.item, plain.item, atol=1e-3)


# ---------------------------------------------------------------------------- cold items downstream


def test_cold_items_pass_the_protocol_and_pretraining(tmp_path, lastfm):
    """Cold items added to LastFM's scenarios: in the pools the benchmark uses, never in a
    ground truth, zero vectors and unknown to the embeddings; the split is unchanged, as
    scenario selection counts interactions, not items (pool bounds aside)."""
    directory = tmp_path / "lastfm"
    write_tabular(lastfm, directory)
    cold = [(f"cold-{n}", scenario) for n, scenario in enumerate(lastfm.scenario_ids[:40])]
    with (directory / "item_scenarios.csv").open("a") as handle:
        handle.writelines(f"{item},{scenario}\n" for item, scenario in cold)
    data = load_dataset(directory)
    assert data.num_items == lastfm.num_items + len(cold)
    assert data.item_ids[-len(cold) :] == [item for item, _ in cold]

    protocol = ProtocolConfig()
    benchmark = build_benchmark(data, protocol, seed=0)
    cold_index = set(range(lastfm.num_items, data.num_items))
    tasks = [*benchmark.train, *benchmark.valid, *benchmark.test]
    assert any(cold_index & set(task.pool.tolist()) for task in tasks)
    for task in benchmark.test:
        users, truth = ground_truth(benchmark, task)
        is_cold = np.isin(task.pool, list(cold_index))
        assert not truth[:, is_cold].any() and len(users) > 0

    embeddings = pretrain_embeddings(
        data, benchmark.visible, EmbeddingConfig(dim=8, iterations=2), seed=0
    )
    assert not embeddings.item_known[lastfm.num_items :].any()
    assert not embeddings.item[lastfm.num_items :].any()


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("sequences", "attributes", "message"),
    [
        ("u1 a b\nu2 c\x00 a\n", {"a": [1]}, "S.txt:2: an id holds a NUL character"),
        ("u1 a b\n", {"a": [1], "d\x00": [1]}, "S_item2attributes.json: item 'd\\x00': an id"),
    ],
)
def test_sequence_form_refuses_an_id_with_a_nul(tmp_path, sequences, attributes, message):
    (tmp_path / "S.txt").write_text(sequences)
    (tmp_path / "S_item2attributes.json").write_text(json.dumps(attributes))
    with pytest.raises(DataError, match="^" + re.escape(f"{tmp_path}/{message}")):
        load_dataset(tmp_path / "S")


def pq_file(directory: Path, name: str, table: pa.Table) -> None:
    pq.write_table(table, directory / name)


def txt_file(directory: Path, name: str, text: str) -> None:
    (directory / name).write_text(text)


GOOD_MEMBERSHIP = ("item_scenarios.csv", "item,scenario\ni-x,s\n")
# (files to write, the bad file, what the message names after the file: ':LINE:' or column)
ERROR_CASES = {
    "csv-weight-zero": (
        [("interactions.csv", "user,item,weight\nu,i-x,1\nu,i-y,0\n"), GOOD_MEMBERSHIP],
        "interactions.csv",
        ":3:",
    ),
    "csv-weight-text": (
        [("interactions.csv", "user,item,weight\nu,i-x,heavy\n"), GOOD_MEMBERSHIP],
        "interactions.csv",
        ":2:",
    ),
    "csv-weight-empty": (
        [("interactions.csv", "user,item,timestamp,weight\nu,i-x,1,\n"), GOOD_MEMBERSHIP],
        "interactions.csv",
        ":2:",
    ),
    # An artifact cannot keep an id ending in NUL (model/ids.py): refused here, not after training.
    "csv-nul-in-id": (
        [("interactions.csv", "user,item\nu,i-x\nu,i-y\x00\n"), GOOD_MEMBERSHIP],
        "interactions.csv",
        ":3:",
    ),
    "parquet-nul-in-id": (
        [
            ("interactions.parquet", pa.table({"user": ["u", "v\x00"], "item": ["i-x", "i-x"]})),
            GOOD_MEMBERSHIP,
        ],
        "interactions.parquet",
        ": column 'user'",
    ),
    "csv-repeated-column": (
        [("interactions.csv", "user,item,user\nu,i-x,u\n"), GOOD_MEMBERSHIP],
        "interactions.csv",
        ":1:",
    ),
    "csv-and-parquet-both": (
        [
            ("interactions.csv", "user,item\nu,i-x\n"),
            ("interactions.parquet", pa.table({"user": ["u"], "item": ["i-x"]})),
            GOOD_MEMBERSHIP,
        ],
        "interactions.csv",
        ": interactions.parquet",
    ),
    "parquet-missing-column": (
        [("interactions.parquet", pa.table({"user": ["u"], "sku": ["i-x"]})), GOOD_MEMBERSHIP],
        "interactions.parquet",
        ": missing column 'item'",
    ),
    "parquet-unknown-column": (
        [
            ("interactions.parquet", pa.table({"user": ["u"], "item": ["i"], "ts": [1]})),
            GOOD_MEMBERSHIP,
        ],
        "interactions.parquet",
        ": unknown column 'ts'",
    ),
    "parquet-float-ids": (
        [("interactions.parquet", pa.table({"user": [1.5], "item": ["i-x"]})), GOOD_MEMBERSHIP],
        "interactions.parquet",
        ": column 'user': type double",
    ),
    "parquet-null-item": (
        [
            ("interactions.parquet", pa.table({"user": ["u", "v"], "item": ["i-x", None]})),
            GOOD_MEMBERSHIP,
        ],
        "interactions.parquet",
        ": column 'item': 1 null value(s), the first in row 2",
    ),
    "parquet-empty-id": (
        [
            ("interactions.parquet", pa.table({"user": ["u", " "], "item": ["i", "i"]})),
            GOOD_MEMBERSHIP,
        ],
        "interactions.parquet",
        ": column 'user': empty id in row 2",
    ),
    "parquet-text-timestamp": (
        [
            ("interactions.parquet", pa.table({"user": ["u"], "item": ["i"], "timestamp": ["x"]})),
            GOOD_MEMBERSHIP,
        ],
        "interactions.parquet",
        ": column 'timestamp': type string",
    ),
    "parquet-nan-timestamp": (
        [
            (
                "interactions.parquet",
                pa.table({"user": ["u", "u"], "item": ["i", "j"], "timestamp": [1.0, np.nan]}),
            ),
            GOOD_MEMBERSHIP,
        ],
        "interactions.parquet",
        ": column 'timestamp': nan is not a finite number (row 2)",
    ),
    "parquet-negative-weight": (
        [
            (
                "interactions.parquet",
                pa.table({"user": ["u", "u"], "item": ["i", "j"], "weight": [1.0, -2.0]}),
            ),
            GOOD_MEMBERSHIP,
        ],
        "interactions.parquet",
        ": column 'weight': -2.0 is not a positive finite number (row 2)",
    ),
    "parquet-null-scenario": (
        [
            ("interactions.csv", "user,item\nu,i-x\n"),
            (
                "item_scenarios.parquet",
                pa.table({"item": ["i-x"], "scenario": pa.array([None], pa.string())}),
            ),
        ],
        "item_scenarios.parquet",
        ": column 'scenario': 1 null value(s)",
    ),
    "parquet-not-parquet": (
        [("interactions.parquet", "user,item\nu,i\n"), GOOD_MEMBERSHIP],
        "interactions.parquet",
        ": not a readable Parquet file",
    ),
}
RECBOLE_INTER = "user_id:token\titem_id:token\ttimestamp:float\n"
RECBOLE_ITEM = "item_id:token\tgenre:token_seq\ni-x\ts\n"
RECBOLE_CASES = {
    "recbole-no-type": (["user_id\titem_id:token\nu\ti\n", RECBOLE_ITEM], "shop.inter", ":1:"),
    "recbole-bad-type": (
        ["user_id:text\titem_id:token\nu\ti\n", RECBOLE_ITEM],
        "shop.inter",
        ":1:",
    ),
    "recbole-user-float": (
        ["user_id:float\titem_id:token\n1\ti\n", RECBOLE_ITEM],
        "shop.inter",
        ":1:",
    ),
    "recbole-no-item-field": (
        ["user_id:token\tsku:token\nu\ti\n", RECBOLE_ITEM],
        "shop.inter",
        ":1:",
    ),
    "recbole-short-row": (
        [RECBOLE_INTER + "u\ti-x\t1\nu\ti-y\n", RECBOLE_ITEM],
        "shop.inter",
        ":3:",
    ),
    "recbole-bad-timestamp": (
        [RECBOLE_INTER + "u\ti-x\t1\n\nu\ti-y\tnoon\n", RECBOLE_ITEM],
        "shop.inter",
        ":4:",
    ),
    "recbole-bad-weight": (
        ["user_id:token\titem_id:token\tweight:float\nu\ti-x\t-1\n", RECBOLE_ITEM],
        "shop.inter",
        ":2:",
    ),
    "recbole-no-token-seq": (
        [RECBOLE_INTER + "u\ti-x\t1\n", "item_id:token\tgenre:token\ni-x\ts\n"],
        "shop.item",
        ":1:",
    ),
    "recbole-two-token-seqs": (
        [RECBOLE_INTER + "u\ti-x\t1\n", "item_id:token\ttitle:token_seq\tgenre:token_seq\n"],
        "shop.item",
        ":1:",
    ),
    "recbole-item-empty-id": (
        [RECBOLE_INTER + "u\ti-x\t1\n", RECBOLE_ITEM + "\ts\n"],
        "shop.item",
        ":3:",
    ),
    "recbole-no-item-file": (
        [RECBOLE_INTER + "u\ti-x\t1\n", None],
        "shop.item",
        ": file not found",
    ),
}


def write_case(directory: Path, files: list[tuple[str, str | pa.Table]]) -> None:
    directory.mkdir(parents=True)
    for name, content in files:
        if isinstance(content, pa.Table):
            pq_file(directory, name, content)
        else:
            txt_file(directory, name, content)


def make_case(tmp_path: Path, case: str) -> tuple[Path, str]:
    """The data path and the start of the message it must raise."""
    if case in ERROR_CASES:
        files, bad, where = ERROR_CASES[case]
        directory = tmp_path / "tab"
        write_case(directory, files)
    else:
        (inter, item), bad, where = RECBOLE_CASES[case]
        directory = write_recbole(tmp_path / "shop", inter, item)
    return directory, f"{directory / bad}{where}"


@pytest.mark.parametrize("case", [*ERROR_CASES, *RECBOLE_CASES])
def test_error_names_file_and_line_or_column(tmp_path, case):
    path, message = make_case(tmp_path, case)
    with pytest.raises(DataError, match="^" + re.escape(message)):
        load_dataset(path)


@pytest.mark.parametrize("case", ["csv-weight-zero", "parquet-null-item", "recbole-bad-timestamp"])
def test_cli_exits_2_with_one_line(tmp_path, capsys, case):
    path, message = make_case(tmp_path, case)
    code = main(["export-tabular", "--data", str(path), "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith(f"s2meta: error: {message}")
    assert captured.err.count("\n") == 1 and captured.err.endswith("\n")
    assert not (tmp_path / "out").exists()
