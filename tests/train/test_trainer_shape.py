"""The trainer stays readable: its state is declared where it is built, and the loop is short.
(Its behaviour is pinned elsewhere: tests/train/test_pinned_losses.py and the resume tests.)"""

from __future__ import annotations

import ast
import inspect

from lrd_dist.train import trainer


def _assigned(function: ast.FunctionDef) -> set[str]:
    return {
        target.attr
        for node in ast.walk(function)
        if isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign)
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        for target in (target.elts if isinstance(target, ast.Tuple) else [target])
        if isinstance(target, ast.Attribute) and ast.unparse(target.value) == "self"
    }


def test_the_trainer_creates_its_attributes_in_init_and_setup_only() -> None:
    tree = ast.parse(inspect.getsource(trainer.Trainer))
    methods = {node.name: node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    declared = _assigned(methods["__init__"]) | _assigned(methods["setup"])
    for name, method in methods.items():
        created = _assigned(method) - declared
        assert not created, f"Trainer.{name} creates {sorted(created)}: declare them in __init__ or setup"


def test_the_training_entry_points_stay_short() -> None:
    assert len(inspect.getsource(trainer.train).splitlines()) <= 40
    assert len(inspect.getsource(trainer.Trainer.train).splitlines()) <= 40
