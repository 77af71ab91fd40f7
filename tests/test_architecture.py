"""The dependency rules of docs/ARCHITECTURE.md, checked against every module's imports.

The rules are read from the document's "Dependency rules" table, so the document and this test
cannot drift apart; the test also insists that the rules the design depends on are in the table.
Imports are read with :mod:`ast` (also those inside functions), nothing is imported.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "loadkit"
ARCHITECTURE = REPO / "docs" / "ARCHITECTURE.md"

#: rules the layout relies on: (code under, a name it must never import); the table may hold more
REQUIRED_RULES = {
    ("loadkit/record/", "loadkit.model"), ("loadkit/record/", "loadkit.report"),
    ("loadkit/record/", "loadkit.run"), ("loadkit/record/", "loadkit.plugin"), ("loadkit/record/", "locust"),
    ("loadkit/observe/", "locust"), ("loadkit/observe/", "loadkit.generate"),
    ("loadkit/observe/", "loadkit.record"),
    ("loadkit/model/", "locust"), ("loadkit/model/", "loadkit.lab"), ("loadkit/model/", "loadkit.report"),
    ("loadkit/generate/", "loadkit.lab"), ("loadkit/plugin/", "loadkit.lab"),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_names(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """``(line, dotted name)`` of every import in ``source``, relative imports resolved."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # `from loadkit import model` imports loadkit.model: count the names too
            names += [(node.lineno, stem)] + [(node.lineno, f"{stem}.{a.name}") for a in node.names]
    return names


def _under_main_guard(tree: ast.Module) -> set[int]:
    """Lines inside ``if __name__ == "__main__":`` blocks (a module's thin entry point)."""
    lines: set[int] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "__name__" in ast.unparse(node.test) and "__main__" in ast.unparse(node.test):
            lines.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    return lines


def command_line_uses(source: str) -> list[tuple[int, str]]:
    """``(line, what)`` for each use of argparse or sys.argv outside a ``__main__`` guard."""
    tree = ast.parse(source)
    guarded = _under_main_guard(tree)
    uses = []
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if line in guarded:
            continue
        if isinstance(node, ast.Import) and any(a.name == "argparse" for a in node.names):
            uses.append((line, "import argparse"))
        elif isinstance(node, ast.ImportFrom) and node.module == "argparse":
            uses.append((line, "from argparse import"))
        elif isinstance(node, ast.Attribute) and node.attr == "argv" and ast.unparse(node.value) == "sys":
            uses.append((line, "sys.argv"))
        elif isinstance(node, ast.ImportFrom) and node.module == "sys" and any(a.name == "argv" for a in node.names):
            uses.append((line, "from sys import argv"))
    return uses


def forbids(name: str, banned: str) -> bool:
    return name == banned or name.startswith(banned + ".")


def read_rules(text: str) -> dict[str, list[str]]:
    """``{"loadkit/record/": ["loadkit.model", ...]}`` from the "Dependency rules" table: the
    backticked names of a row's second cell (words without backticks are commentary)."""
    section = text.split("## Dependency rules", 1)[1].split("\n## ", 1)[0]
    rules: dict[str, list[str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0].startswith("`loadkit/"):
            continue
        for where in re.findall(r"`([^`]+)`", cells[0]):
            rules.setdefault(where, []).extend(re.findall(r"`([^`]+)`", cells[1]))
    return rules


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


# -- the checker itself can fail ----------------------------------------------------------------------


def test_the_checker_sees_relative_lazy_and_from_imports() -> None:
    source = (
        "from ..model import headroom\n"
        "def f():\n"
        "    import locust.runners\n"
        "    from loadkit import report\n"
    )
    names = [n for _, n in imported_names(source, "loadkit.record.gates")]
    assert "loadkit.model.headroom" in names and "locust.runners" in names and "loadkit.report" in names
    assert any(forbids(n, "loadkit.model") for n in names)
    assert not forbids("loadkit.modelling", "loadkit.model")


def test_the_checker_sees_the_command_line_outside_a_main_guard() -> None:
    source = (
        "import argparse\nimport sys\n"
        "def main():\n    return sys.argv[1:]\n"
        "if __name__ == '__main__':\n    sys.exit(main(sys.argv[1:]))\n"
    )
    assert [what for _, what in command_line_uses(source)] == ["import argparse", "sys.argv"]


# -- the rules, on the package as it is ---------------------------------------------------------------


def test_the_document_states_the_rules_the_layout_relies_on() -> None:
    rules = read_rules(ARCHITECTURE.read_text())
    stated = {(where, banned) for where, names in rules.items() for banned in names}
    assert REQUIRED_RULES <= stated, sorted(REQUIRED_RULES - stated)


def test_every_module_keeps_the_dependency_rules() -> None:
    rules = read_rules(ARCHITECTURE.read_text())
    broken = []
    for path in modules():
        rel = path.relative_to(REPO).as_posix()
        banned = [b for where, names in rules.items() if rel.startswith(where) for b in names]
        if not banned:
            continue
        source = path.read_text()
        entry_point = _under_main_guard(ast.parse(source))  # `python -m` hands over to the CLI
        for line, name in imported_names(source, module_name(path), path.name == "__init__.py"):
            if line in entry_point:
                continue
            broken += [f"{rel}:{line} imports {name} ({b} is not allowed here)" for b in banned if forbids(name, b)]
    assert not broken, "\n".join(broken)


def test_only_the_cli_knows_the_command_line() -> None:
    broken = []
    for path in modules():
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith("loadkit/cli/") or path.name == "__main__.py":
            continue
        broken += [f"{rel}:{line} {what}" for line, what in command_line_uses(path.read_text())]
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("path", ["loadkit/record/", "loadkit/observe/", "loadkit/model/"])
def test_each_stage_has_modules_to_check(path: str) -> None:
    # a rule over an empty folder would pass for nothing
    assert list((REPO / path).glob("*.py"))
