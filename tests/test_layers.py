"""The package follows the data's path, and no import runs back up it:

    data -> encoders -> models -> runtime -> evaluation -> train -> serving -> commands / cli

A module imports only from its own layer or a lower one (``errors`` and ``config`` sit below
everything), so inference loads without the training package and models know nothing of the loop."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.integration.launch import REPO

PACKAGE = REPO / "lrd_dist"
# layer -> the modules (dotted prefixes) it holds, lowest first
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("lrd_dist.errors", "lrd_dist.config")),
    ("data", ("lrd_dist.data",)),
    ("encoders", ("lrd_dist.encoders",)),
    ("models", ("lrd_dist.models", "lrd_dist.assembly")),
    ("runtime", ("lrd_dist.runtime", "lrd_dist.run_dir")),
    ("evaluation", ("lrd_dist.evaluation",)),
    ("train", ("lrd_dist.train",)),
    ("serving", ("lrd_dist.serving",)),
    ("commands", ("lrd_dist.commands", "lrd_dist.cli")),
]


def _layer(module: str) -> int:
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every lrd_dist import, at the top or inside a function; the imports that
    only a type checker reads (``if TYPE_CHECKING:``) do not load anything and are left out."""
    tree = ast.parse(path.read_text())
    type_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_only.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    found = []
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lrd_dist"):
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("lrd_dist")]
    return found


def test_every_module_is_in_a_layer() -> None:
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        if name != "lrd_dist":
            _layer(name)


def test_no_import_runs_back_up_the_layers() -> None:
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        if name == "lrd_dist":
            continue
        for line, imported in _imports(path):
            if imported != "lrd_dist" and _layer(imported) > _layer(name):
                upward.append(
                    f"{path.relative_to(REPO)}:{line}: {name} ({LAYERS[_layer(name)][0]}) imports "
                    f"{imported} ({LAYERS[_layer(imported)][0]})"
                )
    assert not upward, "\n".join(upward)


def test_the_layer_check_sees_an_upward_import(tmp_path: Path) -> None:
    """The walk itself: an import inside a function counts, one under TYPE_CHECKING does not."""
    module = tmp_path / "probe.py"
    module.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from lrd_dist.train.trainer import Trainer\n"
        "def f():\n    from lrd_dist.serving.topk import top_k\n"
    )
    assert _imports(module) == [(5, "lrd_dist.serving.topk")]
