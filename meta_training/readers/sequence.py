"""The sequence form (the shared data): a path stem with `<stem>.txt` (`user item item ...`
per line, items in time order) and `<stem>_item2attributes.json` (`{"item": [attr, ...]}`),
each attribute a scenario."""

import json
from pathlib import Path

import numpy as np

from meta_training.errors import DataError
from meta_training.readers.build import InteractionData, build_interactions
from meta_training.readers.text import NUL_IN_ID, decoding


def sequence_files(stem: Path) -> tuple[Path, Path]:
    return stem.parent / f"{stem.name}.txt", stem.parent / f"{stem.name}_item2attributes.json"


def read_sequence(stem: Path) -> InteractionData:
    stem = Path(stem)
    sequence_file, attribute_file = sequence_files(stem)
    for required in (sequence_file, attribute_file):
        if not required.is_file():
            raise DataError(f"{required}: file not found (sequence form needs both files)")

    users: list[str] = []
    items: list[str] = []
    times: list[float] = []
    line_of_user: dict[str, int] = {}
    with decoding(sequence_file), sequence_file.open(encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            tokens = line.split()
            if not tokens:
                continue
            if "\0" in line:
                raise DataError(f"{sequence_file}:{line_number}: {NUL_IN_ID}")
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
            users.extend([user] * (len(tokens) - 1))
            items.extend(tokens[1:])
            times.extend(range(len(tokens) - 1))  # the position in the line is the time

    try:
        with decoding(attribute_file):
            attributes = json.loads(attribute_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(f"{attribute_file}:{error.lineno}: not valid JSON ({error.msg})") from error
    if not isinstance(attributes, dict):
        raise DataError(f"{attribute_file}: expected an object {{item: [attribute, ...]}}")
    memberships: list[tuple[str, str]] = []
    for item, item_attributes in attributes.items():
        if "\0" in item:
            raise DataError(f"{attribute_file}: item {item!r}: {NUL_IN_ID}")
        if not isinstance(item_attributes, list):
            raise DataError(
                f"{attribute_file}: item {item!r}: expected a list of attributes, "
                f"got {type(item_attributes).__name__}"
            )
        memberships.extend((item, str(attribute)) for attribute in item_attributes)
    return build_interactions(
        stem.name,
        users,
        items,
        np.asarray(times, dtype=np.float64),
        None,
        memberships,
        (sequence_file, attribute_file),
    )
