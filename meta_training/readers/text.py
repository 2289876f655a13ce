"""Delimited text (CSV, RecBole's tab-separated atomic files) read with the csv module, which
counts physical lines, so every error names the file and the line."""

import csv
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from meta_training.errors import DataError

Row = tuple[int, list[str]]  # (line number, stripped fields)
# An artifact keeps ids as fixed-width bytes, which cannot end in NUL (model/ids.py).
NUL_IN_ID = "an id holds a NUL character"


@contextmanager
def decoding(path: Path) -> Iterator[None]:
    """Turn a decoding failure into a DataError naming the file and byte offset."""
    try:
        yield
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text (byte {error.start}: {error.reason})") from error


def read_delimited(
    path: Path, delimiter: str, check_header: Callable[[list[str]], list[int]]
) -> tuple[list[str], list[Row]]:
    """The header and the rows with their line numbers. `check_header` raises on a wrong
    header and returns the columns that must not be empty (the ids); every row has the
    header's number of fields. Blank lines are skipped."""
    # utf-8-sig: spreadsheet programs write a byte-order mark before the header.
    with decoding(path), path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        try:
            header = [name.strip() for name in next(reader)]
        except StopIteration:
            raise DataError(f"{path}: empty file, expected a header") from None
        except csv.Error as error:
            raise DataError(f"{path}:1: {error}") from error
        nonempty = check_header(header)
        rows: list[Row] = []
        try:
            for fields in reader:
                if not fields:
                    continue
                fields = [field.strip() for field in fields]
                if len(fields) != len(header) or not all(fields[i] for i in nonempty):
                    names = ", ".join(header[i] for i in nonempty)
                    raise DataError(
                        f"{path}:{reader.line_num}: expected {len(header)} fields "
                        f"({delimiter.join(header)!r}) with {names} non-empty, got {fields!r}"
                    )
                if any("\0" in fields[i] for i in nonempty):
                    raise DataError(f"{path}:{reader.line_num}: {NUL_IN_ID}, got {fields!r}")
                rows.append((reader.line_num, fields))
        except csv.Error as error:
            raise DataError(f"{path}:{reader.line_num}: {error}") from error
    return header, rows


def parse_time(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise DataError(f"{where}: timestamp {text!r} is not a finite number")
    return value


def parse_weight(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    # A weight is a confidence: zero, negative or infinite confidence means nothing to ALS.
    if not (math.isfinite(value) and value > 0):
        raise DataError(f"{where}: weight {text!r} is not a positive finite number")
    return value
