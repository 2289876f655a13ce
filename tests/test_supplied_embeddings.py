"""`s2meta train --embeddings DIR`: the caller's own user and item vectors (Parquet, or .npy
with id files) replace the ALS, land in the artifact as given, and every bad input is one
error line naming the file, exit code 2, no artifact."""

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_cli import error_line

from meta_training.cli import main
from model.artifact import load_artifact

USERS, ITEMS, SCENARIOS, PER_USER, DIM = 60, 40, 4, 14, 8


@pytest.fixture(scope="module")
def shop(tmp_path_factory) -> Path:
    """A small tabular dataset: 4 scenarios of 10 items each, 60 users with 14 items each,
    and one catalog user id never used ('ghost' is only in the vectors, as an extra id)."""
    rng = np.random.default_rng(0)
    directory = tmp_path_factory.mktemp("shop")
    with (directory / "interactions.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["user", "item", "timestamp"])
        for user in range(USERS):
            for time, item in enumerate(rng.choice(ITEMS, PER_USER, replace=False)):
                writer.writerow([f"u{user}", f"i{item}", time])
    with (directory / "item_scenarios.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["item", "scenario"])
        for item in range(ITEMS):
            writer.writerow([f"i{item}", f"s{item * SCENARIOS // ITEMS}"])
    return directory


def vectors(kind: str, count: int, dim: int = DIM) -> tuple[list[str], np.ndarray]:
    """Ids (in reverse order, so alignment is tested) and random vectors, plus one extra id."""
    prefix = "u" if kind == "users" else "i"
    ids = [f"{prefix}{k}" for k in reversed(range(count))] + ["ghost"]
    seed = 1 if kind == "users" else 2
    return ids, np.random.default_rng(seed).normal(size=(len(ids), dim)).astype(np.float32)


def write_numpy(directory: Path, **override: tuple[list[str], np.ndarray]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for kind, count in (("users", USERS), ("items", ITEMS)):
        ids, array = override.get(kind) or vectors(kind, count)
        np.save(directory / f"{kind}.npy", array)
        (directory / f"{kind}.txt").write_text("".join(f"{key}\n" for key in ids))
    return directory


def write_parquet(directory: Path, **override: pa.Table) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for kind, count in (("users", USERS), ("items", ITEMS)):
        ids, array = vectors(kind, count)
        table = override.get(kind) or pa.table({"id": ids, "vector": list(array)})
        pq.write_table(table, directory / f"{kind}.parquet")
    return directory


def train(shop: Path, embeddings: Path, out: Path, cache: Path) -> int:
    return main(
        [
            "train",
            "--data",
            str(shop),
            "--embeddings",
            str(embeddings),
            "--out",
            str(out),
            "--cache-dir",
            str(cache),
            "--min-pool-items",
            "5",
            "--min-interactions",
            "10",
            "--support-size",
            "8",
            "--variant",
            "hybrid",
            "--meta-steps",
            "1",
            "--meta-batch",
            "1",
            "--adapt-max-steps",
            "3",
            "--adapt-min-steps",
            "1",
        ]
    )


@pytest.mark.parametrize("write", [write_numpy, write_parquet])
def test_supplied_vectors_reach_the_artifact_as_given(shop, tmp_path, capsys, write):
    embeddings = write(tmp_path / "vectors")
    out = tmp_path / "artifact"
    assert train(shop, embeddings, out, tmp_path / "cache") == 0
    assert f"embeddings supplied by {embeddings} ({DIM} dims)" in capsys.readouterr().out
    artifact = load_artifact(out)
    for kind, count, ids, table in (
        ("users", USERS, artifact.user_ids, artifact.tables.user),
        ("items", ITEMS, artifact.item_ids, artifact.tables.item),
    ):
        given_ids, given = vectors(kind, count)
        row = {key: k for k, key in enumerate(given_ids)}
        assert "ghost" not in ids  # extra ids are ignored
        expected = given[[row[key] for key in ids]]
        np.testing.assert_array_equal(table.numpy(), expected)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["embedding"] == {"supplied": str(embeddings.resolve()), "dim": DIM}
    assert metrics["protocol"]["kind"] == "serving"


def test_edited_vectors_are_read_again(shop, tmp_path):
    """The prepared cache keys on the vectors' bytes, not on their directory."""
    embeddings = write_numpy(tmp_path / "vectors")
    cache = tmp_path / "cache"
    assert train(shop, embeddings, tmp_path / "a", cache) == 0
    ids, array = vectors("users", USERS)
    write_numpy(embeddings, users=(ids, array * 2))
    assert train(shop, embeddings, tmp_path / "b", cache) == 0
    first, second = load_artifact(tmp_path / "a"), load_artifact(tmp_path / "b")
    np.testing.assert_allclose(second.tables.user.numpy(), 2 * first.tables.user.numpy())


def _missing_users() -> tuple[list[str], np.ndarray]:
    ids, array = vectors("users", USERS)
    keep = [k for k, key in enumerate(ids) if key not in ("u3", "u7")]
    return [ids[k] for k in keep], array[keep]


def _duplicate_items() -> tuple[list[str], np.ndarray]:
    ids, array = vectors("items", ITEMS)
    return [*ids, "i5"], np.vstack([array, array[:1]])


def _nan_items() -> tuple[list[str], np.ndarray]:
    ids, array = vectors("items", ITEMS)
    array[4, 1] = np.nan
    return ids, array


def _inf_users() -> tuple[list[str], np.ndarray]:
    ids, array = vectors("users", USERS)
    array[0, 0] = np.inf
    return ids, array


@pytest.mark.parametrize(
    ("override", "file", "message"),
    [
        (
            {"items": vectors("items", ITEMS, dim=DIM + 1)},
            "items.npy",
            f"vectors of dimension {DIM + 1}, but users.npy has {DIM}",
        ),
        ({"users": _missing_users()}, "users.npy", "2 of the 60 users with an interaction"),
        ({"items": _duplicate_items()}, "items.txt", "items.txt:42: duplicate id 'i5' (line 35)"),
        ({"items": _nan_items()}, "items.npy", "1 vector(s) with NaN or inf"),
        ({"users": _inf_users()}, "users.npy", "NaN or inf, the first of id 'u59'"),
        (
            {"users": (vectors("users", USERS)[0], np.zeros((USERS + 1, 2, DIM)))},
            "users.npy",
            "expected a 2-D array of numbers [ids, dim], got shape [61, 2, 8]",
        ),
        (
            {"items": (vectors("items", ITEMS)[0][:-3], vectors("items", ITEMS)[1])},
            "items.txt",
            "38 ids for the 41 rows of items.npy",
        ),
    ],
)
def test_bad_numpy_vectors_are_refused(shop, tmp_path, capsys, override, file, message):
    embeddings = write_numpy(tmp_path / "vectors", **override)
    out = tmp_path / "artifact"
    capsys.readouterr()
    assert train(shop, embeddings, out, tmp_path / "cache") == 2
    line = error_line(capsys.readouterr().err)
    assert f"{embeddings / file}:" in line and message in line
    assert not out.exists()


def test_missing_ids_are_counted_and_named(shop, tmp_path, capsys):
    embeddings = write_numpy(tmp_path / "vectors", users=_missing_users())
    assert train(shop, embeddings, tmp_path / "artifact", tmp_path / "cache") == 2
    line = error_line(capsys.readouterr().err)
    assert line.endswith("have no vector, e.g. 'u3', 'u7'")


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (pa.table({"key": ["u0"], "vector": [[1.0] * DIM]}), "no column 'id'"),
        (pa.table({"id": ["u0"], "vector": [1.0]}), "column 'vector' is double"),
        (
            pa.table({"id": ["u0", "u1"], "vector": [[1.0] * DIM, [1.0] * (DIM - 1)]}),
            f"row 1 has a vector of length {DIM - 1}, row 0 of {DIM}",
        ),
        (pa.table({"id": ["u0", None], "vector": [[1.0] * DIM] * 2}), "'id' has 1 empty"),
    ],
)
def test_bad_parquet_vectors_are_refused(shop, tmp_path, capsys, table, message):
    embeddings = write_parquet(tmp_path / "vectors", users=table)
    assert train(shop, embeddings, tmp_path / "artifact", tmp_path / "cache") == 2
    line = error_line(capsys.readouterr().err)
    assert f"{embeddings / 'users.parquet'}:" in line and message in line
    assert not (tmp_path / "artifact").exists()


def test_a_directory_without_vectors_is_refused(shop, tmp_path, capsys):
    empty = tmp_path / "vectors"
    empty.mkdir()
    (empty / "users.npy").write_bytes(b"")
    assert train(shop, empty, tmp_path / "artifact", tmp_path / "cache") == 2
    line = error_line(capsys.readouterr().err)
    assert f"{empty}: no embeddings: expected users.parquet and items.parquet" in line
