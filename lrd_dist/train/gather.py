"""Whole parameters outside the training forward, whatever the backend."""

from __future__ import annotations

import contextlib

import torch


def full_parameters(
    module: torch.nn.Module,
    deepspeed: bool,
    modify: bool = False,
    trainable_only: bool = False,
    skip: torch.nn.Module | None = None,
):
    """Whole parameters on every rank for code outside the training forward (evaluation, saving):
    under ZeRO-3 each rank holds only a shard of each parameter. Collective. ``skip``: a submodule
    that is only ever called through its forward (the live LLM encoder), whose ZeRO-3 hooks fetch
    its weights themselves; gathering it as well would hold a whole LLM on every rank and collide
    with those hooks' prefetching."""
    if deepspeed:
        import deepspeed as ds

        skipped = {id(p) for p in skip.parameters()} if skip is not None else set()
        parameters = [
            p for p in module.parameters() if (p.requires_grad or not trainable_only) and id(p) not in skipped
        ]
        if any(hasattr(p, "ds_id") for p in parameters):
            return ds.zero.GatheredParameters(parameters, modifier_rank=0 if modify else None)
    return contextlib.nullcontext()
