"""How well discovered relations match planted ones (synthetic data): NMI and purity.

For each sample whose target was generated from a history item by a planted relation, the
discovered relation is the argmax of q(r | source item, target).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from lrd_dist.models.recommender import Recommender


def contingency(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    _, p = np.unique(predicted, return_inverse=True)
    _, t = np.unique(truth, return_inverse=True)
    table = np.zeros((p.max(initial=-1) + 1, t.max(initial=-1) + 1))
    np.add.at(table, (p, t), 1)
    return table


def nmi(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Normalised mutual information, arithmetic-mean normalisation (sklearn's default)."""
    table = contingency(predicted, truth)
    total = table.sum()
    if total == 0:
        return 0.0
    joint = table / total
    p, t = joint.sum(1), joint.sum(0)
    nonzero = joint > 0
    mutual = (joint[nonzero] * np.log(joint[nonzero] / np.outer(p, t)[nonzero])).sum()
    entropy_p = -(p[p > 0] * np.log(p[p > 0])).sum()
    entropy_t = -(t[t > 0] * np.log(t[t > 0])).sum()
    if entropy_p == 0 and entropy_t == 0:
        return 1.0
    return float(mutual / ((entropy_p + entropy_t) / 2)) if entropy_p + entropy_t > 0 else 0.0


def purity(predicted: np.ndarray, truth: np.ndarray) -> float:
    table = contingency(predicted, truth)
    return float(table.max(1).sum() / table.sum()) if table.sum() else 0.0


@torch.inference_mode()
def relation_agreement(
    model: Recommender, batches: Iterable[dict[str, torch.Tensor]]
) -> dict[str, float | list[int]]:
    predicted, truth, width = [], [], 0
    for batch in batches:
        offset, relation = batch["planted_offset"], batch["planted_relation"]
        length = batch["history_length"]
        keep = batch["valid"] & (relation > 0) & (offset >= 1) & (offset <= length)
        source = batch["history_items"][keep].gather(1, (length[keep] - offset[keep])[:, None])[:, 0]
        # called on every batch, even with no pair: a live encoder under ZeRO-3 must keep step
        q = model.relation_distribution(source, batch["target"][keep])
        if not keep.any():
            continue
        predicted.append(q.argmax(-1).cpu().numpy())
        width = q.shape[-1]
        truth.append(relation[keep].cpu().numpy())
    predicted_all = np.concatenate(predicted) if predicted else np.zeros(0, int)
    truth_all = np.concatenate(truth) if truth else np.zeros(0, int)
    return {
        "pairs": len(truth_all),
        "nmi": nmi(predicted_all, truth_all),
        "purity": purity(predicted_all, truth_all),
        "usage": np.bincount(predicted_all, minlength=width).tolist(),
    }
