"""A loaded artifact maps its tables and ids instead of copying them (model/ids.py): the
tables are views of the registry's file, the id lookups answer as the dicts they replace,
older artifacts without the id index still load, and the service answers on odd ids."""

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import psutil
import pytest
import safetensors.numpy
import torch
from conftest import running
from safetensors.torch import load_file
from synthetic import default_scenario, synthetic_artifact

from model.artifact import IDS_INDEX, MANIFEST, load_artifact, publish, save_artifact
from model.errors import ArtifactError
from model.ids import IdTable
from service.learners import load_version
from service.settings import Settings

pytestmark = pytest.mark.anyio

# Ids a shop might have: unicode, prefixes of one another, spaces, the empty string, a lone
# surrogate (JSON can carry one), a long one.
ODD = ["", "a", "ab", "a b", "ñandú", "用户", "🛒", "x\ud800y", "B", "z" * 300, "0", "00"]
UNKNOWN = ["abc", "a\0", "ab ", "A", "ñ", "z" * 301, "z" * 299, "000", "\ud800", "🛒🛒"]


def mapping_of(tensor: torch.Tensor) -> str | None:
    """The file whose shared read-only mapping in this process holds the tensor's data (its
    pages are the page cache's, one copy for every process); None otherwise: the heap, an
    anonymous mapping, or a private writable one such as safetensors.torch.load_file's,
    whose pages it copies, so that each worker would hold the tables again."""
    address = tensor.data_ptr()
    for region in psutil.Process().memory_maps(grouped=False):
        begin, end = (int(part, 16) for part in region.addr.split("-"))
        if begin <= address < end:
            shared = region.perms[1:] == "--s" and region.path.startswith("/")
            return region.path if shared else None
    return None


def odd_ids(count: int, prefix: str) -> list[str]:
    return ODD + [f"{prefix}{k}·" for k in range(count - len(ODD))]


def assert_same_lookups(rows, ids: list[str]) -> None:
    expected = {key: row for row, key in enumerate(ids)}
    for key in [*ids, *UNKNOWN, None, 3]:
        assert rows.get(key) == expected.get(key), key
        assert (key in rows) == (key in expected), key
    assert [rows[key] for key in ids] == list(range(len(ids)))
    with pytest.raises(KeyError):
        rows["a\0"]
    assert len(rows) == len(ids) and list(rows) == ids
    # The batched lookup answers as the single one.
    keys = [*ids, *UNKNOWN, None, 3, "a\0", ids[0] + "\0", ids[-1][:-1]]
    found = rows.table.rows_of(keys)
    assert found.tolist() == [expected.get(key, -1) for key in keys]
    strings = [key for key in keys if isinstance(key, str)]  # the path for strings alone
    assert rows.table.rows_of(strings).tolist() == [expected.get(key, -1) for key in strings]
    assert rows.table.rows_of([]).tolist() == []


def test_tables_are_views_of_the_artifact_file(artifact):
    loaded = load_artifact(artifact)
    saved = synthetic_artifact()
    for name in ("user", "item"):
        table = getattr(loaded.tables, name)
        assert mapping_of(table) == str((artifact / "embeddings.safetensors").resolve())
        assert torch.equal(table, getattr(saved.tables, name))
    # The check tells a copy from a view: load_file maps the file too, privately, and copies.
    assert mapping_of(load_file(str(artifact / "embeddings.safetensors"))["user"]) is None


def test_id_lookups_equal_the_dicts_on_odd_ids(tmp_path):
    base = synthetic_artifact()
    users = odd_ids(len(base.user_ids), "u")
    items = odd_ids(len(base.item_ids), "i")
    save_artifact(dataclasses.replace(base, user_ids=users, item_ids=items), tmp_path / "a")
    loaded = load_artifact(tmp_path / "a")
    assert list(loaded.user_ids) == users and loaded.item_ids[7] == items[7]
    assert loaded.item_ids[-3:] == items[-3:]
    publish(tmp_path / "a", tmp_path / "registry")
    version = load_version(tmp_path / "registry", "v0001", torch.device("cpu"))
    assert_same_lookups(version.user_rows, users)
    assert_same_lookups(version.item_rows, items)
    # Older code reads the same artifact: ids.json is still written, in table order.
    ids = json.loads((tmp_path / "a" / "ids.json").read_text())
    assert ids == {"users": users, "items": items}


def test_an_artifact_without_the_id_index_loads_from_ids_json(artifact, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(artifact, old)
    (old / IDS_INDEX).unlink()
    manifest = json.loads((old / MANIFEST).read_text())
    del manifest["files"][IDS_INDEX]
    (old / MANIFEST).write_text(json.dumps(manifest))
    loaded = load_artifact(old)
    assert list(loaded.item_ids) == synthetic_artifact().item_ids
    assert_same_lookups(IdTable.build(loaded.user_ids).rows, synthetic_artifact().user_ids)


def swap_first_two(index: dict[str, np.ndarray]) -> None:
    index["user_order"] = index["user_order"][[1, 0, *range(2, len(index["user_order"]))]]


def drop_last_user(index: dict[str, np.ndarray]) -> None:
    ids = index["user_ids"][:-1]
    index["user_ids"] = ids
    index["user_order"] = np.argsort(ids.view(f"S{ids.shape[1]}").ravel()).astype(np.int64)


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (swap_first_two, "does not sort the ids"),
        (drop_last_user, "399 ids for a table of 400 rows"),
        (lambda index: index.update(user_ids=index["user_ids"].ravel()), "not \\[N, width\\]"),
        (lambda index: index["user_order"].__setitem__(0, 10**9), "outside 0..399"),
        (lambda index: index.pop("item_order"), "no 'item_order' table"),
    ],
)
def test_an_inconsistent_id_index_is_refused_on_load(artifact, tmp_path, corrupt, message):
    """Written by a faulty tool with a matching manifest: a wrong row must not be served."""
    bad = tmp_path / "bad"
    shutil.copytree(artifact, bad)
    index = {k: v.copy() for k, v in safetensors.numpy.load_file(str(bad / IDS_INDEX)).items()}
    corrupt(index)
    safetensors.numpy.save_file(index, str(bad / IDS_INDEX))
    manifest = json.loads((bad / MANIFEST).read_text())
    with (bad / IDS_INDEX).open("rb") as file:
        manifest["files"][IDS_INDEX]["sha256"] = hashlib.file_digest(file, "sha256").hexdigest()
    manifest["files"][IDS_INDEX]["bytes"] = (bad / IDS_INDEX).stat().st_size
    (bad / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=message):
        load_artifact(bad)


@pytest.mark.parametrize(
    ("ids", "message"),
    [(["a", "b", "a"], "'a' appears more than once"), (["a", "b\0"], "ends in NUL")],
)
def test_ids_a_table_cannot_keep_are_refused_on_save(tmp_path, ids, message):
    artifact = dataclasses.replace(synthetic_artifact(), user_ids=ids)
    with pytest.raises(ArtifactError, match=message):
        save_artifact(artifact, tmp_path / "a")


def translated(body: dict, users: dict[str, str], items: dict[str, str]) -> dict:
    return {
        **body,
        "interactions": [
            {"user": users[i["user"]], "item": items[i["item"]]} for i in body["interactions"]
        ],
        "candidates": [items[c] for c in body["candidates"]],
    }


async def recommend(registry: Path, body: dict, user: str) -> list[str]:
    """Adapt the scenario and rank for `user` on a fresh service over `registry`; checks that
    the service serves from the mapped file."""
    async with running(Settings(registry=registry)) as (app, client):
        response = await client.post("/scenarios/s/adapt", json=body)
        assert response.status_code == 200, response.text
        response = await client.get("/recommend", params={"user": user, "scenario": "s", "n": 20})
        assert response.status_code == 200, response.text
        current = app.state.service.learners.current
        assert mapping_of(current.tables.item) == str(
            (registry / "versions" / "v0001" / "embeddings.safetensors").resolve()
        )
        return [item["item"] for item in response.json()["items"]]


async def test_the_service_answers_on_odd_ids_as_on_plain_ones(registry, tmp_path):
    base = synthetic_artifact()
    users = dict(zip(base.user_ids, odd_ids(len(base.user_ids), "u"), strict=True))
    items = dict(zip(base.item_ids, odd_ids(len(base.item_ids), "i"), strict=True))
    odd = dataclasses.replace(base, user_ids=list(users.values()), item_ids=list(items.values()))
    save_artifact(odd, tmp_path / "odd")
    publish(tmp_path / "odd", tmp_path / "odd-registry")
    scenario = default_scenario()
    # Make sure the odd ids themselves are in play, not only the generated ones.
    assert {items[c] for c in scenario.candidates} & set(ODD)
    plain = await recommend(registry, scenario.body(), scenario.eval_user)
    served = await recommend(
        tmp_path / "odd-registry",
        translated(scenario.body(), users, items),
        users[scenario.eval_user],
    )
    assert len(plain) == 20 and served == [items[i] for i in plain]


def test_a_version_whose_tables_hold_nan_is_refused(tmp_path):
    """A NaN would score every candidate NaN, and fold every new id from it, silently."""
    base = synthetic_artifact()
    item = base.tables.item.clone()
    item[7, 3] = float("nan")
    broken = dataclasses.replace(base, tables=dataclasses.replace(base.tables, item=item))
    save_artifact(broken, tmp_path / "a")
    publish(tmp_path / "a", tmp_path / "registry")
    with pytest.raises(ArtifactError, match="v0001: item table: row 7 holds a NaN or inf"):
        load_version(tmp_path / "registry", "v0001", torch.device("cpu"))
