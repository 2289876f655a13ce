"""Reading a dataset in any input form (docs/data.md), telling the forms apart by what exists
at the path; the readers live in meta_training/readers/.

1. Sequence form (the shared data): a path stem with `<stem>.txt` and
   `<stem>_item2attributes.json`.
2. Tabular form: a directory with `interactions.csv` or `.parquet` (user, item[, timestamp]
   [, weight]) and `item_scenarios.csv` or `.parquet` (item, scenario).
3. RecBole atomic files: a directory `<name>/` or a path stem `<name>` with `<name>.inter`
   and `<name>.item`.

Ids are strings in every form. A catalog item named by the scenario membership but never
interacted with is a cold item: it is in its pools and has no interaction.
"""

import hashlib
from pathlib import Path

from meta_training.errors import DataError
from meta_training.readers.build import InteractionData
from meta_training.readers.recbole import read_recbole, recbole_files
from meta_training.readers.sequence import read_sequence, sequence_files
from meta_training.readers.tabular import is_tabular, read_tabular, write_tabular

__all__ = [
    "InteractionData",
    "fingerprint_files",
    "load_dataset",
    "read_recbole",
    "read_sequence",
    "read_tabular",
    "write_tabular",
]


def load_dataset(path: Path) -> InteractionData:
    """Read any input form, telling them apart by what exists at `path`."""
    path = Path(path)
    if path.is_dir() and is_tabular(path):
        return read_tabular(path)
    if files := recbole_files(path):
        return read_recbole(*files)
    if path.is_dir():
        return read_tabular(path)  # names the missing interactions file
    if sequence_files(path)[0].is_file():
        return read_sequence(path)
    raise DataError(
        f"{path}: unknown data format: expected a directory with interactions.csv (or "
        ".parquet) and item_scenarios.csv (or .parquet), a RecBole dataset NAME with "
        "NAME.inter and NAME.item, or a path stem STEM with STEM.txt and "
        "STEM_item2attributes.json beside it"
    )


def fingerprint_files(paths: tuple[Path, ...]) -> str:
    """sha256 over the bytes of the input files, so a cache notices any edit."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()
