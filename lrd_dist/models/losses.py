"""Ranking losses shared by the recommenders and the KG term."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bpr(positive: torch.Tensor, negative: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """-log sigmoid(positive - negative), averaged with optional row weights (loader padding = 0)."""
    losses = -F.logsigmoid(positive - negative)
    if weight is None:
        return losses.mean()
    weight = weight.to(losses.dtype)
    return (losses * weight).sum() / weight.sum().clamp(min=1)


def softmax_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy of [B, C] logits against the column ``target`` [B], averaged with optional
    row weights (loader padding = 0)."""
    losses = F.cross_entropy(logits.float(), target, reduction="none")
    if weight is None:
        return losses.mean()
    weight = weight.to(losses.dtype)
    return (losses * weight).sum() / weight.sum().clamp(min=1)


def distmult(head: torch.Tensor, relation: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
    """sum_d h_d r_d t_d, the KG score (with an attribute value entity added to r by the caller)."""
    return (head * relation * tail).sum(-1)
