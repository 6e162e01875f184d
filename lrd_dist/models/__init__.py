"""Recommenders (RCF, KDA, SASRec) and LRD, as plain modules: no devices, processes or files.
``lrd_dist.assembly.build_model`` assembles them from a config."""

from __future__ import annotations

import torch
from torch import nn


def frozen_parameter_names(model: nn.Module) -> set[str]:
    """Weights that never train (a LoRA-wrapped encoder's base): rebuilt from the model path, so
    saved weight files leave them out."""
    return {name for name, parameter in model.named_parameters() if not parameter.requires_grad}


def weights_to_save(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    frozen = frozen_parameter_names(model)
    return {k: v for k, v in state.items() if k not in frozen}


def load_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> list[str]:
    """Load a weight file into ``model``; only frozen weights may be absent. Returns what does not
    fit (empty when it loaded). A tensor of another shape (weights trained on another catalog or
    user set) is reported rather than raised, so the caller can name the file and the data."""
    own = model.state_dict()
    shapes = [
        f"{name} is {list(tensor.shape)} in the file, {list(own[name].shape)} in the model"
        for name, tensor in weights.items()
        if name in own and own[name].shape != tensor.shape
    ]
    if shapes:
        return shapes[:3]
    missing, unexpected = model.load_state_dict(weights, strict=False)
    frozen = frozen_parameter_names(model)
    missing = [k for k in missing if k not in frozen]
    return [f"missing {k}" for k in missing[:3]] + [f"unexpected {k}" for k in unexpected[:3]]
