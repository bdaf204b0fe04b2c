"""Every third-party module that ``ctzoo`` imports is a declared dependency of the install users make.

The suite itself runs with the ``[test]`` extra installed, so a module that only a test extra brings (``httpx``
once was) would pass every other test and still crash ``ctzoo pacs check`` in a plain install. This test reads
the imports of every ``ctzoo`` source file and the dependencies in ``pyproject.toml``; CI also imports every
module in the main job's own environment (``tests/smoke_install.py``).
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]
#: Extras of which a working install always has one (ONNX Runtime for the CPU or the GPU).
REQUIRED_EXTRAS = ("cpu",)
#: Extras a user adds for one feature; their modules may only be imported inside functions.
FEATURE_EXTRAS = ("ray",)


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    return _normalise(re.split(r"[\s\[<>=!~;]", requirement.strip(), maxsplit=1)[0])


def _declared() -> tuple[set[str], set[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project.get("optional-dependencies", {})
    required = {_requirement_name(r) for r in project["dependencies"]}
    required |= {_requirement_name(r) for extra in REQUIRED_EXTRAS for r in extras[extra]}
    optional = {_requirement_name(r) for extra in FEATURE_EXTRAS for r in extras[extra]}
    return required, optional


def _imports(path: Path) -> list[tuple[str, bool, int]]:
    """(top-level module, imported at module level?, line) for every absolute import in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    function_lines = {n.lineno for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                      for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(name.split(".")[0], node.lineno not in function_lines, node.lineno) for name in names]
    return found


def test_every_imported_module_is_a_declared_dependency():
    required, optional = _declared()
    distributions = importlib.metadata.packages_distributions()
    problems = []
    for path in sorted((ROOT / "ctzoo").rglob("*.py")):
        for module, top_level, line in _imports(path):
            if module in sys.stdlib_module_names or module in ("ctzoo", "__future__"):
                continue
            where = f"{path.relative_to(ROOT)}:{line} imports {module}"
            names = {_normalise(d) for d in distributions.get(module, [])}
            if not names:
                problems.append(f"{where}, which no installed distribution provides")
            elif names & required:
                continue
            elif names & optional:
                if top_level:
                    problems.append(f"{where} at module level, but it comes from an optional extra "
                                    f"({', '.join(sorted(names))}): import it inside the function that needs it")
            else:
                problems.append(f"{where} from {', '.join(sorted(names))}, which pyproject.toml does not declare")
    assert not problems, "\n".join(problems)
