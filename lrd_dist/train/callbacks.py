"""Hooks into the trainer's loop, for code that is not the trainer's business.

A callback is any object with some of the methods below; the trainer calls them with itself, so a
callback reads ``trainer.state`` (step, epoch, ...) and ``trainer.backend.accelerator``. Register
them in code (``Trainer(config, callbacks=[...])``) or, for a run started from the command line,
by import path: ``train.callbacks=[package.module:factory]`` (a class or function called with no
arguments). The kill-and-resume tests inject their fault this way (``tests/faults.py``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Protocol

from lrd_dist.errors import InputError

if TYPE_CHECKING:
    from lrd_dist.train.trainer import Trainer


class Callback(Protocol):
    def on_step_end(self, trainer: Trainer) -> None:
        """After each optimizer step (``trainer.state.step`` counts it), before any checkpoint."""

    def on_epoch_end(self, trainer: Trainer) -> None:
        """After an epoch's evaluation and checkpoint."""


def load_callbacks(paths: list[str]) -> list[object]:
    loaded = []
    for path in paths:
        module, _, name = path.partition(":")
        try:
            factory = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError) as exc:
            raise InputError(
                "train.callbacks", f"cannot import {path!r} ({exc})", "use 'package.module:name' on the path"
            ) from exc
        loaded.append(factory())
    return loaded


def call(callbacks: list[object], event: str, trainer: Trainer) -> None:
    for callback in callbacks:
        hook = getattr(callback, event, None)
        if hook is not None:
            hook(trainer)
