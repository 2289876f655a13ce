"""MkDocs hook: replace the marker on configuration.md with the table of the service's
settings, built from `service.settings.Settings`, so the page cannot drift from the code."""

import json
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from pydantic.fields import FieldInfo

from service.settings import Settings

MARKER = "<!-- settings-table -->"
PAGE = "configuration.md"
ENV_PREFIX = str(Settings.model_config.get("env_prefix", ""))


def env_name(name: str) -> str:
    return f"{ENV_PREFIX}{name}".upper()


def type_name(annotation: Any) -> str:
    """A reader's name for a field's type: `str`, `int`, one of a Literal's values, ...;
    an optional type reads as the type, its default says `unset`."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " or ".join(f"`{value}`" for value in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(arg) for arg in args if arg is not type(None))
    if origin is list:
        return f"JSON list of {type_name(args[0])}"
    if annotation is SecretStr:
        return "secret str"
    if annotation is Path:
        return "path"
    return getattr(annotation, "__name__", str(annotation))


def constraints(field: FieldInfo) -> str:
    """The field's numeric bounds and pattern, e.g. `>= 1`."""
    parts = []
    for item in field.metadata:
        for attribute, symbol in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(item, attribute, None) is not None:
                parts.append(f"{symbol} {getattr(item, attribute)}")
        if getattr(item, "pattern", None) is not None:
            parts.append(f"matches `{item.pattern}`")
    return ", ".join(parts)


def default_text(field: FieldInfo) -> str:
    default = field.get_default(call_default_factory=True)
    if default is None:
        return "unset"
    if isinstance(default, list):
        return f"`{json.dumps(default)}`"
    if isinstance(default, bool):
        return f"`{str(default).lower()}`"
    return f"`{default}`"


def settings_table() -> str:
    rows = [
        "| environment variable | type | default | description |",
        "|---|---|---|---|",
    ]
    for name, field in Settings.model_fields.items():
        kind = type_name(field.annotation)
        bounds = constraints(field)
        if bounds:
            kind = f"{kind}, {bounds}"
        cells = [f"`{env_name(name)}`", kind, default_text(field), field.description or ""]
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows)


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise ValueError(f"docs/{PAGE} lost its {MARKER} marker")
    return markdown.replace(MARKER, settings_table())
