"""Offered load = original sends + retries is spelled in one place, record.counters.offered_parts:
models, gates, the run's status line, the report and the CLI take the counter names from there."""

from __future__ import annotations

import ast
from pathlib import Path

from loadkit.record.counters import offered_parts

PACKAGE = Path(__file__).resolve().parents[1] / "loadkit"
#: the stages that read what was offered (generate/ counts it, record/ stores it)
READERS = ("model", "run", "report", "plugin", "cli")


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def test_the_retry_counter_is_named_only_by_offered_parts() -> None:
    retry = offered_parts("dns")[1]
    found = []
    for stage in READERS:
        for path in sorted((PACKAGE / stage).rglob("*.py")):
            tree = ast.parse(path.read_text())
            skip = _docstrings(tree)
            for node in ast.walk(tree):
                if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip
                        and retry in node.value):
                    found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert found == []
    assert offered_parts("dns") == ("dns.original_sent", "dns.retry_sent")
