"""The docs: the configuration page is generated from the settings' descriptions, the README
stays a front door, and mkdocs.yml lists every page."""

import importlib.util
from pathlib import Path

import pytest
import yaml

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def load_hook():
    spec = importlib.util.spec_from_file_location(
        "settings_table", DOCS / "hooks" / "settings_table.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", list(Settings.model_fields))
def test_every_setting_is_described_in_the_generated_table(name):
    field = Settings.model_fields[name]
    assert field.description, f"Settings.{name} has no description="
    table = load_hook().settings_table().splitlines()
    rows = {line.split(" | ")[0].strip("| `"): line for line in table}
    row = rows.get(f"S2META_{name.upper()}")
    assert row is not None, f"S2META_{name.upper()} missing from the configuration table"
    assert field.description.replace("|", "\\|") in row


def test_configuration_page_carries_the_marker_and_the_hook_is_registered():
    hook = load_hook()
    assert hook.MARKER in (DOCS / hook.PAGE).read_text()
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert "docs/hooks/settings_table.py" in config["hooks"]
    page = type("Page", (), {"file": type("File", (), {"src_uri": hook.PAGE})()})()
    rendered = hook.on_page_markdown(f"# x\n\n{hook.MARKER}\n", page=page)
    assert hook.MARKER not in rendered
    assert "S2META_REGISTRY" in rendered


def test_nav_lists_every_page():
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    listed = {page for entry in nav for page in entry.values()}
    assert listed == {path.name for path in DOCS.glob("*.md")}


def test_readme_is_a_front_door():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert "bash scripts/main.sh" in readme
    assert "bash scripts/test.sh" in readme
