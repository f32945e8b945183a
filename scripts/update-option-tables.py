"""Rewrite the option tables of the docs from the declarations in mirror/ops/options.py.

Run after adding or changing an option: ``.venv/bin/python scripts/update-option-tables.py``.
A table is the text between ``<!-- options:NAME -->`` and ``<!-- /options:NAME -->`` in README.md
or a file of docs/ (NAME: ``shared``, or a command). tests/test_options.py fails while a table
and the declarations differ.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mirror.ops.options import markdown_table  # noqa: E402

BLOCK = re.compile(r"(<!-- options:([\w-]+) -->\n)(?:.*?\n)?(<!-- /options:\2 -->)", re.DOTALL)


def main() -> None:
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = page.read_text()
        updated = BLOCK.sub(
            lambda m: m.group(1) + markdown_table(m.group(2)) + "\n" + m.group(3), text
        )
        if updated != text:
            page.write_text(updated)
            print(f"{page.relative_to(ROOT)} updated")


if __name__ == "__main__":
    main()
