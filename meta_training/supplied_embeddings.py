"""User and item vectors from the caller's own model (`s2meta train --embeddings DIR`), used
instead of pretraining the ALS. docs/data.md describes the layout:

- Parquet: DIR/users.parquet and DIR/items.parquet, each with an `id` column and a `vector`
  column (a list of floats, the same length on every row);
- NumPy: DIR/users.npy and DIR/items.npy ([N, D] floats) with DIR/users.txt and
  DIR/items.txt (N ids, one per line, in the arrays' row order).

Every user and item with an interaction must have a vector; ids the data does not have are
ignored. An item with a vector but no interaction keeps it (known); one with neither is zero
and unknown, as with pretrained embeddings.
"""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from meta_training.dataset import InteractionData
from meta_training.embeddings import Embeddings
from meta_training.errors import DataError

KINDS = ("users", "items")
PARQUET = {kind: (f"{kind}.parquet",) for kind in KINDS}
NUMPY = {kind: (f"{kind}.npy", f"{kind}.txt") for kind in KINDS}
EXAMPLES = 5  # missing ids named in an error


def supplied_files(directory: Path) -> dict[str, tuple[Path, ...]]:
    """Per kind (users, items), the files of whichever layout `directory` holds."""
    directory = Path(directory)
    for layout in (PARQUET, NUMPY):
        files = {kind: tuple(directory / name for name in names) for kind, names in layout.items()}
        if all(path.is_file() for paths in files.values() for path in paths):
            return files
    raise DataError(
        f"{directory}: no embeddings: expected users.parquet and items.parquet, or users.npy, "
        "users.txt, items.npy and items.txt"
    )


def read_supplied_embeddings(directory: Path, data: InteractionData) -> Embeddings:
    """The vectors aligned with `data`'s user and item indices, after every check."""
    files = supplied_files(directory)
    read = {
        kind: _read_parquet(*paths) if len(paths) == 1 else _read_numpy(*paths)
        for kind, paths in files.items()
    }
    (user_ids, users), (item_ids, items) = read["users"], read["items"]
    users_file, items_file = files["users"][0], files["items"][0]
    if users.shape[1] != items.shape[1]:
        raise DataError(
            f"{items_file}: vectors of dimension {items.shape[1]}, but {users_file.name} has "
            f"{users.shape[1]}: users and items must share one dimension"
        )
    users_ids_file, items_ids_file = files["users"][-1], files["items"][-1]
    user, user_known = _align(
        users_file, users_ids_file, user_ids, users, data.user_ids, data.users, "users"
    )
    item, item_known = _align(
        items_file, items_ids_file, item_ids, items, data.item_ids, data.items, "items"
    )
    return Embeddings(user, item, user_known, item_known)


def _read_parquet(path: Path) -> tuple[list[str], np.ndarray]:
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{path}: not a readable Parquet file: {error}") from None
    missing = [name for name in ("id", "vector") if name not in table.column_names]
    if missing:
        raise DataError(
            f"{path}: no column {', '.join(map(repr, missing))} (columns: "
            f"{', '.join(table.column_names)}); expected id and vector"
        )
    ids, vectors = table.column("id"), table.column("vector")
    if not pa.types.is_list(vectors.type) and not pa.types.is_fixed_size_list(vectors.type):
        raise DataError(f"{path}: column 'vector' is {vectors.type}, expected a list of floats")
    for name, column in (("id", ids), ("vector", vectors)):
        if column.null_count:
            raise DataError(f"{path}: column {name!r} has {column.null_count} empty value(s)")
    lengths = pc.list_value_length(vectors).to_numpy()
    if len(lengths) and (lengths != lengths[0]).any():
        row = int(np.flatnonzero(lengths != lengths[0])[0])
        raise DataError(
            f"{path}: row {row} has a vector of length {lengths[row]}, row 0 of {lengths[0]}"
        )
    try:
        flat = pc.list_flatten(vectors).to_numpy(zero_copy_only=False)
        matrix = flat.astype(np.float32).reshape(len(lengths), lengths[0] if len(lengths) else 0)
    except (pa.ArrowException, ValueError, TypeError):
        raise DataError(f"{path}: column 'vector' must hold numbers") from None
    return [str(value) for value in ids.to_pylist()], matrix


def _read_numpy(array_path: Path, ids_path: Path) -> tuple[list[str], np.ndarray]:
    try:
        array = np.load(array_path, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise DataError(f"{array_path}: not a readable .npy array: {error}") from None
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.number):
        raise DataError(
            f"{array_path}: expected a 2-D array of numbers [ids, dim], got shape "
            f"{list(array.shape)} of {array.dtype}"
        )
    try:
        ids = ids_path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise DataError(f"{ids_path}: not UTF-8 text: {error}") from None
    if len(ids) != len(array):
        raise DataError(
            f"{ids_path}: {len(ids)} ids for the {len(array)} rows of {array_path.name}; "
            "expected one id per line, in row order"
        )
    return ids, array.astype(np.float32)


def _align(
    path: Path,
    ids_path: Path,  # where the ids are: the Parquet file, or the .txt beside the .npy
    ids: list[str],
    vectors: np.ndarray,  # [N, D] float32
    data_ids: list[str],
    data_rows: np.ndarray,  # [n] index of each interaction's user (or item)
    kind: str,
) -> tuple[np.ndarray, np.ndarray]:
    """[len(data_ids), D] vectors in the data's order and which of them were supplied."""
    if vectors.shape[1] == 0:
        raise DataError(f"{path}: vectors of dimension 0")
    row_of: dict[str, int] = {}
    for row, key in enumerate(ids):
        if key in row_of:
            raise DataError(_duplicate(ids_path, key, row_of[key], row))
        row_of[key] = row
    finite = np.isfinite(vectors).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise DataError(
            f"{path}: {int((~finite).sum())} vector(s) with NaN or inf, the first of id "
            f"{ids[row]!r} (row {row})"
        )
    position = np.array([row_of.get(key, -1) for key in data_ids], dtype=np.int64)
    interacted = np.bincount(data_rows, minlength=len(data_ids)) > 0
    missing = np.flatnonzero(interacted & (position < 0))
    if len(missing):
        examples = ", ".join(repr(data_ids[i]) for i in missing[:EXAMPLES])
        raise DataError(
            f"{path}: {len(missing)} of the {int(interacted.sum())} {kind} with an interaction "
            f"have no vector, e.g. {examples}"
        )
    known = position >= 0
    aligned = np.zeros((len(data_ids), vectors.shape[1]), dtype=np.float32)
    aligned[known] = vectors[position[known]]
    return aligned, known


def _duplicate(ids_path: Path, key: str, first: int, again: int) -> str:
    """An id file's lines count from 1; a Parquet file's rows from 0, as in its other errors."""
    if ids_path.suffix == ".txt":
        return f"{ids_path}:{again + 1}: duplicate id {key!r} (line {first + 1})"
    return f"{ids_path}: duplicate id {key!r} (rows {first} and {again})"
