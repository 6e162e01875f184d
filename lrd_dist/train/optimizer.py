"""The run's optimizers and their learning-rate schedule, with dense or row-wise (sparse) id tables.

Dense updates (``train.embedding_updates=dense``, the official setting): one Adam over every
trainable weight. Its step, and the zeroed gradient before it, touch every row of the id tables
(users, items and attribute values) however few rows a batch looked up, so at a million items a
step is dominated by work that has nothing to do with the batch (docs/performance.md: KDA 38x
slower at 1M items than at 10k for the same batch).

Sparse updates (``train.embedding_updates=sparse``): the tables a model declares in ``id_tables``
(looked up by id only) produce row-wise gradients (``nn.Embedding(sparse=True)``) and take torch's
``SparseAdam`` (lazy Adam: a row's moments advance only when the row is looked up); every other
weight keeps Adam. A step then costs what its batch costs. What changes against dense Adam: rows
not in a batch keep their moments instead of decaying them, and the tables get no weight decay
(``SparseAdam`` has none). Across ranks DDP all-reduces the row-wise gradients as sparse tensors
(gloo; NCCL has no sparse all-reduce); ZeRO partitions dense gradients and refuses them, so the
trainer refuses this option under DeepSpeed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import partial
from typing import Any

import torch

from lrd_dist.config import RunConfig


def id_tables(model: torch.nn.Module) -> list[torch.nn.Embedding]:
    """The trainable tables the model declares as looked up by id only (``id_tables`` on a
    submodule: names of its ``nn.Embedding`` children), in module order."""
    tables = []
    for module in model.modules():
        for name in getattr(module, "id_tables", ()):
            table = getattr(module, name)
            if table.weight.requires_grad:
                tables.append(table)
    return tables


def build_optimizers(model: torch.nn.Module, config: RunConfig) -> list[torch.optim.Optimizer]:
    """Adam (weight decay on non-bias weights; a live encoder's weights at ``llm.lr``) and, with
    sparse updates, SparseAdam over the id tables, which it switches to row-wise gradients."""
    train = config.train
    sparse: list[torch.Tensor] = []
    if train.embedding_updates == "sparse":
        for table in id_tables(model):
            table.sparse = True
            sparse.append(table.weight)
    table_ids = {id(p) for p in sparse}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in table_ids]
    encoder = [p for n, p in trainable if n.startswith("item_text.")]
    rest = [(n, p) for n, p in trainable if not n.startswith("item_text.")]
    groups: list[dict[str, Any]] = [
        {"params": [p for n, p in rest if "bias" not in n], "weight_decay": train.weight_decay},
        {"params": [p for n, p in rest if "bias" in n]},
        {"params": encoder, "lr": config.llm.lr or train.lr},
    ]
    optimizers: list[torch.optim.Optimizer] = [
        torch.optim.Adam([{"weight_decay": 0.0, **g} for g in groups if g["params"]], lr=train.lr)
    ]
    if sparse:
        optimizers.append(torch.optim.SparseAdam(sparse, lr=train.lr))
    return optimizers


def schedule_factor(step: int, *, name: str, warmup_steps: int, total_steps: int) -> float:
    """The multiplier of ``train.lr`` after ``step`` optimizer steps: linear warmup from 0 over
    ``warmup_steps``, then constant, linear decay to 0 at ``total_steps``, or a half cosine to 0.

    The values of transformers' ``get_scheduler`` (constant_with_warmup, linear, cosine), computed here
    because importing ``transformers.optimization`` pulls in its trainer utilities, PEFT and dynamo:
    2-4 s at the start of every training process for three lines of arithmetic
    (tests/train/test_optimizer.py checks the two against each other)."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if name == "constant":
        return 1.0
    if name == "linear":
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


class Schedules:
    """One learning-rate schedule per optimizer, the same curve, stepped together at optimizer-step
    boundaries; their state is saved as JSON in the trainer state (a list, one per optimizer)."""

    def __init__(self, optimizers: Iterable[torch.optim.Optimizer], config: RunConfig, total_steps: int):
        train = config.train
        factor = partial(
            schedule_factor, name=train.schedule, warmup_steps=train.warmup_steps, total_steps=total_steps
        )
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(optimizer, factor) for optimizer in optimizers]

    def step(self) -> None:
        for scheduler in self.schedulers:
            scheduler.step()

    @property
    def lr(self) -> float:
        """The current learning rate of the first parameter group (train.lr's)."""
        return float(self.schedulers[0].get_last_lr()[0])

    def state_dict(self) -> list[dict]:
        return [scheduler.state_dict() for scheduler in self.schedulers]

    def load_state_dict(self, state: list[dict]) -> None:
        for scheduler, saved in zip(self.schedulers, state, strict=True):
            scheduler.load_state_dict(saved)
