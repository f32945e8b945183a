"""Rewrite the README's option tables from the declarations in mirror/options.py.

Run after adding or changing an option: ``.venv/bin/python scripts/update-readme-options.py``.
tests/test_options.py fails while the README and the declarations differ.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mirror.options import markdown_table  # noqa: E402

BLOCK = re.compile(r"(<!-- options:(\w+) -->\n)(?:.*?\n)?(<!-- /options:\2 -->)", re.DOTALL)


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    updated = BLOCK.sub(lambda m: m.group(1) + markdown_table(m.group(2)) + "\n" + m.group(3), text)
    readme.write_text(updated)
    print("README.md updated" if updated != text else "README.md already up to date")


if __name__ == "__main__":
    main()
