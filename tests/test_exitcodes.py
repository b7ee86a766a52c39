"""One table of exit statuses (``shards.exitcodes``): no other module defines its own, and the README's
"When things go wrong" lists the table as it is and names no status outside it."""

from __future__ import annotations

import re
from pathlib import Path

from shards import exitcodes

ROOT = Path(__file__).resolve().parents[1]


def when_things_go_wrong() -> str:
    section = (ROOT / "README.md").read_text().split("\n## When things go wrong\n", 1)[1]
    return section.split("\n## ", 1)[0]


def test_the_readme_lists_the_table_as_it_is():
    names = {value: name for name, value in vars(exitcodes).items() if name.startswith("EXIT_")}
    rows = re.findall(r"^\| (\d+) \| `(\w+)` \| (.+) \|$", when_things_go_wrong(), re.MULTILINE)
    assert [(int(code), name, meaning) for code, name, meaning in rows] == [
        (code, names[code], meaning) for code, meaning in exitcodes.MEANINGS.items()]


def test_every_status_the_readme_names_is_in_the_table():
    named = {int(code) for code in re.findall(r"\bexits? (\d+)\b", when_things_go_wrong())}
    assert named >= {1, 3, 42, 44, 45}
    assert named <= set(exitcodes.MEANINGS)


def test_no_other_module_defines_an_exit_status():
    defined = [f"{path.relative_to(ROOT)}: {line.strip()}"
               for package in ("shards", "lenstrain", "launcher") for path in (ROOT / package).rglob("*.py")
               if path != ROOT / "shards" / "exitcodes.py"
               for line in path.read_text().splitlines() if re.match(r"\s*EXIT_\w+\s*(:\s*\w+\s*)?=", line)]
    assert defined == []
