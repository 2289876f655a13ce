"""Parquet columns for the tabular form, read with pyarrow. A Parquet file has no lines, so
errors name the column, and the first offending row (counting from 1) where there is one."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from meta_training.errors import DataError
from meta_training.readers.text import NUL_IN_ID


def read_parquet(
    path: Path, required: tuple[str, ...], optional: tuple[str, ...]
) -> dict[str, list[str] | np.ndarray]:
    """Id columns (strings or integers) as lists of strings; timestamp (numbers, timestamps
    or dates) and weight (positive numbers) as float64 arrays."""
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{path}: not a readable Parquet file ({error})") from error
    names = table.column_names
    missing = [name for name in required if name not in names]
    unknown = [name for name in names if name not in (*required, *optional)]
    if missing:
        problem = f"missing column {missing[0]!r}"
    elif unknown:
        problem = f"unknown column {unknown[0]!r}"
    elif len(set(names)) != len(names):
        problem = "a repeated column name"
    else:
        problem = ""
    if problem:
        raise DataError(
            f"{path}: {problem}; columns are {names}, expected {list(required)} and "
            f"optionally {list(optional)}"
        )

    columns: dict[str, list[str] | np.ndarray] = {}
    for name in names:
        column = table.column(name)
        where = f"{path}: column {name!r}"
        if column.null_count:
            raise DataError(
                f"{where}: {column.null_count} null value(s), the first in row "
                f"{_row(pc.is_null(column))}"
            )
        if name in required:
            columns[name] = _ids(column, where)
        elif name == "timestamp":
            columns[name] = _times(column, where)
        else:
            columns[name] = _weights(column, where)
    return columns


def _type_error(where: str, column: pa.ChunkedArray, expected: str) -> DataError:
    return DataError(f"{where}: type {column.type}, expected {expected}")


def _ids(column: pa.ChunkedArray, where: str) -> list[str]:
    kind = column.type.value_type if pa.types.is_dictionary(column.type) else column.type
    # Integer ids read as their decimal text, as they would from a CSV file.
    if not (
        pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_integer(kind)
    ):
        raise _type_error(where, column, "strings or integers")
    text = pc.utf8_trim_whitespace(column.cast(pa.string()))
    empty = pc.equal(text, "")
    if pc.any(empty).as_py():
        raise DataError(f"{where}: empty id in row {_row(empty)}")
    nul = pc.match_substring(text, "\0")
    if pc.any(nul).as_py():
        raise DataError(f"{where}: {NUL_IN_ID} in row {_row(nul)}")
    return text.to_pylist()


def _times(column: pa.ChunkedArray, where: str) -> np.ndarray:
    kind = column.type
    if pa.types.is_timestamp(kind) or pa.types.is_date(kind):
        # Only the order matters: the count of units since the epoch keeps it.
        column = column.cast(pa.int32() if kind == pa.date32() else pa.int64())
    elif not (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
        raise _type_error(where, column, "numbers, timestamps or dates")
    values = column.to_numpy().astype(np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        raise DataError(f"{where}: {values[bad][0]} is not a finite number (row {_row(bad)})")
    return values


def _weights(column: pa.ChunkedArray, where: str) -> np.ndarray:
    if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)):
        raise _type_error(where, column, "numbers")
    values = column.to_numpy().astype(np.float64)
    bad = ~(np.isfinite(values) & (values > 0))
    if bad.any():
        raise DataError(
            f"{where}: {values[bad][0]} is not a positive finite number (row {_row(bad)})"
        )
    return values


def _row(mask: np.ndarray | pa.ChunkedArray) -> int:
    """The first row where `mask` holds, counting from 1."""
    if isinstance(mask, pa.ChunkedArray):
        mask = mask.to_numpy()
    return int(np.flatnonzero(mask)[0]) + 1
