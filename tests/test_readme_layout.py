"""The README's layout table names every top-level module of p2pfl/ and sim/, so a reader
finds each file from it (and a new module without a row fails here)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def layout_section() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]


def named(section: str) -> set[str]:
    """Every `name` or `path/name.py` in backticks, as a bare module name."""
    names: set[str] = set()
    for token in re.findall(r"`([^`]+)`", section):
        for part in re.split(r"[/, ]+", token):
            names.add(part.removesuffix(".py"))
    return names


def test_every_top_level_module_has_a_row() -> None:
    names = named(layout_section())
    missing = [
        f"{package}/{path.name}"
        for package in ("p2pfl", "sim")
        for path in sorted((ROOT / package).glob("*.py"))
        if path.stem != "__init__" and path.stem not in names
    ]
    assert not missing, f"README layout table does not name: {missing}"


def test_every_package_and_top_level_directory_has_a_row() -> None:
    section = layout_section()
    packages = [
        f"{path.relative_to(ROOT)}/"
        for path in sorted((ROOT / "p2pfl").iterdir())
        if (path / "__init__.py").exists()
    ]
    tops = ["topologies/", "sim/", "bench/", "docs/", "examples/"]
    missing = [entry for entry in (*packages, *tops) if f"`{entry}" not in section]
    assert not missing, f"README layout table has no row for: {missing}"
