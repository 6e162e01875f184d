"""Whole parameters outside the training forward, whatever the backend."""

from __future__ import annotations

import contextlib

import torch


def full_parameters(
    module: torch.nn.Module, deepspeed: bool, modify: bool = False, trainable_only: bool = False
):
    """Whole parameters on every rank for code outside the training forward (evaluation, saving):
    under ZeRO-3 each rank holds only a shard of each parameter. Collective."""
    if deepspeed:
        import deepspeed as ds

        parameters = [p for p in module.parameters() if p.requires_grad or not trainable_only]
        if any(hasattr(p, "ds_id") for p in parameters):
            return ds.zero.GatheredParameters(parameters, modifier_rank=0 if modify else None)
    return contextlib.nullcontext()
