"""The README's Python snippets: each compiles, and its imports name what the package has."""

from __future__ import annotations

import ast
import builtins
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.DOTALL)


def test_every_python_snippet_imports_what_it_uses() -> None:
    snippets = python_snippets()
    assert snippets, "the README shows Python usage"
    for snippet in snippets:
        tree = ast.parse(snippet)
        imports = [node for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)]
        namespace: dict[str, object] = {}
        exec(compile(ast.Module(body=imports, type_ignores=[]), "README.md", "exec"), namespace)
        defined = set(namespace) | {
            target.id for node in ast.walk(tree) if isinstance(node, ast.Assign)
            for target in node.targets if isinstance(target, ast.Name)
        }
        used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}
        missing = sorted(used - defined - set(dir(builtins)))
        assert not missing, f"a README snippet uses {missing} without importing or defining them:\n{snippet}"
