"""Scoring a split: the sampled protocol (ground truth against its stored negatives) or full ranking.

Full ranking scores every item of the catalog in chunks of ``item_chunk`` items and keeps, per
user, only the counts of items that beat or tie the ground truth, so memory is [batch, item_chunk]
whatever the catalog size. Every item the user interacted with before the target is removed from
the ranking: the history window of the sample and, given ``known`` (a ``UserItems`` index), the
whole known history however long.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from lrd_dist.data.user_items import UserItems
from lrd_dist.evaluation.metrics import RankingMetrics, count_above, ground_truth_rank
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
    known: UserItems | None = None,
    split: str = "test",
    cold: np.ndarray | None = None,
) -> dict[str, float]:
    """HR/NDCG@k over the split; loader padding rows (``valid=False``) are not counted. Under
    several processes pass ``gather`` (accelerate's ``gather_object``): each rank scores its part
    of the users and every rank gets the metrics of all of them.

    ``cold``: the held-out items of a cold-start split. The metrics are then also reported apart
    for warm and cold targets (``warm/...``, ``cold/...``), with the chance level of the cold
    figures beside them (``cold/chance/NDCG@k``: a uniformly random ranking of the candidates)."""
    was_training = model.training
    model.eval()
    metrics = RankingMetrics(ks=tuple(ks))
    groups = {"warm": RankingMetrics(ks=tuple(ks)), "cold": RankingMetrics(ks=tuple(ks))}
    is_cold = torch.zeros(max(num_items, 1) + 1, dtype=torch.bool)
    chance_candidates: list[torch.Tensor] = []
    if cold is not None and len(cold):
        is_cold = torch.zeros(int(max(num_items, cold.max())) + 1, dtype=torch.bool)
        is_cold[torch.from_numpy(cold)] = True
    device = next(model.parameters()).device
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        if full_ranking:
            rank, tied = full_ranking_rank(model, batch, num_items, ties, item_chunk, known, split)
        else:
            candidates = torch.cat([batch["target"][:, None], batch["negatives"]], dim=1)
            scores = model.score(batch, candidates)
            rank, tied = ground_truth_rank(scores[:, 0], scores[:, 1:], ties)
        metrics.update(rank, tied, batch["valid"])
        if cold is not None and len(cold):
            target_cold = is_cold[batch["target"].cpu()].to(rank.device)
            valid = batch["valid"]
            groups["warm"].update(rank, tied, valid & ~target_cold)
            groups["cold"].update(rank, tied, valid & target_cold)
            count = num_items if full_ranking else 1 + int(batch["negatives"].shape[1])
            chance_candidates.append(torch.full((int((valid & target_cold).sum()),), count))
    model.train(was_training)
    if gather is not None:
        metrics = metrics.gathered(gather)
        groups = {name: group.gathered(gather) for name, group in groups.items()}
        chance_candidates = [torch.cat(p) for p in gather([chance_candidates]) if p]
    results = metrics.compute()
    if cold is not None and len(cold):
        for name, group in groups.items():
            results.update({f"{name}/{key}": value for key, value in group.compute().items()})
        results.update(chance_level(torch.cat(chance_candidates) if chance_candidates else None, ks))
    return results


def chance_level(candidates: torch.Tensor | None, ks: list[int]) -> dict[str, float]:
    """Expected HR@k and NDCG@k of a uniformly random ranking of each row's candidates (the ground
    truth among them): what a model that knows nothing of the cold targets would score."""
    if candidates is None or not len(candidates):
        return {}
    out = {}
    count = candidates.double()
    for k in ks:
        ranks = torch.arange(1, k + 1, dtype=torch.float64)
        discount = (1.0 / torch.log2(ranks + 1.0)).cumsum(0)  # sum over ranks 1..r
        reach = torch.clamp(count, max=k).long()
        out[f"cold/chance/HR@{k}"] = (reach.double() / count).mean().item()
        out[f"cold/chance/NDCG@{k}"] = (discount[reach - 1] / count).mean().item()
    return out


def full_ranking_rank(
    model: Recommender,
    batch: dict[str, torch.Tensor],
    num_items: int,
    ties: str,
    item_chunk: int = 512,
    known: UserItems | None = None,
    split: str = "test",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank of each row's ground truth among all items 1..num_items except the ones seen before it."""
    target = batch["target"]
    rows = len(target)
    target_score = model.score(batch, target[:, None])[:, 0]
    mask_rows, mask_items = seen_pairs(batch, known, split)
    order = torch.argsort(mask_items, stable=True)
    mask_rows, mask_items = mask_rows[order].to(target.device), mask_items[order].to(target.device)
    above = torch.zeros(rows, dtype=torch.long, device=target.device)
    equal = torch.zeros_like(above)
    score = model.item_scorer(batch)
    for start in range(1, num_items + 1, item_chunk):
        stop = min(start + item_chunk, num_items + 1)
        items = torch.arange(start, stop, device=target.device)
        scores = score(items.expand(rows, -1)).float()
        lo, hi = torch.searchsorted(mask_items, torch.tensor([start, stop], device=target.device)).tolist()
        scores[mask_rows[lo:hi], mask_items[lo:hi] - start] = float("-inf")
        inside = ((target >= start) & (target < stop)).nonzero(as_tuple=True)[0]
        scores[inside, target[inside] - start] = float("-inf")  # not its own competitor
        chunk_above, chunk_equal = count_above(target_score, scores)
        above += chunk_above
        equal += chunk_equal
    return 1 + above + (equal if ties == "pessimistic" else 0), equal > 0


def seen_pairs(
    batch: dict[str, torch.Tensor], known: UserItems | None, split: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, item) pairs to remove from each row's ranking: its history window, and with ``known``
    everything its user had before the target."""
    history = batch["history_items"].cpu()
    positions = torch.arange(history.shape[1])
    window = positions[None, :] < batch["history_length"].cpu()[:, None]
    rows, columns = window.nonzero(as_tuple=True)
    pairs = [(rows, history[rows, columns].long())]
    if known is not None:
        pairs.append(known.known_before(batch["user"], split, batch["target_time"]))
    return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
