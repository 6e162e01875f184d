"""Scoring a split: the sampled protocol (ground truth against its stored negatives) or full ranking."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from lrd_dist.evaluation.metrics import RankingMetrics, ground_truth_rank, mask_seen
from lrd_dist.models.recommender import Recommender


@torch.inference_mode()
def evaluate(
    model: Recommender,
    batches: Iterable[dict[str, torch.Tensor]],
    ks: list[int],
    ties: str,
    full_ranking: bool = False,
    num_items: int = 0,
    item_chunk: int = 512,
    gather=None,
) -> dict[str, float]:
    """HR/NDCG@k over the split; loader padding rows (``valid=False``) are not counted. Under
    several processes pass ``gather`` (accelerate's ``gather_object``): each rank scores its part
    of the users and every rank gets the metrics of all of them."""
    was_training = model.training
    model.eval()
    metrics = RankingMetrics(ks=tuple(ks))
    device = next(model.parameters()).device
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        if full_ranking:
            all_items = torch.arange(num_items + 1, device=device)
            scores = torch.cat(
                [
                    model.score(batch, all_items[start : start + item_chunk].expand(len(batch["user"]), -1))
                    for start in range(0, num_items + 1, item_chunk)
                ],
                dim=1,
            )
            target = scores.gather(1, batch["target"][:, None])[:, 0]
            scores = mask_seen(scores, batch["history_items"])
            scores.scatter_(1, batch["target"][:, None], float("-inf"))  # not its own competitor
            rank, tied = ground_truth_rank(target, scores, ties)
        else:
            candidates = torch.cat([batch["target"][:, None], batch["negatives"]], dim=1)
            scores = model.score(batch, candidates)
            rank, tied = ground_truth_rank(scores[:, 0], scores[:, 1:], ties)
        metrics.update(rank, tied, batch["valid"])
    model.train(was_training)
    if gather is not None:
        metrics = metrics.gathered(gather)
    return metrics.compute()
