"""The package's layers hold: nothing imports upward or in a circle, and one exporter, one checker, one card reader.

    _quiet_import -> config -> io -> datasets -> models -> inference -> scaling -> training -> export
    -> nas | cohort -> serve | pacs -> cli

Every ``import`` counts, also those inside functions (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ctzoo"
#: Each top-level part of ctzoo and its layer; a module may import its own part and lower layers only.
LAYERS = {"_quiet_import": -1, "__init__": 0, "config": 0, "perf": 1, "io": 1, "datasets": 2, "models": 3,
          "inference": 4, "scaling": 5, "training": 6, "export": 7, "nas": 8, "cohort": 8, "smap": 8, "serve": 9,
          "pacs": 9, "cli": 10, "__main__": 11}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """``{module: {ctzoo modules it imports}}``; ``from a import b`` counts ``a.b`` when b is a module."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    found: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names
                                           if f"{node.module}.{a.name}" in modules]
            else:
                continue
            found[name] |= {t for t in targets if t.split(".")[0] == "ctzoo" and t in modules and t != name}
    return found


def part(module: str) -> str:
    return module.split(".")[1] if "." in module else "__init__"


def test_every_part_of_the_package_has_a_layer():
    assert {part(m) for m in imports()} <= set(LAYERS)


def test_nothing_imports_a_higher_layer_or_a_sibling():
    wrong = sorted(f"{module} -> {target}" for module, targets in imports().items() for target in targets
                   if part(target) != part(module) and LAYERS[part(target)] >= LAYERS[part(module)]
                   and part(target) != "__init__")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_no_import_circles():
    graph = imports()
    circles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                circles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, [*path, target])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, "import circles:\n" + "\n".join(circles)


@pytest.mark.parametrize(("needle", "only_in"), [
    ("torch.onnx.export(", "export/graphs.py"),  # one exporter
    ("ort.InferenceSession(", None),  # checked below: the parity checker is the only one in export/
    ("ModelCard.model_validate_json(", "models/bundle.py"),  # one card reader
    ("safetensors.torch.load", None),  # load_file( or load( of bytes already hashed
])
def test_one_exporter_one_checker_one_card_reader(needle, only_in):
    files = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if needle in p.read_text("utf-8"))
    if only_in is not None:
        assert files == [only_in], f"{needle} appears in {files}"
    elif needle.startswith("ort."):
        assert [f for f in files if f.startswith("export/")] == ["export/parity.py"]
    else:  # weights are read by the bundle (also for create_model), template banks by the bank, nowhere else
        assert files == ["models/bundle.py", "models/template_bank.py"], files
