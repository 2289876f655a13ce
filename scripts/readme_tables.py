"""Copy the result tables into docs/results.md between the markers that name them, e.g.
<!-- tables:results --> ... <!-- /tables:results --> takes results/<dataset>/results.md and
<!-- tables:results/quick --> takes results/quick/<dataset>/results.md.
Run: python scripts/readme_tables.py"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ("Beauty", "Sports_and_Outdoors", "LastFM")
BLOCK = re.compile(r"(<!-- tables:(?P<dir>[\w/]+) -->\n)(.*?)(<!-- /tables:(?P=dir) -->)", re.S)


def tables(directory: str) -> str:
    parts = []
    for dataset in DATASETS:
        path = ROOT / directory / dataset / "results.md"
        if path.is_file():
            parts.append(path.read_text().replace("### ", "#### ", 1))
    return "\n".join(parts)


def main() -> None:
    page = ROOT / "docs" / "results.md"
    text = BLOCK.sub(lambda m: m.group(1) + tables(m.group("dir")) + m.group(4), page.read_text())
    page.write_text(text)


if __name__ == "__main__":
    main()
