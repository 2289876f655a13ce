"""Table rows by id without a Python dict per process, and safetensors files memory-mapped.

An artifact of 10,000,000 users and 1,000,000 items would cost each serving process a copy of
its tables (2.7 GB at 64 dims) and about a gigabyte of id strings in a list and a dict. Here
both are read-only views of the artifact's files (`mmap`), whose pages the processes share
through the page cache:
- `map_safetensors` maps a safetensors file and returns each tensor as a numpy view of it;
- `IdTable` holds ids as fixed-width UTF-8 bytes in table order, with the permutation that
  sorts them, and finds an id's row by binary search (`np.searchsorted`): O(log n), a few
  microseconds an id for millions (a dict: 0.1 us, and 1.1 GB for 10M ids in each process).
"""

import json
import struct
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import overload

import numpy as np
import safetensors.numpy
import torch

from model.errors import ArtifactError

# safetensors' dtype names (https://github.com/huggingface/safetensors#format) in numpy.
_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
# utf-8 with lone surrogates passed through, as JSON may carry them in ids.
ENCODING, ERRORS = "utf-8", "surrogatepass"


def map_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as a read-only numpy view of the mapped file (the
    format: an 8-byte little-endian header size, a JSON header of dtype, shape and byte
    offsets, then the data). ArtifactError if the file is not one."""
    try:
        mapped = np.memmap(path, dtype=np.uint8, mode="r")
        (size,) = struct.unpack("<Q", mapped[:8].tobytes())
        header = json.loads(mapped[8 : 8 + size].tobytes())
        header.pop("__metadata__", None)
        arrays = {}
        for name, entry in header.items():
            begin, end = (8 + size + offset for offset in entry["data_offsets"])
            dtype = np.dtype(_DTYPES[entry["dtype"]])
            if not 8 + size <= begin <= end <= len(mapped):
                raise ValueError(f"tensor {name!r} lies outside the file")
            arrays[name] = mapped[begin:end].view(dtype).reshape(entry["shape"])
    except (struct.error, ValueError, KeyError, TypeError) as error:
        raise ArtifactError(f"{path}: not a readable safetensors file ({error!r})") from error
    return arrays


def mapped_tensor(array: np.ndarray) -> torch.Tensor:
    """A torch view of a read-only mapped array, no copy. torch warns that it cannot mark a
    tensor read-only; nothing in model/ or service/ writes into the tables (a write would
    fault), which tests/test_artifact_mmap.py checks by serving from mapped tables."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


class IdTable(Sequence[str]):
    """Ids in table order (`ids`, fixed-width bytes) and `order`, the rows sorted by id.

    A sequence of the ids (row -> id, as the list it replaces), and through `rows` a mapping
    id -> row. Both arrays may be memory-mapped views."""

    def __init__(self, ids: np.ndarray, order: np.ndarray) -> None:
        if ids.dtype.kind != "S" or order.dtype != np.int64 or ids.shape != order.shape:
            raise ArtifactError(
                f"id table: {ids.dtype}{ids.shape}, order {order.dtype}{order.shape}"
            )
        self.ids, self.order = ids, order

    @property
    def rows(self) -> "IdRows":
        return IdRows(self)

    @classmethod
    def build(cls, ids: Sequence[str], what: str = "ids") -> "IdTable":
        """The table of a list of distinct ids (ArtifactError naming a duplicate, or an id
        ending in a NUL character, which fixed-width bytes cannot keep)."""
        if isinstance(ids, IdTable):
            return ids
        encoded = [i.encode(ENCODING, ERRORS) for i in ids]
        width = max((len(b) for b in encoded), default=1) or 1
        array = np.array(encoded, dtype=f"S{width}").reshape(len(encoded))
        for value in encoded:
            if value.endswith(b"\0"):
                raise ArtifactError(f"{what}: id {value.decode(ENCODING, ERRORS)!r} ends in NUL")
        order = np.argsort(array, kind="stable").astype(np.int64)
        ordered = array[order]
        repeated = np.flatnonzero(ordered[1:] == ordered[:-1])
        if len(repeated):
            duplicate = ordered[repeated[0]].decode(ENCODING, ERRORS)
            raise ArtifactError(f"{what}: id {duplicate!r} appears more than once")
        return cls(array, order)

    @classmethod
    def from_bytes(cls, table: np.ndarray, order: np.ndarray, what: str = "ids") -> "IdTable":
        """From `to_bytes`'s arrays: [N, width] uint8 (as safetensors stores them) and order.
        ArtifactError unless `order` sorts the ids strictly: a lookup would then be wrong."""
        if table.dtype != np.uint8 or table.ndim != 2 or table.shape[1] == 0:
            raise ArtifactError(f"{what}: ids {table.dtype}{table.shape}, not [N, width] uint8")
        ids = table.view(f"S{table.shape[1]}").reshape(len(table))
        result = cls(ids, order)
        result._check_order(what)
        return result

    def _check_order(self, what: str, chunk: int = 1 << 16) -> None:
        """Rows in range and ids strictly increasing along `order` (so also a permutation),
        a chunk at a time: no [N] copy of the ids."""
        n = len(self)
        if n and (int(self.order.min()) < 0 or int(self.order.max()) >= n):
            raise ArtifactError(f"{what}: the sorted order names a row outside 0..{n - 1}")
        for start in range(0, max(n - 1, 0), chunk):
            ordered = self.ids[self.order[start : start + chunk + 1]]
            if not (ordered[1:] > ordered[:-1]).all():
                raise ArtifactError(
                    f"{what}: the sorted order does not sort the ids, or an id repeats "
                    f"(near sorted position {start}): the index is corrupt"
                )

    def to_bytes(self) -> dict[str, np.ndarray]:
        width = self.ids.dtype.itemsize
        return {"ids": self.ids.view(np.uint8).reshape(len(self), width), "order": self.order}

    def check_rows(self, rows: int, what: str) -> None:
        """ArtifactError unless there is one id per row of a table: a row with no id, or an
        id past the table, would serve the wrong vector."""
        if len(self) != rows:
            raise ArtifactError(f"{what}: {len(self)} ids for a table of {rows} rows")

    def row(self, key: object) -> int | None:
        """The row of an id; None for an id not in the table (or not a string)."""
        value = _encoded(key)
        if value is None or len(value) > self.ids.dtype.itemsize or not len(self):
            return None
        k = int(np.searchsorted(self.ids, value, sorter=self.order))
        # bytes equality: b"a" is not b"a\0", which the fixed-width search treats as equal.
        if k < len(self) and bytes(self.ids[self.order[k]]) == value:
            return int(self.order[k])
        return None

    def rows_of(self, keys: Sequence[object]) -> np.ndarray:
        """[len(keys)] int64: each key's row as `row` gives it, -1 where it has none; one
        search for all of them (a pool of thousands of candidates at once)."""
        found = np.full(len(keys), -1, dtype=np.int64)
        positions, values = self._searchable(keys)
        if not values or not len(self):
            return found
        wanted = np.array(values, dtype=self.ids.dtype)
        at = np.minimum(np.searchsorted(self.ids, wanted, sorter=self.order), len(self) - 1)
        rows = self.order[at]
        hit = self.ids[rows] == wanted
        found[np.asarray(positions)[hit]] = rows[hit]
        return found

    def _searchable(self, keys: Sequence[object]) -> tuple[list[int], list[bytes]]:
        """The keys that can be ids, encoded, and their positions: strings that encode, fit
        the width and do not end in NUL (which the fixed-width comparison would not see)."""
        width = self.ids.dtype.itemsize
        try:  # the usual case, all strings that encode, in one pass
            encoded = [key.encode(ENCODING, ERRORS) for key in keys]  # type: ignore[union-attr]
        except (AttributeError, UnicodeEncodeError):
            encoded = [_encoded(key) for key in keys]
        positions = [
            k
            for k, value in enumerate(encoded)
            if value is not None and len(value) <= width and not value.endswith(b"\0")
        ]
        return positions, [encoded[k] for k in positions]  # type: ignore[misc]

    def __len__(self) -> int:
        return len(self.ids)

    @overload
    def __getitem__(self, row: int) -> str: ...
    @overload
    def __getitem__(self, row: slice) -> list[str]: ...
    def __getitem__(self, row: int | slice) -> str | list[str]:
        if isinstance(row, slice):
            return [self[k] for k in range(*row.indices(len(self)))]
        return bytes(self.ids[row]).decode(ENCODING, ERRORS)

    def __iter__(self) -> Iterator[str]:
        return (bytes(value).decode(ENCODING, ERRORS) for value in self.ids)


class IdRows(Mapping[str, int]):
    """id -> row of an IdTable, with a dict's `in`, `[]` and `get`."""

    def __init__(self, table: IdTable) -> None:
        self._table = table

    @property
    def table(self) -> IdTable:
        return self._table

    def __getitem__(self, key: str) -> int:
        row = self._table.row(key)
        if row is None:
            raise KeyError(key)
        return row

    def get(self, key: str, default: int | None = None) -> int | None:  # type: ignore[override]
        row = self._table.row(key)
        return default if row is None else row

    def __contains__(self, key: object) -> bool:
        return self._table.row(key) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(self._table)

    def __len__(self) -> int:
        return len(self._table)


def save_index(tables: Mapping[str, IdTable], path: Path) -> None:
    """The id tables by kind ("user", "item") in one safetensors file."""
    safetensors.numpy.save_file(
        {
            f"{kind}_{name}": array
            for kind, table in tables.items()
            for name, array in table.to_bytes().items()
        },
        str(path),
    )


def map_index(path: Path, kinds: Sequence[str]) -> list[IdTable]:
    """`save_index`'s tables of `kinds`, mapped and checked (ArtifactError if one is missing
    or does not sort its ids)."""
    index = map_safetensors(path)
    try:
        return [
            IdTable.from_bytes(index[f"{kind}_ids"], index[f"{kind}_order"], f"{path}: {kind}")
            for kind in kinds
        ]
    except KeyError as error:
        raise ArtifactError(f"{path}: no {error} table") from error


def _encoded(key: object) -> bytes | None:
    """A key as the table stores ids; None for one that is not a string or does not encode."""
    if not isinstance(key, str):
        return None
    try:
        return key.encode(ENCODING, ERRORS)
    except UnicodeEncodeError:
        return None
