"""Hooks into the trainer's loop, for code that is not the loop's business.

A callback is any object with some of the methods below; the trainer calls them with itself, so a
callback reads ``trainer.state`` (step, epoch, ...) and ``trainer.accelerator``. Every run has the
two below (the relation-collapse warning and, on data with planted relations, their recovery);
register others in code (``Trainer(config, callbacks=[...])``) or, for a run started from the
command line, by import path: ``train.callbacks=[package.module:factory]`` (a class or function
called with no arguments). The kill-and-resume tests inject their fault this way (``tests/faults.py``).
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Protocol

import numpy as np

from lrd_dist.errors import InputError
from lrd_dist.runtime import trim_heap

if TYPE_CHECKING:
    from lrd_dist.train.trainer import Trainer

log = logging.getLogger(__name__)


class Callback(Protocol):
    def on_step_end(self, trainer: Trainer) -> None:
        """After each optimizer step (``trainer.state.step`` counts it), before any checkpoint."""

    def on_log(self, trainer: Trainer, entry: dict) -> None:
        """After a ``metrics.jsonl`` line of training losses is written (main process only)."""

    def on_epoch_start(self, trainer: Trainer) -> None:
        """Before an epoch's first step."""

    def on_epoch_end(self, trainer: Trainer) -> None:
        """After an epoch's evaluation and checkpoint."""

    def on_finish(self, trainer: Trainer, results: dict) -> None:
        """With the best weights loaded and scored, before ``results.json`` is written (collective)."""


class CollapseWarning:
    """Warn, once per epoch, when one relation slot takes nearly every (history, target) pair: the
    official LRD objective collapses that way, and the 'latent relations' then carry no relation."""

    def __init__(self, share: float = 0.95) -> None:
        self.share = share
        self.warned = False

    def on_epoch_start(self, trainer: Trainer) -> None:
        self.warned = False

    def on_log(self, trainer: Trainer, entry: dict) -> None:
        usage = entry.get("lrd_usage")
        if self.warned or not usage or max(usage) <= self.share:
            return
        self.warned = True
        log.warning(
            "relation collapse: slot %d takes %.1f%% of the pairs (entropy %.3f)",
            int(np.argmax(usage)),
            100 * max(usage),
            entry["lrd_entropy"],
        )


class RelationAgreement:
    """On data with planted relations (``lrd-dist synth``, the demo), how well the best weights'
    relation encoder recovers them: NMI and purity over the training pairs, in results.json."""

    def on_finish(self, trainer: Trainer, results: dict) -> None:
        from lrd_dist.data.stream import make_loader
        from lrd_dist.encoders.item_text import read_catalog_once
        from lrd_dist.evaluation.relations import relation_agreement

        built = trainer.built
        if not built.config.lrd.enabled or "planted_relation" not in built.manifest.extra_fields:
            return
        with (
            trainer.backend.full_parameters(trainer.core, skip=trainer.forward_only),
            read_catalog_once(trainer.core.item_text),
        ):
            loader = make_loader(built.stream("train", shuffle=False))
            results["relation_discovery"] = relation_agreement(trainer.core, loader)


class KeepColdRows:
    """A cold-start split's held-out items read a zero ID row (item embedding and bias), as an item
    added after training does (``recommend --new-items``): no gradient reaches them, but weight
    decay would still move them, and a cold item's score must owe nothing to training. Zeroed at
    the start and restored after every optimizer step."""

    def __init__(self, model, cold, deepspeed: bool) -> None:
        import torch

        self.rows = torch.from_numpy(cold)
        self.tables: list = []
        if deepspeed:  # parameters are partitioned and updated from fp32 master copies there
            log.warning(
                "a cold-start split under DeepSpeed: cold ID rows are not held at their initial values"
            )
            return
        backbone = model.backbone
        names = ("entity_embeddings", "item_bias") if model.relational else ("item_embeddings",)
        for name in names:
            weight = getattr(backbone, name).weight
            with torch.no_grad():
                weight[self.rows] = 0.0
            self.tables.append((weight, weight.detach()[self.rows].clone()))

    def on_step_end(self, trainer: Trainer) -> None:
        import torch

        with torch.no_grad():
            for weight, initial in self.tables:
                weight[self.rows] = initial


class RefreshCatalogText:
    """A softmax over every item with a tuned text encoder: the catalog's language vectors are
    computed once every ``every`` optimizer steps (no gradient into them) and read as a table in
    between, so a step costs its batch, not the catalog. The history items still read the encoder
    live, so it trains. Each refresh is a ``metrics.jsonl`` line (``catalog_text_refreshed``); the
    table is at most ``every`` steps stale. A resumed run refreshes at once, so until its next
    refresh its table is fresher than the uninterrupted run's was."""

    def __init__(self, every: int) -> None:
        self.every = every

    def refresh(self, trainer: Trainer) -> None:
        core, state = trainer.core, trainer.state
        core.catalog_text = core.item_text.catalog_vectors().detach()
        trainer.metrics.record(
            {"step": state.step, "epoch": state.epoch, "catalog_text_refreshed": state.step}
        )

    def on_epoch_start(self, trainer: Trainer) -> None:
        if trainer.core.catalog_text is None:
            self.refresh(trainer)

    def on_step_end(self, trainer: Trainer) -> None:
        if trainer.state.step % self.every == 0:
            self.refresh(trainer)


class TrimHeap:
    """Give the heap's free pages back to the system every ``every`` optimizer steps (see
    ``lrd_dist.runtime.trim_heap_steps`` for why and what it costs)."""

    def __init__(self, every: int) -> None:
        self.every = every

    def on_step_end(self, trainer: Trainer) -> None:
        if trainer.state.step % self.every == 0:
            trim_heap()


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


def call(callbacks: list[object], event: str, trainer: Trainer, *args: object) -> None:
    for callback in callbacks:
        hook = getattr(callback, event, None)
        if hook is not None:
            hook(trainer, *args)
