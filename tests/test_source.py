"""Rules the source tree keeps: no function of src/adalora longer than a screen (60 lines, signature, docstring
and comments included; a longer one is split along its natural seams), and the README's layout names every
module and folder of the package, and nothing that is not there."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src" / "adalora"
MAX_LINES = 60


def long_functions(root: Path, limit: int) -> list[str]:
    """``path:line name (n lines)`` for every function or method under ``root`` longer than ``limit`` lines."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_is_longer_than_60_lines() -> None:
    assert long_functions(SOURCE, MAX_LINES) == []


def test_the_rule_sees_functions_and_methods(tmp_path: Path) -> None:
    def body(indent: str) -> str:
        return "\n".join(f"{indent}x{i} = {i}" for i in range(60))

    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text(
        f"def f():\n{body('    ')}\n\n\nclass C:\n    async def g(self):\n{body('        ')}\n"
    )
    assert long_functions(tmp_path / "pkg", MAX_LINES) == ["pkg/m.py:1 f (61 lines)", "pkg/m.py:65 g (61 lines)"]
    assert long_functions(tmp_path / "pkg", 61) == []


def readme_layout() -> str:
    """The package's part of the README's layout block: from ``src/adalora/`` to the first line that is not in it."""
    block = ROOT.joinpath("README.md").read_text().split("\nsrc/adalora/\n", 1)[1]
    return block.split("\ntests/", 1)[0]


def test_the_readme_layout_matches_the_package() -> None:
    named = set(re.findall(r"\b(\w+(?:\.py|/))", readme_layout()))
    top = {p.name + "/" for p in SOURCE.iterdir() if p.is_dir() and not p.name.startswith("__")}
    top |= {p.name for p in SOURCE.glob("*.py") if not p.name.startswith("__")}
    assert top - named == set(), "modules or folders of src/adalora the README's layout does not name"
    everything = {p.name for p in SOURCE.rglob("*.py")} | {p.name + "/" for p in SOURCE.rglob("*") if p.is_dir()}
    assert named - everything == set(), "names in the README's layout that are not in src/adalora"
